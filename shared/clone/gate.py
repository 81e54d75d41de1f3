"""Opening and closing one step of one node. The StepRun row is the step's single record: a run of
an older dispatch stands down, a redelivered step that already ended does nothing, a cancelled job
or a failed earlier step closes the step without running it, and every run of the body counts as
an attempt (waiting for a busy node hands its attempt back)."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import locks
from shared.clone.events import record_event
from shared.clone.sources import held_down
from shared.config import get_settings
from shared.db import retry_db, session_scope
from shared.drivers import PermanentDriverError
from shared.locks import NodeBusy
from shared.models import CloneJob, JobNode, StepRun, utcnow
from shared.states import JobState, Step, StepState

log = logging.getLogger("envclone.steps")


@dataclass(frozen=True)
class Ticket:
    """One admitted run of a step's body."""

    job_id: str
    source_node_id: str
    node_name: str
    step: Step
    attempt: int
    options: dict[str, Any]
    run: int = 1  # the job's run that admitted it: a later run owns the step row from then on


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def step_row(session: Session, job_id: str, source_node_id: str, step: Step) -> StepRun:
    return session.execute(
        select(StepRun).where(StepRun.job_id == job_id, StepRun.source_node_id == source_node_id,
                              StepRun.step == step).with_for_update()).scalar_one()


def job_node(session: Session, job_id: str, source_node_id: str) -> JobNode:
    return session.execute(
        select(JobNode).where(JobNode.job_id == job_id, JobNode.source_node_id == source_node_id)
        .with_for_update()).scalar_one()


def _verdict(job: CloneJob, earlier: list[StepRun], always_run: bool) -> tuple[StepState, str] | None:
    """Why a step closes without running (``always_run`` steps run whatever came before)."""
    if always_run:
        return None
    if job.cancel_requested:
        return StepState.CANCELLED, "job cancelled"
    blocked = next((e for e in earlier if e.state != StepState.SUCCEEDED), None)
    if blocked is not None:
        return StepState.SKIPPED, f"{blocked.step} {blocked.state}"
    return None


@retry_db
def open_step(job_id: str, source_node_id: str, step: Step, run: int, always_run: bool) -> Ticket | None:
    """Admit a run of the step's body, or close the step without one (None: nothing to run)."""
    with session_scope() as session:
        job = session.get(CloneJob, job_id)
        if job is None or job.run != run:
            log.info("job=%s step=%s run=%s is stale (current run %s); skipped", job_id, step, run,
                     job.run if job else None)
            return None
        row = step_row(session, job_id, source_node_id, step)
        if row.state.done:
            return None  # redelivered after it finished: nothing to do twice
        if job.state == JobState.QUEUED:
            job.state, job.started_at = JobState.RUNNING, job.started_at or utcnow()
            record_event(session, job, "job", state=JobState.RUNNING)
        earlier = list(session.scalars(select(StepRun).where(
            StepRun.job_id == job_id, StepRun.source_node_id == source_node_id, StepRun.seq < row.seq)))
        verdict = _verdict(job, earlier, always_run)
        if verdict is not None:
            _close(session, job, row, *verdict)
            return None
        row.state, row.attempts = StepState.RUNNING, row.attempts + 1
        row.started_at = row.started_at or utcnow()
        row.detail = {**row.detail, "worker": worker_id()}
        row.host = get_settings().host_name
        record_event(session, job, "step", node=row.node_name, step=step, state=StepState.RUNNING,
                     attempt=row.attempts)
        return Ticket(job_id, source_node_id, row.node_name, Step(step), row.attempts, dict(job.options), run)


def _close(session: Session, job: CloneJob, row: StepRun, state: StepState, error: str | None = None,
           detail: dict[str, Any] | None = None) -> None:
    row.state, row.error = state, error
    row.finished_at = utcnow() if state.done else None
    # A wait for a busy node ends with the step's run: the next run's wait is counted anew.
    row.detail = {**{k: v for k, v in row.detail.items() if k != "waiting_since"}, **(detail or {})}
    record_event(session, job, "step", node=row.node_name, step=row.step, state=state, attempt=row.attempts,
                 error=error)
    log.info("job=%s node=%s step=%s state=%s attempt=%s%s", job.id, row.node_name, row.step, state,
             row.attempts, f" error={error!r}" if error else "")


@retry_db
def close_step(ticket: Ticket, state: StepState, error: str | None = None,
               detail: dict[str, Any] | None = None) -> None:
    with session_scope() as session:
        row = step_row(session, ticket.job_id, ticket.source_node_id, ticket.step)
        job = session.get(CloneJob, ticket.job_id)
        if row.state.done:
            return  # closed meanwhile by the watchdog; its verdict stands
        if job.run != ticket.run:
            log.info("job=%s step=%s run=%s ended after run %s took over; its outcome is not recorded",
                     ticket.job_id, ticket.step, ticket.run, job.run)
            return
        _close(session, job, row, state, error, detail)


@retry_db
def hand_back(ticket: Ticket, busy: NodeBusy, lock_wait_s: float) -> int | None:
    """Another job holds the source node: give the attempt back and say how often we waited.
    PermanentDriverError once the node was busy for longer than ``lock_wait_s``. None: the step was
    closed or its run replaced meanwhile (the watchdog); then it does not wait, and the claim it may
    have left on the node goes with a job that has ended."""
    with session_scope() as session:
        row = step_row(session, ticket.job_id, ticket.source_node_id, ticket.step)
        job = session.get(CloneJob, ticket.job_id)
        if row.state.done or job.run != ticket.run:
            if job.state.done and not held_down(job_node(session, ticket.job_id, ticket.source_node_id)):
                locks.release(session, ticket.source_node_id, ticket.job_id)
            return None
        row.attempts = max(0, row.attempts - 1)
        since = row.detail.get("waiting_since") or time.time()
        waited = time.time() - since
        if waited > lock_wait_s:
            raise PermanentDriverError(f"{busy} for more than {waited:.0f}s")
        waits = int(row.detail.get("waits", 0)) + 1
        row.state = StepState.PENDING
        row.detail = {**row.detail, "waiting_since": since, "waiting_for": busy.holder, "waits": waits}
        return waits
