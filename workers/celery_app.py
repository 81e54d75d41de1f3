"""Celery, configured per process role. The API only publishes: it never runs a task and must
answer 503 at once when the broker is down. A worker runs tasks and rides out broker outages.
Every setting closes a bug another project shipped: late acks, requeue on worker loss, no hidden
prefetch, time limits, a visibility timeout above all of them, events on for Flower."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from celery import Celery
from kombu import Queue

from shared.config import Settings, get_settings
from shared.hosts import queue, window_queue
from workers import publish_transport

# Orchestration (start, report, watchdog, environment bookkeeping) runs on any general worker; every
# step that touches a node goes to its host's queues (shared.hosts.queue / window_queue), which only
# that host's agent consumes. Snapshot and restart run while a source node is held: the window queue
# is consumed first, so a quiesced node never waits behind other nodes' quiesce or provision work.
DEFAULT_QUEUE = "envclone"
TASK_MODULES = ["workers.steps", "workers.environments", "workers.watchdog", "workers.hosts"]

# Every task: late acks and a retry budget that is the domain's to bound (shared.clone.retry).
TASK_OPTS: dict[str, Any] = {"bind": True, "acks_late": True, "max_retries": None}


class Role(StrEnum):
    PUBLISHER = "publisher"  # the API and the CLI: send, never run
    WORKER = "worker"  # workers, beat and Flower


def _publish_retry(role: Role) -> tuple[dict[str, Any], float]:
    """(task publish retry policy, result-store retry timeout) for ``role``."""
    if role == Role.PUBLISHER:
        # A broker that is down means 503 now, not a request that hangs.
        return {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}, 3.0
    # Workers ride out a Redis outage of a couple of minutes (publishing the next step, the chord
    # counter) rather than break a chain.
    return {"max_retries": 90, "interval_start": 0, "interval_step": 0.5, "interval_max": 2}, 180.0


def worker_queues(settings: Settings) -> list[str]:
    """What a worker consumes, in priority order: its host's window and node queues if it is that
    host's agent, the general queue if it orchestrates (one process may be both: one host)."""
    out = [window_queue(settings.host_name), queue(settings.host_name)] if settings.agent else []
    return out + ([DEFAULT_QUEUE] if settings.orchestrate else [])


def make_celery(role: Role, settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("envclone", broker=settings.broker_url, backend=settings.resolved_result_backend,
                 include=TASK_MODULES if role == Role.WORKER else [], set_as_current=role == Role.WORKER)
    limit = settings.task_time_limit_s
    publish_policy, result_timeout = _publish_retry(role)
    if role == Role.PUBLISHER and settings.broker_url.startswith("redis://"):
        app.conf.broker_transport = publish_transport.NAME
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=limit,
        task_soft_time_limit=max(limit - 30, int(limit * 0.9)),
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                  "queue_order_strategy": "priority"},
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                          "retry_policy": {"timeout": result_timeout}},
        redis_socket_connect_timeout=3,
        broker_connection_timeout=3,
        broker_connection_max_retries=None,
        task_publish_retry_policy=publish_policy,
        broker_connection_retry_on_startup=True,
        # Workers announce what they publish (every step of a canvas shows in Flower from its send). The
        # API does not: its start task shows in Flower from its task-received, when a worker takes it;
        # the event was a second Redis publish, about 0.4 ms of the API's CPU per clone request. The
        # job itself shows in the API, the CLI and its event stream from the request on.
        task_send_sent_event=role == Role.WORKER,
        worker_send_task_events=True,
        task_track_started=True,
        result_expires=7 * 24 * 3600,
        result_extended=True,
        # A worker consumes these (no -Q needed); a publisher routes each node's step explicitly.
        task_queues=[Queue(q) for q in worker_queues(settings)] if role == Role.WORKER else [Queue(DEFAULT_QUEUE)],
        task_default_queue=DEFAULT_QUEUE,
        worker_hijack_root_logger=False,
        beat_schedule={"watchdog": {"task": "envclone.watchdog", "schedule": settings.watchdog_interval_s,
                                    "options": {"expires": settings.watchdog_interval_s}}},
    )
    return app
