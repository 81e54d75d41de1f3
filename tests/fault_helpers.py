"""Leak accounting for the fault tests: what exists before a job must exist after it (plus the
clone, when it succeeded), and nothing else."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from sqlalchemy import func, select

from shared.db import session_scope
from shared.drivers import get_driver
from shared.models import JobEvent, NodeLock, NodeShare, StepRun
from tests.stack import Backend
from tests.workflow_client import lease_count


@dataclass(frozen=True)
class Counts:
    running: frozenset[str]
    volumes: frozenset[str]
    snapshots: frozenset[str]
    leases: int
    locks: int  # NodeLock and NodeShare rows: a job that ended must not still hold a source node


def lock_count() -> int:
    with session_scope() as session:
        return sum(session.scalar(select(func.count()).select_from(m)) for m in (NodeLock, NodeShare))


def counts(backend: Backend) -> Counts:
    return Counts(frozenset(get_driver().running_node_ids()), frozenset(backend.volumes()),
                  frozenset(backend.snapshots()), lease_count(), lock_count())


def step_worker_pid(job_id: str, step: str, node: str | None = None) -> int | None:
    """The pid of the worker process running ``step`` (recorded by the step itself)."""
    with session_scope() as session:
        if step == "report":
            event = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "report")
                                    .order_by(JobEvent.id.desc())).first()
            worker = event.data.get("worker") if event else None
        else:
            q = select(StepRun).where(StepRun.job_id == job_id, StepRun.step == step, StepRun.state == "running")
            if node:
                q = q.where(StepRun.node_name == node)
            row = session.scalars(q).first()
            worker = row.detail.get("worker") if row else None
    return int(worker.rsplit(":", 1)[1]) if worker else None


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
