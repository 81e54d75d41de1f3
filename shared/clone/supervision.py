"""The watchdog's rules for jobs, kept even when workers die, the broker blinks or a step hangs:

* a source quiesced longer than ENVCLONE_MAX_DOWNTIME_S is restarted and its open window steps fail;
* a job with no progress for ENVCLONE_JOB_STALL_S is run again (its steps are idempotent, tasks of
  the older run stand down); after ENVCLONE_MAX_RESUMES it is given up: failed, with compensation.

A round runs under ``rounds()``: it waits a bounded time for a row another transaction holds, and
leaves what it could not lock to its next round, where a lock wait used to hold every later round."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import func, select

from shared.clone.events import record_event
from shared.clone.outcome import fail_open_steps, finish_job
from shared.clone.sources import restart_source
from shared.config import get_settings
from shared.db import bounded_lock_waits, is_lock_conflict, session_scope
from shared.drivers import DriverError
from shared.models import CloneJob, JobEvent, JobNode, Node, utcnow
from shared.states import JOB_DONE, Step, StepState

log = logging.getLogger("envclone.watchdog")


@contextmanager
def rounds() -> Iterator[None]:
    """A round of watchdog rules: no lock is waited for longer than ENVCLONE_WATCHDOG_LOCK_WAIT_S."""
    with bounded_lock_waits(get_settings().watchdog_lock_wait_s):
        yield


@contextmanager
def next_round_if_locked(what: str) -> Iterator[None]:
    """The work within is dropped, and left to the next round, when a row it needs stays locked by
    another transaction (a process hung inside one, a host gone without a reset): the rest of the
    round goes on."""
    try:
        yield
    except Exception as exc:
        if not is_lock_conflict(exc):
            raise
        log.warning("%s left to the next round: a row it needs is held by another transaction (%s)", what,
                    type(getattr(exc, "orig", exc)).__name__)


def restart_overdue_sources() -> int:
    """Run by each host's agent for the sources on its own host, one source at a time: a row held
    elsewhere leaves that source to the next round, and no other."""
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.max_downtime_s)
    with session_scope() as session:
        overdue = session.execute(
            select(JobNode.job_id, JobNode.source_node_id).join(CloneJob, CloneJob.id == JobNode.job_id)
            .join(Node, Node.id == JobNode.source_node_id)
            .where(JobNode.quiesced_at < cutoff, JobNode.restarted_at.is_(None), Node.host == settings.host_name,
                   CloneJob.state.not_in(JOB_DONE))).all()
    fixed = 0
    for job_id, node_id in overdue:
        with next_round_if_locked(f"job={job_id} node={node_id} (source down too long)"):
            fixed += _restart_overdue(job_id, node_id, cutoff)
    return fixed


def _restart_overdue(job_id: str, node_id: str, cutoff: datetime) -> int:
    # The source first, in a transaction of its own (once it is restarted, recording that waits for
    # locks as long as it takes: restart_source); the job's bookkeeping after, which a held job
    # row cannot undo: the job's steps also see ``restarted_at`` and fail by themselves.
    reason = f"watchdog: source was down longer than {get_settings().max_downtime_s:.0f}s; restarted"
    with session_scope() as session:
        jn = session.execute(select(JobNode).where(JobNode.job_id == job_id, JobNode.source_node_id == node_id)
                             .with_for_update()).scalar_one()
        if jn.restarted_at is not None or jn.quiesced_at is None or jn.quiesced_at >= cutoff:
            return 0  # brought back meanwhile
        try:
            restart_source(session, jn)
        except DriverError as exc:
            log.error("job=%s node=%s watchdog could not restart the source: %s", job_id, jn.name, exc)
            return 0
        name = jn.name
    log.warning("job=%s node=%s %s", job_id, name, reason)
    with next_round_if_locked(f"job={job_id} node={name} (failing its window's steps)"):
        with session_scope() as session:
            job = session.execute(select(CloneJob).where(CloneJob.id == job_id).with_for_update()).scalar_one()
            for step in fail_open_steps(session, job_id, reason, [Step.QUIESCE, Step.SNAPSHOT], node_id):
                record_event(session, job, "step", node=name, step=step.step, state=StepState.FAILED,
                             error=reason)
    return 1


def fail_jobs_on_down_hosts(down: set[str]) -> list[str]:
    """A job that needs a down host cannot finish: its open steps fail and it ends now, cleanly --
    the caller asks the other hosts to sweep (a source held down there comes back, the partial clone
    goes); the down host sweeps its own leftovers when its agent returns. Returns the jobs ended."""
    if not down:
        return []
    with session_scope() as session:
        jobs = list(session.scalars(
            select(CloneJob.id).distinct().join(JobNode, JobNode.job_id == CloneJob.id)
            .join(Node, (Node.id == JobNode.source_node_id) | (Node.id == JobNode.clone_node_id))
            .where(CloneJob.state.not_in(JOB_DONE), Node.host.in_(sorted(down)))))
    ended = []
    for job_id in jobs:
        with next_round_if_locked(f"job={job_id} (its host is down)"):
            if _fail_on_down_host(job_id, down):
                ended.append(job_id)
    return ended


def _fail_on_down_host(job_id: str, down: set[str]) -> bool:
    with session_scope() as session:
        job = session.execute(select(CloneJob).where(CloneJob.id == job_id).with_for_update()).scalar_one()
        if job.state.done:
            return False
        reason = f"host {', '.join(sorted(down))} is down"
        for step in fail_open_steps(session, job_id, reason):
            record_event(session, job, "step", node=step.node_name, step=step.step, state=StepState.FAILED,
                         error=reason)
    finish_job(job_id)
    log.error("job=%s failed: a host it needs is down (%s)", job_id, ", ".join(sorted(down)))
    return True


def resume_or_give_up_stalled_jobs(dispatch: Callable[[str], object]) -> tuple[int, int]:
    """``dispatch(job_id)`` publishes the job's next run."""
    settings = get_settings()
    stall_s = settings.resolved_job_stall_s
    cutoff = utcnow() - timedelta(seconds=stall_s)
    resumed = reaped = 0
    with session_scope() as session:
        last = select(JobEvent.job_id, func.max(JobEvent.at).label("at")).group_by(JobEvent.job_id).subquery()
        stalled = list(session.execute(
            select(CloneJob.id).outerjoin(last, last.c.job_id == CloneJob.id)
            .where(CloneJob.state.not_in(JOB_DONE), CloneJob.dispatched_at.is_not(None),
                   func.coalesce(last.c.at, CloneJob.created_at) < cutoff)).scalars())
    for job_id in stalled:
        with next_round_if_locked(f"job={job_id} (stalled)"):
            with session_scope() as session:
                job = session.execute(select(CloneJob).where(CloneJob.id == job_id).with_for_update()).scalar_one()
                resumes = session.scalar(select(func.count()).where(JobEvent.job_id == job_id,
                                                                    JobEvent.kind == "resumed"))
                resume = resumes < settings.max_resumes
                if resume:
                    job.run += 1  # tasks of the older run now stand down
                    record_event(session, job, "resumed", reason=f"no progress for {stall_s:.0f}s")
                else:
                    fail_open_steps(session, job_id, f"reaped: no progress for {stall_s:.0f}s after {resumes} resumes")
            if resume:
                dispatch(job_id)
                resumed += 1
            else:
                finish_job(job_id)
                reaped += 1
            log.warning("job=%s stalled: %s", job_id, "resumed" if resume else "given up")
    return resumed, reaped
