"""Canvas builders and dispatch: the only things the API needs from the workers. The API imports
this module (task signatures by name), never the task bodies."""

from __future__ import annotations

from celery import chain, chord, group
from celery.canvas import Signature
from sqlalchemy import select

from shared.db import session_scope
from shared.models import CLONE_STEPS, CloneJob, Environment, JobNode
from workers.celery_app import celery_app
from workers.dispatcher import mark_dispatched


def _sig(name: str, *args: str | int, argsrepr: str) -> Signature:
    return celery_app.signature(f"envclone.{name}", args=args, immutable=True).set(argsrepr=argsrepr)


def clone_canvas(job_id: str) -> Signature:
    """chord(group(chain(steps of node) for node), report) -- explicit, so one-node jobs work too."""
    with session_scope() as session:
        run = session.get(CloneJob, job_id).run
        nodes = [(jn.source_node_id, jn.name) for jn in
                 session.scalars(select(JobNode).where(JobNode.job_id == job_id).order_by(JobNode.name))]
    chains = [
        chain(*[_sig(step, job_id, src, run, argsrepr=f"job={job_id[:8]} node={name} step={step}")
                for step in CLONE_STEPS])
        for src, name in nodes
    ]
    return chord(group(chains), _sig("report", job_id, run, argsrepr=f"job={job_id[:8]} step=report"))


# Each dispatch marks its outbox row once the broker has the message (see workers.dispatcher).
def dispatch_clone(job_id: str) -> str:
    result = clone_canvas(job_id).apply_async()
    mark_dispatched(CloneJob, job_id)
    return result.id


def dispatch_create_environment(env_id: str) -> None:
    _sig("create_level", env_id, 0, argsrepr=f"env={env_id[:8]} step=create").apply_async()
    mark_dispatched(Environment, env_id)


def dispatch_delete_environment(env_id: str) -> None:
    _sig("delete_environment", env_id, argsrepr=f"env={env_id[:8]} step=delete").apply_async()
    mark_dispatched(Environment, env_id)
