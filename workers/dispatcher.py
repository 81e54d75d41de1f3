"""The transactional outbox, sending side. Rows are committed first with ``dispatched_at`` empty
and marked with a compare-and-set: environments by whoever sends their task, clone jobs by the
worker that takes their start task (the request itself costs one transaction). What was not marked
within a grace period -- the API died, the broker blinked -- the watchdog sends again."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, update

from shared.clone.supervision import next_round_if_locked
from shared.config import get_settings
from shared.db import session_scope
from shared.models import CloneJob, Environment, utcnow
from shared.states import EnvState, JobState


def mark_dispatched(model: type[CloneJob] | type[Environment], row_id: str) -> bool:
    with session_scope() as session:
        done = session.execute(update(model).where(model.id == row_id, model.dispatched_at.is_(None))
                               .values(dispatched_at=utcnow()))
        return bool(done.rowcount)


def _unclaim(model: type[CloneJob] | type[Environment], row_id: str) -> None:
    with session_scope() as session:
        session.execute(update(model).where(model.id == row_id).values(dispatched_at=None))


def send_pending(send_job: Callable[[str], object], send_create: Callable[[str], object],
                 send_delete: Callable[[str], object]) -> int:
    """Dispatch what the outbox holds past its grace period. Returns how many were sent."""
    cutoff = utcnow() - timedelta(seconds=get_settings().dispatch_grace_s)
    with session_scope() as session:
        jobs = list(session.scalars(select(CloneJob.id).where(
            CloneJob.dispatched_at.is_(None), CloneJob.state == JobState.QUEUED, CloneJob.created_at < cutoff)))
        # A clone's target environment is made by its job, never by a create task.
        envs = list(session.execute(select(Environment.id, Environment.state).where(
            Environment.dispatched_at.is_(None), Environment.updated_at < cutoff,
            ((Environment.state == EnvState.CREATING) & Environment.source_environment_id.is_(None))
            | (Environment.state == EnvState.DELETING))))
    sent = 0
    work: list[tuple[type, str, Callable[[str], object]]] = [(CloneJob, j, send_job) for j in jobs]
    work += [(Environment, e.id, send_create if e.state == EnvState.CREATING else send_delete) for e in envs]
    for model, row_id, send in work:
        with next_round_if_locked(f"{model.__tablename__}={row_id} (outbox)"):
            if not mark_dispatched(model, row_id):
                continue
            try:
                send(row_id)
                sent += 1
            except Exception:
                _unclaim(model, row_id)
                raise
    return sent
