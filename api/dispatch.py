"""Handing work to the workers after the transaction committed. If the broker cannot take it, the
rows just written are rolled back by hand and the caller gets a clear 503 -- never a 202 that is
silently dropped."""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery
from flask import current_app
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError

from api.errors import ApiError

BROKER_ERRORS = (BrokerError, RedisError, ConnectionError, OSError)
# Celery reports an unreachable Redis result store as a bare RuntimeError.
DISPATCH_ERRORS = (*BROKER_ERRORS, RuntimeError)


def publisher() -> Celery:
    """This API process's Celery app (publish only), made by create_app."""
    return current_app.extensions["celery"]


def broker_reachable() -> None:
    # A pooled connection: one made per request would cost a new Redis client (and its CPU) each time.
    with publisher().pool.acquire(block=True, timeout=2) as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def send(dispatch: Callable[[Celery], object], undo: Callable[[], None]) -> None:
    try:
        broker_reachable()  # a fast, clear answer in the common case of a broker that is down
        dispatch(publisher())
    except DISPATCH_ERRORS as exc:
        undo()
        raise ApiError(503, "broker_unavailable",
                       f"the task broker is unreachable, nothing was started: {exc}") from exc
