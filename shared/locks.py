"""Per-source-node locks: at most one job holds a node between its quiesce and its restart, so two
clones of one source never stop it twice at once; the second waits its turn."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.models import NodeLock, utcnow


class NodeBusy(Exception):
    def __init__(self, node_id: str, holder: str) -> None:
        super().__init__(f"source node {node_id} is held by job {holder}")
        self.node_id, self.holder = node_id, holder


def acquire(session: Session, node_id: str, job_id: str, ttl_s: float) -> None:
    expires = utcnow() + timedelta(seconds=ttl_s)
    row = session.execute(select(NodeLock).where(NodeLock.node_id == node_id).with_for_update()).scalar_one_or_none()
    if row is None:
        try:
            with session.begin_nested():
                session.add(NodeLock(node_id=node_id, job_id=job_id, expires_at=expires))
        except IntegrityError:
            holder = session.scalar(select(NodeLock.job_id).where(NodeLock.node_id == node_id)) or "?"
            raise NodeBusy(node_id, holder) from None
        return
    if row.job_id != job_id and row.expires_at > utcnow():
        raise NodeBusy(node_id, row.job_id)
    row.job_id, row.acquired_at, row.expires_at = job_id, utcnow(), expires


def wait_for_window(session: Session, node_id: str, job_id: str) -> None:
    """NodeBusy while another job holds the node: a copy that takes no lock of its own (it runs
    beside others) still does not start inside another job's held window."""
    row = session.get(NodeLock, node_id)
    if row is not None and row.job_id != job_id and row.expires_at > utcnow():
        raise NodeBusy(node_id, row.job_id)


def release(session: Session, node_id: str, job_id: str) -> None:
    session.execute(delete(NodeLock).where(NodeLock.node_id == node_id, NodeLock.job_id == job_id))
