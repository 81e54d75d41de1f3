"""A host's sweep: its agent makes what is on its disk match the database. Orchestration records
removals in rows (a failed clone's nodes destroyed, snapshots deleted, an environment gone) and
asks each host holding something to sweep; an agent also sweeps when it starts and on every
round, which is how a host that was down loses its leftovers when it comes back. Idempotent:
sweeping twice removes nothing more."""

from __future__ import annotations

import logging
from collections import Counter

from sqlalchemy import select

from shared import identity
from shared.clone.sources import restart_source
from shared.config import get_settings
from shared.db import session_scope
from shared.drivers import DriverError, get_driver
from shared.models import CloneJob, JobNode, Node, Snapshot, utcnow
from shared.states import JOB_DONE, NodeState, SnapshotState

log = logging.getLogger("envclone.sweep")


def _restore_sources(host: str) -> int:
    """Sources on this host that a finished job still holds down (its restart never ran here: the
    job was failed from elsewhere, e.g. because another host went down) come back."""
    done = 0
    with session_scope() as session:
        rows = session.scalars(
            select(JobNode).join(CloneJob, CloneJob.id == JobNode.job_id).join(Node, Node.id == JobNode.source_node_id)
            .where(CloneJob.state.in_([s.value for s in JOB_DONE]), Node.host == host,
                   JobNode.quiesced_at.is_not(None), JobNode.restarted_at.is_(None)).with_for_update(of=JobNode))
        for jn in rows:
            try:
                done += restart_source(session, jn)
            except DriverError as exc:
                log.error("job=%s node=%s sweep could not restart the source: %s", jn.job_id, jn.name, exc)
    return done


def _unwanted_nodes(host: str, on_disk: set[str]) -> set[str]:
    with session_scope() as session:
        rows = {n.id: n for n in session.scalars(select(Node).where(Node.id.in_(on_disk)))}
    for node_id in sorted(n for n in on_disk if n in rows and rows[n].host != host):
        # Data is never removed on a disagreement: a misnamed host (ENVCLONE_HOST_NAME) would lose it all.
        log.error("host=%s holds node %s that the database places on %s: left alone", host, node_id,
                  rows[node_id].host)
    # No row: its environment was deleted (node rows go with it); a row made before its volume is
    # never missing, so a node being created is never taken for a leftover.
    return {n for n in on_disk if n not in rows or (rows[n].state == NodeState.DESTROYED and rows[n].host == host)}


def _unwanted_snapshots(host: str, on_disk: set[str]) -> set[str]:
    """Snapshots no running job uses and no finished job keeps (retain_snapshots, keep_on_failure).
    A step that ended after its job did may have written its snapshot afterwards: it goes too."""
    with session_scope() as session:
        rows = {s.id: s for s in session.scalars(select(Snapshot).where(Snapshot.id.in_(on_disk)))}
        jobs = dict(session.execute(select(JobNode.snapshot_id, CloneJob).join(CloneJob, CloneJob.id == JobNode.job_id)
                                    .where(JobNode.snapshot_id.in_(on_disk))).all())
        live = {s for s, job in jobs.items() if not job.state.done}
        kept = {s for s, row in rows.items()
                if row.state == SnapshotState.READY and (row.host or host) == host and s in jobs
                and (jobs[s].options.get("retain_snapshots") or jobs[s].options.get("keep_on_failure"))}
    return on_disk - live - kept


def sweep_host() -> dict[str, int]:
    """One sweep of this agent's host; returns what it did."""
    host = get_settings().host_name
    driver = get_driver()
    restored = _restore_sources(host)
    nodes = _unwanted_nodes(host, driver.node_ids())
    owners = Counter(driver.node_owner(n) for n in driver.node_ids())
    for node_id in sorted(nodes):
        owner = driver.node_owner(node_id)
        try:
            driver.destroy_node(node_id)
        except (DriverError, OSError) as exc:  # the next sweep tries again; the others go on
            log.error("host=%s sweep could not remove node %s: %s", host, node_id, exc)
            continue
        owners[owner] -= 1
        if owner and owners[owner] <= 0 and not _account_in_use(owner):
            identity.remove_account_named(owner)
    snaps = _unwanted_snapshots(host, driver.snapshot_ids() | driver.partial_snapshot_ids())
    for snapshot_id in sorted(snaps):
        driver.delete_snapshot(snapshot_id)
    if nodes or snaps or restored:
        log.warning("host=%s sweep: %d node(s) and %d snapshot(s) removed, %d source(s) restored at %s",
                    host, len(nodes), len(snaps), restored, utcnow().isoformat())
    return {"nodes_removed": len(nodes), "snapshots_removed": len(snaps), "sources_restored": restored}


def _account_in_use(name: str) -> bool:
    """An environment with a live node on any host keeps its account (it may be making a node right
    now; and hosts that share one account database, as namespaces on one machine do, share it)."""
    with session_scope() as session:
        live = [s.value for s in NodeState if s != NodeState.DESTROYED]
        ids = session.scalars(select(Node.environment_id).distinct().where(Node.state.in_(live)))
        return any(identity.account_name(env_id) == name for env_id in ids)
