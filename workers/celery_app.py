"""The Celery app and its configuration. Every setting here closes a bug another project shipped
(see the handbook's Celery rules): late acks, requeue on worker loss, no hidden prefetch, time limits,
a visibility timeout above all of them, events on for Flower."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init
from kombu import Queue

from shared.config import get_settings
from shared.db import dispose_engine

# Snapshot and restart run while a source node is down: their queue is consumed first, so a
# quiesced node never waits behind other nodes' quiesce or provision work.
WINDOW_QUEUE = "envclone.window"
DEFAULT_QUEUE = "envclone"


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery("envclone", broker=settings.broker_url, backend=settings.resolved_result_backend,
                 include=["workers.steps", "workers.report", "workers.environments", "workers.watchdog"])
    limit = settings.task_time_limit_s
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        "queue_order_strategy": "priority",
    }
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=limit,
        task_soft_time_limit=max(limit - 30, int(limit * 0.9)),
        broker_transport_options=transport,
        # Workers ride out a Redis outage of a couple of minutes (publishing the next step, the chord
        # counter) rather than break a chain; the API narrows these to answer 503 at once.
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                          "retry_policy": {"timeout": 180.0}},
        redis_socket_connect_timeout=3,
        broker_connection_timeout=3,
        broker_connection_max_retries=None,
        task_publish_retry_policy={"max_retries": 90, "interval_start": 0, "interval_step": 0.5,
                                   "interval_max": 2},
        broker_connection_retry_on_startup=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_track_started=True,
        result_expires=7 * 24 * 3600,
        result_extended=True,
        task_queues=[Queue(WINDOW_QUEUE), Queue(DEFAULT_QUEUE)],
        task_default_queue=DEFAULT_QUEUE,
        task_routes={"envclone.snapshot": {"queue": WINDOW_QUEUE},
                     "envclone.restart": {"queue": WINDOW_QUEUE}},
        worker_hijack_root_logger=False,
        beat_schedule={"watchdog": {"task": "envclone.watchdog", "schedule": settings.watchdog_interval_s,
                                    "options": {"expires": settings.watchdog_interval_s}}},
    )
    return app


celery_app = make_celery()


def fail_fast_publishing() -> None:
    """For the API process: a broker that is down means 503 now, not a request that hangs."""
    celery_app.conf.update(
        result_backend_transport_options={**celery_app.conf.result_backend_transport_options,
                                          "retry_policy": {"timeout": 3.0}},
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                                   "interval_max": 1},
    )


@worker_process_init.connect
def _fresh_engine_after_fork(**_: object) -> None:
    # Never share a database connection across fork.
    dispose_engine()
