"""Publishing from a step without tripping over a broker outage.

Celery publishes a chain's next step right after a step's body returns (and a retry from inside
it). If the broker is down then and comes back while kombu retries, kombu 5.6 can reuse a channel
its reconnect closed and fail for good (AttributeError on `connection.client`): the chain breaks
and only the watchdog's stall detection would resume the job. So a step waits until the broker
answers before anything is published; a publish onto a broker that answers reconnects pooled
connections by itself (closing the pools by hand instead leaves kombu's pools waiting forever).
Progress events are best effort: sent once, never retried, so a step keeps working while the
broker is away (the database holds the real progress)."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery, Task
from kombu.exceptions import OperationalError as KombuError
from redis.exceptions import RedisError
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

log = logging.getLogger("envclone.broker")
BROKER_ERRORS = (RedisError, KombuError, ConnectionError, OSError)


def send_progress(task: Task, **fields: Any) -> None:
    try:
        task.send_event("task-progress", retry=False, **fields)
    except BROKER_ERRORS:
        log.info("progress event not sent: broker unreachable")


def _ping(url: str) -> None:
    # Straight through redis-py: kombu's connect would itself retry until the broker is back.
    with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2) as client:
        client.ping()


def await_broker(app: Celery, timeout_s: float) -> None:
    """Return once the broker answers (or after ``timeout_s``: Celery's own retries take over)."""

    def waiting(state: Any) -> None:
        if state.attempt_number == 1:
            log.warning("broker unreachable; the step waits for it before publishing: %s",
                        state.outcome.exception())

    try:
        attempts = Retrying(retry=retry_if_exception_type(BROKER_ERRORS), stop=stop_after_delay(timeout_s),
                            wait=wait_fixed(0.5), before_sleep=waiting)
        attempts(_ping, app.conf.broker_url)
    except RetryError as exc:
        log.warning("broker still unreachable after %.0fs: %s", timeout_s, exc.last_attempt.exception())
        return
    if attempts.statistics.get("attempt_number", 1) > 1:
        log.info("broker reachable again; publishing")
