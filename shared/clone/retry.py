"""The one retry policy of clone steps. A step that meets a retryable error is tried again after
``delay(attempt)`` until ``attempts`` runs of its body are spent; then it records ``failed``.
Waiting for a source node another job holds is not a failure: it costs no attempt and is bounded
by time (``lock_wait_s``). Celery carries the retries out; this module decides them."""

from __future__ import annotations

import random
from dataclasses import dataclass

from sqlalchemy.exc import OperationalError

from shared.config import Settings, get_settings
from shared.drivers import TransientDriverError

# Errors worth another attempt: the driver says so, or the network or the database blinked.
RETRYABLE = (TransientDriverError, ConnectionError, TimeoutError, OperationalError)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int  # runs of a step's body after the first one
    base_s: float
    cap_s: float
    lock_wait_s: float

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> RetryPolicy:
        s = settings or get_settings()
        return cls(s.retry_max, s.retry_base_s, s.retry_cap_s, s.lock_wait_s)

    def backoff(self, failures: int) -> float:
        """Exponential with jitter, capped: the wait after the ``failures``-th failure in a row."""
        return min(self.cap_s, self.base_s * 2 ** max(0, failures - 1)) * random.uniform(0.5, 1.0)

    def delay(self, attempt: int) -> float | None:
        """Seconds until the next attempt after attempt number ``attempt`` failed; None when spent."""
        return self.backoff(attempt) if attempt <= self.attempts else None

    def lock_wait_delay(self, waits: int) -> float:
        """0.2 s doubling to 3 s, jittered: a queue of jobs at one node must not flood the broker."""
        return min(3.0, 0.2 * 2 ** min(waits, 5)) * random.uniform(0.5, 1.0)
