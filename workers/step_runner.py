"""The frame every clone step runs in. It owns the StepRun row: skip when an earlier step of the
node did not succeed, stop at a cancel, count attempts, inject configured faults, retry transient
errors with backoff, record permanent failures. A business failure never leaves as an exception:
the chord must reach the report whatever happens (handbook, Celery rules).

Every task carries the job's ``run`` (dispatch generation): when the watchdog re-dispatches a
stalled job, tasks of the older dispatch find a newer run in the database and do nothing."""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Task
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from shared.config import FaultSpec, get_settings
from shared.db import session_scope
from shared.drivers import PermanentDriverError, TransientDriverError
from shared.locks import NodeBusy
from shared.models import (
    JOB_QUEUED,
    JOB_RUNNING,
    STEP_CANCELLED,
    STEP_DONE_STATES,
    STEP_FAILED,
    STEP_PENDING,
    STEP_RETRYING,
    STEP_RUNNING,
    STEP_SKIPPED,
    STEP_SUCCEEDED,
    CloneJob,
    JobNode,
    StepRun,
    utcnow,
)
from shared.progress import record_event
from workers.broker_guard import await_broker

log = logging.getLogger("envclone.steps")

# Celery retry budget of a task: far above anything the bounds below allow (lock_wait_s, retry_max,
# a database outage retried every <= 30 s), so Celery never ends a chain with MaxRetriesExceeded.
LOCK_WAIT_RETRIES = 100_000

# Errors worth another attempt: the driver says so, or the network/database blinked.
RETRYABLE = (TransientDriverError, ConnectionError, TimeoutError, OperationalError)


@dataclass(frozen=True)
class StepContext:
    task: Task
    job_id: str
    source_node_id: str
    node_name: str
    step: str
    attempt: int
    options: dict[str, Any]


StepBody = Callable[[StepContext], dict[str, Any] | None]
FailureHook = Callable[[StepContext, BaseException], None]


def backoff(retries: int) -> float:
    """Exponential backoff with jitter, capped."""
    s = get_settings()
    return min(s.retry_cap_s, s.retry_base_s * (2 ** retries)) * random.uniform(0.5, 1.0)


def faults_for(step: str, node: str, options: dict[str, Any]) -> list[FaultSpec]:
    settings = get_settings()
    specs = list(settings.faults)
    if settings.fault_injection:
        specs += [FaultSpec.model_validate(f) for f in options.get("faults", [])]
    return [f for f in specs if f.step == step and f.node in ("*", node)]


def inject_before(ctx: StepContext) -> None:
    for spec in faults_for(ctx.step, ctx.node_name, ctx.options):
        if spec.kind != "hang" and ctx.attempt <= spec.times:
            msg = f"injected {spec.kind} fault in {ctx.step} (attempt {ctx.attempt} of {spec.times})"
            raise (TransientDriverError if spec.kind == "transient" else PermanentDriverError)(msg)


def inject_hang(step: str, node: str, attempt: int, options: dict[str, Any]) -> None:
    """After the work is done and before it is recorded: the worst moment to lose a worker."""
    for spec in faults_for(step, node, options):
        if spec.kind == "hang" and attempt <= spec.times:
            time.sleep(spec.seconds)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _step_row(session, job_id: str, source_node_id: str, step: str) -> StepRun:  # noqa: ANN001
    return session.execute(
        select(StepRun).where(StepRun.job_id == job_id, StepRun.source_node_id == source_node_id,
                              StepRun.step == step).with_for_update()
    ).scalar_one()


def _finish(ctx: StepContext, state: str, error: str | None = None, detail: dict[str, Any] | None = None) -> None:
    with session_scope() as session:
        row = _step_row(session, ctx.job_id, ctx.source_node_id, ctx.step)
        if row.state in STEP_DONE_STATES:
            return  # closed meanwhile by the watchdog; its verdict stands
        row.state, row.error = state, error
        row.finished_at = utcnow() if state in STEP_DONE_STATES else None
        if detail:
            row.detail = {**row.detail, **detail}
        job = session.get(CloneJob, ctx.job_id)
        record_event(session, job, "step", node=ctx.node_name, step=ctx.step, state=state,
                     attempt=row.attempts, error=error)
    log.info("job=%s node=%s step=%s state=%s attempt=%s%s", ctx.job_id, ctx.node_name, ctx.step, state,
             ctx.attempt, f" error={error!r}" if error else "")


