"""One step of one node, from claim to outcome. A business failure never leaves as an exception:
it is recorded, so the chord always reaches the report (Celery's chord error propagation on Redis
cannot be relied on). What the caller gets back is whether, and when, to run the step again."""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared.clone import faults, gate
from shared.clone.retry import RETRYABLE, RetryPolicy
from shared.clone.steps import STEPS, Notify
from shared.drivers import PermanentDriverError
from shared.locks import NodeBusy
from shared.states import Step, StepState


@dataclass(frozen=True)
class Again:
    """Run the step again in ``delay_s`` seconds (a retry, or another look at a busy node)."""

    delay_s: float
    reason: BaseException


def run_step(job_id: str, source_node_id: str, step: Step, run: int, notify: Notify,
             policy: RetryPolicy | None = None) -> Again | None:
    policy = policy or RetryPolicy.from_settings()
    spec = STEPS[step]
    ticket = gate.open_step(job_id, source_node_id, step, run, spec.always_run)
    if ticket is None:
        return None
    try:
        faults.fail_before(step, ticket.node_name, ticket.attempt, ticket.options)
        began = time.perf_counter()
        detail = spec.body(ticket, notify) or {}
        # Time inside the step's own work (driver calls and their bookkeeping), for the benchmarks.
        detail["work_ms"] = round((time.perf_counter() - began) * 1000, 3)
        faults.hang_after(step, ticket.node_name, ticket.attempt, ticket.options)
    except NodeBusy as busy:
        try:
            waits = gate.hand_back(ticket, busy, policy.lock_wait_s)
        except PermanentDriverError as exc:
            failure = exc
        else:
            return None if waits is None else Again(policy.lock_wait_delay(waits), busy)
    except RETRYABLE as exc:
        delay = policy.delay(ticket.attempt)
        if delay is not None:
            gate.close_step(ticket, StepState.RETRYING, _describe(exc))
            return Again(delay, exc)
        failure = exc
    except Exception as exc:  # a permanent failure: recorded, never thrown into the chord
        failure = exc
    else:
        gate.close_step(ticket, StepState.SUCCEEDED, detail=detail)
        return None
    error = _describe(failure)
    if spec.on_failure is not None:
        try:
            spec.on_failure(ticket, failure)
        except Exception as hook_exc:  # the report's compensation tries again
            error += f"; cleanup after failure also failed: {hook_exc}"
    # A failure may carry its record (the safety pass's findings): kept as a success's would be.
    gate.close_step(ticket, StepState.FAILED, error, detail=getattr(failure, "detail", None))
    return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
