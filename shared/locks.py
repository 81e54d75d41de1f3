"""Per-source-node locks. A job *takes* a node for a held window (stop mode: quiesce to restart) or
for an online copy that must run alone; a job *shares* it while an online copy that runs beside
others reads it (PostgreSQL's backup). A node taken by one job is neither taken nor shared by
another, and a shared node is not taken: two clones of one source never stop it twice at once, and
no window stops a server another job is copying. Whoever finds the node busy waits its turn.

Takers go first: a taker that finds only sharers in its way keeps the node claimed while it waits,
so no new copy starts and the copies under way are all it waits for. Without that, a stream of
online copies of a busy source kept a stop-mode clone waiting until ``lock_wait_s`` failed it."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.models import Node, NodeLock, NodeShare, utcnow


class NodeBusy(Exception):
    def __init__(self, node_id: str, holder: str) -> None:
        super().__init__(f"source node {node_id} is held by job {holder}")
        self.node_id, self.holder = node_id, holder


# A claim (a taker waiting for sharers) lapses this soon unless its taker asks again (every <= 3 s,
# shared.clone.retry.lock_wait_delay): a taker that stopped asking must not hold copies off for a
# held window's whole TTL.
CLAIM_TTL_S = 60.0


def _one_at_a_time(session: Session, node_id: str) -> None:
    # Taking and sharing each read the other's rows before writing their own: decided one at a
    # time per node (the node's row lock), or a take and a share could each miss the other.
    session.execute(select(Node.id).where(Node.id == node_id).with_for_update(key_share=True))


def take(session: Session, node_id: str, job_id: str, ttl_s: float) -> NodeBusy | None:
    """Take the node: None once it is this job's, else who is in the way. While only sharers are
    (their copies under way), the node stays claimed for this job -- commit the session even then:
    the claim is this job's place, ahead of every later sharer and taker."""
    _one_at_a_time(session, node_id)
    expires = utcnow() + timedelta(seconds=ttl_s)
    row = session.execute(select(NodeLock).where(NodeLock.node_id == node_id).with_for_update()).scalar_one_or_none()
    if row is None:
        row = NodeLock(node_id=node_id, job_id=job_id, expires_at=expires)
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            holder = session.scalar(select(NodeLock.job_id).where(NodeLock.node_id == node_id)) or "?"
            return NodeBusy(node_id, holder)
    elif row.job_id != job_id and row.expires_at > utcnow():
        return NodeBusy(node_id, row.job_id)
    else:
        row.job_id, row.acquired_at, row.expires_at = job_id, utcnow(), expires
    sharer = session.scalar(select(NodeShare.job_id).where(
        NodeShare.node_id == node_id, NodeShare.job_id != job_id, NodeShare.expires_at > utcnow()).limit(1))
    if sharer is None:
        return None
    row.expires_at = min(expires, utcnow() + timedelta(seconds=CLAIM_TTL_S))
    return NodeBusy(node_id, sharer)


def share(session: Session, node_id: str, job_id: str, ttl_s: float) -> str:
    """Share the node with other sharers (NodeBusy while another job has taken or claimed it). Returns the
    token that ``unshare`` needs: a later share by the same job (a newer run) replaces it."""
    _one_at_a_time(session, node_id)
    mine = session.get(NodeShare, (node_id, job_id))
    row = session.get(NodeLock, node_id)
    if row is not None and row.job_id != job_id and row.expires_at > utcnow():
        # A live share of ours (a re-run of this job's copy) is renewed: the other job was refused
        # the node while that share lived, so its row is only a claim, waiting for this very copy.
        if mine is None or mine.expires_at <= utcnow():
            raise NodeBusy(node_id, row.job_id)
    expires, token = utcnow() + timedelta(seconds=ttl_s), uuid.uuid4().hex
    if mine is None:
        session.add(NodeShare(node_id=node_id, job_id=job_id, token=token, expires_at=expires))
    else:
        mine.token, mine.expires_at = token, expires
    return token


def unshare(session: Session, node_id: str, job_id: str, token: str | None = None) -> None:
    """End the job's share of the node (only if it is still ``token``'s, when given)."""
    query = delete(NodeShare).where(NodeShare.node_id == node_id, NodeShare.job_id == job_id)
    session.execute(query if token is None else query.where(NodeShare.token == token))


def release(session: Session, node_id: str, job_id: str) -> None:
    """Whatever the job holds of the node."""
    session.execute(delete(NodeLock).where(NodeLock.node_id == node_id, NodeLock.job_id == job_id))
    unshare(session, node_id, job_id)
