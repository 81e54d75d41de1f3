"""Publishing from a step without tripping over a broker outage. Used by the step runner and the
steps, in the worker process.

Celery publishes a chain's next step right after a step's body returns (and a retry from inside
it). If the broker is down then and comes back while kombu retries, kombu 5.6 can reuse a channel
its reconnect closed and fail for good (AttributeError on `connection.client`): the chain breaks
and only the watchdog's stall detection would resume the job. So a step waits until the broker
answers before anything is published, and pooled connections an outage touched are dropped.
Progress events are best effort: sent once, never retried, so a step keeps working while the
broker is away (the database holds the real progress)."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import Task
from kombu.exceptions import OperationalError as KombuError
from redis.exceptions import RedisError

from workers.celery_app import celery_app

log = logging.getLogger("envclone.broker")
BROKER_ERRORS = (RedisError, KombuError, ConnectionError, OSError)
_touched = False  # this process's pooled broker connections may be broken


def send_progress(task: Task, **fields: Any) -> None:
    global _touched
    try:
        task.send_event("task-progress", retry=False, **fields)
    except BROKER_ERRORS:
        _touched = True


def _ping() -> None:
    # Straight through redis-py: kombu's connect would itself retry until the broker is back.
    with redis.Redis.from_url(celery_app.conf.broker_url, socket_connect_timeout=1, socket_timeout=2) as client:
        client.ping()


def await_broker(timeout_s: float) -> None:
    """Return once the broker answers (or after ``timeout_s``: Celery's own retries take over)."""
    global _touched
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _ping()
            break
        except BROKER_ERRORS as exc:
            if time.monotonic() >= deadline:
                log.warning("broker still unreachable after %.0fs: %s", timeout_s, exc)
                return
            if not _touched:
                log.warning("broker unreachable; the step waits for it before publishing: %s", exc)
            _touched = True
            time.sleep(0.5)  # poll: the broker sends no notice when it is back
    if _touched:
        celery_app._after_fork()  # forget producer pools whose connections the outage broke
        _touched = False
        log.info("broker reachable; publishing on fresh connections")
