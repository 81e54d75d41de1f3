"""Dry-run plans: what a clone would do, checked against the live state, touching nothing.
Downtime estimates come from this source node's own past clones when there are any, else from the
snapshot method and volume size."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import JobNode
from shared.planning import check_clone
from shared.stacks import CATALOG
from shared.states import CLONE_STEPS, Consistency

STOP_START_MS = 300  # stop + start of a stack, the floor of any window
COPY_BYTES_PER_MS = 200_000  # ~200 MB/s: a conservative local-disk copy rate
NODE_START_MS = 1_500  # provision bookkeeping + start + health of a clone node


def _measured_downtime(session: Session, source_node_id: str) -> int | None:
    return session.scalar(
        select(JobNode.downtime_ms).where(JobNode.source_node_id == source_node_id,
                                          JobNode.downtime_ms.is_not(None))
        .order_by(JobNode.id.desc()).limit(1))


def dry_run_plan(session: Session, tenant: str, source: str, target: str,
                 consistency: Consistency = Consistency.ONLINE) -> dict[str, Any]:
    plan = check_clone(session, tenant, source, target)
    reflink = plan.reflink
    nodes, longest = [], 0
    assert plan.source is not None  # check_clone answers 404 otherwise
    for node in plan.source.nodes:
        size = node.size_bytes
        online = consistency == Consistency.ONLINE and CATALOG[node.stack].online_copy_supported
        window = STOP_START_MS + (0 if reflink else size // COPY_BYTES_PER_MS)
        downtime = 0 if online else (_measured_downtime(session, node.id) or window)
        duration = downtime + (0 if reflink else size // COPY_BYTES_PER_MS) + NODE_START_MS
        longest = max(longest, duration)
        nodes.append({"name": node.name, "stack": node.stack, "source_address": node.address,
                      "address": plan.addresses.get(node.name), "steps": list(CLONE_STEPS), "bytes": size,
                      "consistency": Consistency.ONLINE if online else Consistency.STOP,
                      "estimated_downtime_ms": downtime})
    return {
        "source": source, "target": target, "ok": not plan.conflicts, "consistency": consistency, "nodes": nodes,
        "addresses": [n["address"] for n in nodes if n["address"]],
        "disk_bytes_needed": plan.bytes_needed, "disk_bytes_free": plan.bytes_free,
        "snapshot_method": "reflink" if reflink else "copy",
        "estimated_duration_ms": longest,
        "conflicts": [{"code": c.code, "message": c.message, "field": c.field} for c in plan.conflicts],
    }
