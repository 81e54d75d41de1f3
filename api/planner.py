"""Dry-run plans: what a clone would do, checked against the live state, touching nothing.
Downtime estimates come from this source node's own past clones when there are any, else from the
snapshot method and volume size.

Leaks are predicted from the declared configs only (the volumes' files are not read): a config value
that names a source node's address, host:port or password literally rather than through a template.
In a node's config such a value lands in its stack's config files, which the rewrite covers
(``rewritten``: listed because a literal there is what an app copies into files nobody declares); in
an on_clone config it is written after the rewrite, so the leak scan will find it (``fail``, a
conflict, or ``warn``, as on_leak says)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.clone import masking, neutralize
from shared.errors import Conflict
from shared.leaks import Needles, literal_kinds
from shared.models import JobNode, Node
from shared.planning import check_clone
from shared.stacks import CATALOG
from shared.states import CLONE_STEPS, Consistency

STOP_START_MS = 300  # stop + start of a stack, the floor of any window
COPY_BYTES_PER_MS = 200_000  # ~200 MB/s: a conservative local-disk copy rate
NODE_START_MS = 1_500  # provision bookkeeping + start + health of a clone node
TRANSFER_BYTES_PER_MS = 100_000  # ~100 MB/s agent to agent: a conservative 1 Gbit/s link


def _measured_downtime(session: Session, source_node_id: str) -> int | None:
    return session.scalar(
        select(JobNode.downtime_ms).where(JobNode.source_node_id == source_node_id,
                                          JobNode.downtime_ms.is_not(None))
        .order_by(JobNode.id.desc()).limit(1))


def predicted_leaks(nodes: list[Node], on_clone: Iterable[dict[str, Any]], on_leak: str) -> list[dict[str, Any]]:
    needles = Needles.of((n.address, n.port, n.credentials) for n in nodes)
    found = []
    for node in nodes:
        if CATALOG[node.stack].config_files:  # else its config is written to no file at all
            found += [{"node": node.name, "key": key, "kind": kind, "origin": "config", "outcome": "rewritten"}
                      for key, value in sorted(node.config.items()) for kind in sorted(literal_kinds(value, needles))]
    for action in map(neutralize.Action.parse, on_clone):
        if action.kind == "config":
            found += [{"node": action.node, "key": key, "kind": kind, "origin": "on_clone", "outcome": on_leak}
                      for key, value in sorted(action.payload.items())
                      for kind in sorted(literal_kinds(value, needles))]
    return found


def dry_run_plan(session: Session, tenant: str, source: str, target: str,
                 consistency: Consistency = Consistency.ONLINE, on_clone: list[dict[str, Any]] | None = None,
                 on_leak: str = "fail", mask: list[dict[str, Any]] | None = None,
                 target_host: str | None = None, placement: dict[str, str] | None = None) -> dict[str, Any]:
    plan = check_clone(session, tenant, source, target, target_host, placement)
    reflink = plan.reflink
    nodes, longest = [], 0
    assert plan.source is not None  # check_clone answers 404 otherwise
    neutralize.check(on_clone or [], {n.name: n.stack for n in plan.source.nodes}, "on_clone")
    masking.check(mask or [], {n.name: n.stack for n in plan.source.nodes}, "mask")
    leaks = predicted_leaks(list(plan.source.nodes), [*plan.source.on_clone, *(on_clone or [])], on_leak)
    if any(leak["outcome"] == "fail" for leak in leaks):
        plan.conflicts.append(Conflict("leak_predicted", "an on_clone config names the source literally; the "
                                       "leak scan will fail the clone (on_leak=fail)", "on_clone"))
    for node in plan.source.nodes:
        size = node.size_bytes
        online = consistency == Consistency.ONLINE and CATALOG[node.stack].online_copy_supported
        window = STOP_START_MS + (0 if reflink else size // COPY_BYTES_PER_MS)
        downtime = 0 if online else (_measured_downtime(session, node.id) or window)
        host = plan.hosts.get(node.name, node.host)
        across = size if host != node.host else 0  # the snapshot goes agent to agent, then a local copy
        duration = (downtime + (0 if reflink and not across else size // COPY_BYTES_PER_MS)
                    + across // TRANSFER_BYTES_PER_MS + NODE_START_MS)
        longest = max(longest, duration)
        nodes.append({"name": node.name, "stack": node.stack, "source_address": node.address,
                      "address": plan.addresses.get(node.name), "steps": list(CLONE_STEPS), "bytes": size,
                      "consistency": Consistency.ONLINE if online else Consistency.STOP,
                      "estimated_downtime_ms": downtime, "source_host": node.host, "host": host,
                      "bytes_across_hosts": across, "estimated_ms": duration})
    return {
        "source": source, "target": target, "ok": not plan.conflicts, "consistency": consistency, "nodes": nodes,
        "addresses": [n["address"] for n in nodes if n["address"]],
        "disk_bytes_needed": plan.bytes_needed, "disk_bytes_free": plan.bytes_free,
        "snapshot_method": "reflink" if reflink else "copy",
        "estimated_duration_ms": longest,
        "predicted_leaks": leaks,
        "conflicts": [{"code": c.code, "message": c.message, "field": c.field} for c in plan.conflicts],
    }