def _wait_for_node(task: Task, ctx: StepContext, busy: NodeBusy) -> None:
    """Another job holds the source node: give the attempt back and come back shortly."""
    with session_scope() as session:
        row = _step_row(session, ctx.job_id, ctx.source_node_id, ctx.step)
        since = row.detail.get("waiting_since") or time.time()
        waited = time.time() - since
        if waited > get_settings().lock_wait_s:
            row.attempts = max(0, row.attempts - 1)
            raise PermanentDriverError(f"{busy} for more than {waited:.0f}s")
        waits = int(row.detail.get("waits", 0)) + 1
        row.state, row.attempts = STEP_PENDING, max(0, row.attempts - 1)
        row.detail = {**row.detail, "waiting_since": since, "waiting_for": busy.holder, "waits": waits}
    # Back off (0.2 s doubling to 3 s, jittered) so a queue of jobs at one node does not flood the
    # broker with retries. (max_retries=None would mean "the task's default", which they outlast.)
    countdown = min(3.0, 0.2 * 2 ** min(waits, 5)) * random.uniform(0.5, 1.0)
    await_broker(get_settings().broker_wait_s)  # task.retry publishes
    raise task.retry(countdown=countdown, max_retries=LOCK_WAIT_RETRIES)


def run_step(task: Task, job_id: str, source_node_id: str, step: str, run: int, body: StepBody,
             on_failure: FailureHook | None = None, always_run: bool = False) -> None:
    """Run one step of one node. ``always_run`` steps (restarting the source) run even after an
    earlier step failed or the job was cancelled: that is what keeps sources from staying down."""
    try:
        _run_step(task, job_id, source_node_id, step, run, body, on_failure, always_run)
    finally:
        await_broker(get_settings().broker_wait_s)  # before Celery publishes the next step


def _run_step(task: Task, job_id: str, source_node_id: str, step: str, run: int, body: StepBody,
              on_failure: FailureHook | None, always_run: bool) -> None:
    with session_scope() as session:
        job = session.get(CloneJob, job_id)
        if job is None or job.run != run:
            log.info("job=%s step=%s run=%s is stale (current run %s); skipped", job_id, step, run,
                     job.run if job else None)
            return
        row = _step_row(session, job_id, source_node_id, step)
        if row.state in STEP_DONE_STATES:
            return  # redelivered after it finished: nothing to do twice
        if job.state == JOB_QUEUED:
            job.state, job.started_at = JOB_RUNNING, job.started_at or utcnow()
            record_event(session, job, "job", state=JOB_RUNNING)
        earlier = session.scalars(select(StepRun).where(
            StepRun.job_id == job_id, StepRun.source_node_id == source_node_id, StepRun.seq < row.seq))
        blocked = next((e for e in earlier if e.state != STEP_SUCCEEDED), None)
        verdict = None
        if not always_run and job.cancel_requested:
            verdict = (STEP_CANCELLED, "job cancelled")
        elif not always_run and blocked is not None:
            verdict = (STEP_SKIPPED, f"{blocked.step} {blocked.state}")
        if verdict is None:
            row.state, row.attempts = STEP_RUNNING, row.attempts + 1
            row.started_at = row.started_at or utcnow()
            row.detail = {**row.detail, "worker": worker_id()}
            record_event(session, job, "step", node=row.node_name, step=step, state=STEP_RUNNING,
                         attempt=row.attempts)
        ctx = StepContext(task, job_id, source_node_id, row.node_name, step, row.attempts, dict(job.options))
    if verdict is not None:
        _finish(ctx, verdict[0], verdict[1])
        return

    failure: BaseException | None = None
    retry_in: float | None = None
    detail: dict[str, Any] | None = None
    try:
        inject_before(ctx)
        began = time.perf_counter()
        detail = body(ctx)
        # Time inside the step's own work (driver calls and their bookkeeping), for the benchmarks.
        detail = {**(detail or {}), "work_ms": round((time.perf_counter() - began) * 1000, 3)}
        inject_hang(step, ctx.node_name, ctx.attempt, ctx.options)
    except NodeBusy as busy:
        try:
            _wait_for_node(task, ctx, busy)
        except PermanentDriverError as exc:
            failure = exc
    except RETRYABLE as exc:
        failure = exc
        # The budget counts runs of the body, not Celery retries: waiting for a node lock is free.
        if ctx.attempt <= get_settings().retry_max:
            retry_in = backoff(ctx.attempt - 1)
    except Exception as exc:  # noqa: BLE001 - permanent: recorded, never thrown into the chord
        failure = exc
    if failure is None:
        _finish(ctx, STEP_SUCCEEDED, detail=detail)
        return
    error = f"{type(failure).__name__}: {failure}"
    if retry_in is not None:
        _finish(ctx, STEP_RETRYING, error)
        await_broker(get_settings().broker_wait_s)  # task.retry publishes
        raise task.retry(countdown=retry_in, exc=failure)
    if on_failure is not None:
        try:
            on_failure(ctx, failure)
        except Exception as hook_exc:  # noqa: BLE001 - the report's safety net tries again
            error += f"; cleanup after failure also failed: {hook_exc}"
    _finish(ctx, STEP_FAILED, error)


def job_node(session, job_id: str, source_node_id: str) -> JobNode:  # noqa: ANN001
    return session.execute(
        select(JobNode).where(JobNode.job_id == job_id, JobNode.source_node_id == source_node_id).with_for_update()
    ).scalar_one()
