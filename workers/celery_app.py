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
                 include=["workers.steps", "workers.report", "workers.environments"])
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
        # Fail fast when Redis is away: the API answers 503 instead of hanging a request for 20 s.
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                          "retry_policy": {"timeout": 3.0}},
        redis_socket_connect_timeout=3,
        broker_connection_timeout=3,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                                   "interval_max": 1},
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
    )
    return app


celery_app = make_celery()


@worker_process_init.connect
def _fresh_engine_after_fork(**_: object) -> None:
    # Never share a database connection across fork.
    dispose_engine()
