"""Undoing a clone that did not finish: restart any source still down, remove everything made for
the clone (nodes, volumes, snapshots, leases). Used by the report; the watchdog reuses it."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import ipam, locks
from shared.config import get_settings
from shared.drivers import DriverError, get_driver
from shared.models import CloneJob, JobNode, Node, Snapshot, utcnow

log = logging.getLogger("envclone.compensation")


def ensure_sources_running(session: Session, job: CloneJob) -> list[str]:
    """Every source node this job stopped is brought back. Returns the problems it could not fix."""
    driver = get_driver()
    problems = []
    for jn in session.scalars(select(JobNode).where(JobNode.job_id == job.id)):
        if jn.quiesced_at is None or jn.restarted_at is not None:
            # Not stopped by us, or already brought back by us: since then another job may hold
            # the node down for its own snapshot, and starting it would tear that snapshot.
            locks.release(session, jn.source_node_id, job.id)
            continue
        try:
            driver.restart(jn.source_node_id, get_settings().health_timeout_s)
        except DriverError as exc:
            problems.append(f"{jn.name}: source could not be restarted: {exc}")
            continue
        jn.restarted_at = utcnow()
        jn.downtime_ms = int((jn.restarted_at - jn.quiesced_at).total_seconds() * 1000)
        locks.release(session, jn.source_node_id, job.id)
    return problems


def delete_snapshots(session: Session, job: CloneJob) -> None:
    driver = get_driver()
    for jn in session.scalars(select(JobNode).where(JobNode.job_id == job.id)):
        driver.delete_snapshot(jn.snapshot_id)
        row = session.get(Snapshot, jn.snapshot_id)
        if row is not None:
            row.state = "deleted"


def tear_down_clone(session: Session, job: CloneJob) -> None:
    """Remove the clone's nodes, volumes, snapshots and leases; keep the rows as a record."""
    driver = get_driver()
    for jn in session.scalars(select(JobNode).where(JobNode.job_id == job.id)):
        driver.destroy_node(jn.clone_node_id)
        ipam.release_node(session, jn.clone_node_id)
        node = session.get(Node, jn.clone_node_id)
        if node is not None:
            node.state = "destroyed"
    delete_snapshots(session, job)
    log.info("job=%s torn down the partial clone %s", job.id, job.target_name)
