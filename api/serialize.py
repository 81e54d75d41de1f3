"""Rows to response bodies. Everything here reads the database: no driver, no disk, no worker."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import object_session

from shared.clone import masking, safety
from shared.models import CloneJob, Environment
from shared.states import CLONE_STEPS, JobState, NodeState


def environment(env: Environment, source_name: str | None = None) -> dict[str, Any]:
    return {
        "name": env.name,
        "state": env.state,
        "fence": env.fence,
        "egress": env.egress,
        "on_clone": env.on_clone,
        "source": source_name,
        "error": env.error,
        "created_at": env.created_at,
        "nodes": [{"name": n.name, "stack": n.stack, "host": n.host, "address": n.address, "port": n.port,
                   "state": n.state, "url": n.url if NodeState(n.state).has_process else None} for n in env.nodes],
    }


def job(row: CloneJob, target: Environment | None = None) -> dict[str, Any]:
    """``target``: the job's target environment when the caller holds it (else it is looked up)."""
    session = object_session(row)
    if target is None and session is not None and row.target_environment_id:
        target = session.get(Environment, row.target_environment_id)
    order = {s: i for i, s in enumerate(CLONE_STEPS)}
    nodes = []
    for jn in row.nodes:
        steps = sorted((s for s in row.steps if s.source_node_id == jn.source_node_id), key=lambda s: order[s.step])
        nodes.append({
            "name": jn.name,
            "steps": [{"step": s.step, "host": s.host, "state": s.state, "attempts": s.attempts,
                       "started_at": s.started_at, "finished_at": s.finished_at, "error": s.error} for s in steps],
            "downtime_ms": jn.downtime_ms,
            "bytes_copied": jn.bytes_copied,
            "bytes_total": jn.bytes_total,
        })
    # on_clone is reported as the actions run (counts and key names; the SQL and values stay in the rows).
    # The mask seed is a secret of the clone (with it, a fake can be matched to a guessed value).
    options = {k: v for k, v in row.options.items() if k not in ("faults", "on_clone", "mask_seed")}
    # Collected when the job ends; from the steps' records while it runs.
    leaks, actions = (row.leaks, row.actions) if JobState(row.state).done else safety.collect(row.steps)
    masked = row.masked if JobState(row.state).done else masking.collect(row.steps)
    fence = target.fence if target is not None else None
    return {
        "id": row.id, "state": row.state, "fence": fence,
        "source": row.source_name, "target": row.target_name,
        "percent": row.percent, "run": row.run, "error": row.error, "options": options,
        "created_at": row.created_at, "started_at": row.started_at, "finished_at": row.finished_at,
        "rewrites": row.rewrites, "leaks": leaks, "actions": actions, "masked": masked,
        "safety": safety.report(row.steps, fence, row.options.get("on_leak"), leaks, actions, masked),
        "nodes": nodes,
    }


def to_json(model: Any) -> Any:
    """A pydantic model instance validated from our dict, dumped as JSON-ready data."""
    return model.model_dump(mode="json")
