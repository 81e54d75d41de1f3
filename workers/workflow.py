"""Canvas builders and dispatch: all the API needs from the workers. The API imports this module
(task signatures by name, published on the app it is given), never the task bodies."""

from __future__ import annotations

from celery import Celery, chain, chord, group
from celery.canvas import Signature
from sqlalchemy import select

from shared.db import session_scope
from shared.models import Environment, JobNode
from shared.states import CLONE_STEPS
from workers.dispatcher import mark_dispatched


def _sig(app: Celery, name: str, *args: str | int, argsrepr: str) -> Signature:
    return app.signature(f"envclone.{name}", args=args, immutable=True).set(argsrepr=argsrepr)


def clone_canvas(app: Celery, job_id: str, run: int) -> Signature:
    """chord(group(chain(steps of node) for node), report) -- explicit, so one-node jobs work too."""
    with session_scope() as session:
        nodes = [(jn.source_node_id, jn.name) for jn in
                 session.scalars(select(JobNode).where(JobNode.job_id == job_id).order_by(JobNode.name))]
    chains = [
        chain(*[_sig(app, step, job_id, src, run, argsrepr=f"job={job_id[:8]} node={name} step={step}")
                for step in CLONE_STEPS])
        for src, name in nodes
    ]
    return chord(group(chains), _sig(app, "report", job_id, run, argsrepr=f"job={job_id[:8]} step=report"))


# Each dispatch publishes one small message and marks its outbox row once the broker has it
# (see workers.dispatcher); the worker that takes it builds the rest.
def dispatch_clone(app: Celery, job_id: str) -> None:
    """One publish and nothing else: the worker that takes the start task marks the outbox row, so a
    clone request costs one transaction (what was not taken within the grace period is sent again
    by the watchdog; a duplicate start finds its run's canvas published and stands down)."""
    _sig(app, "start_clone", job_id, argsrepr=f"job={job_id[:8]} step=start").apply_async()


def dispatch_create_environment(app: Celery, env_id: str) -> None:
    _sig(app, "create_level", env_id, 0, argsrepr=f"env={env_id[:8]} step=create").apply_async()
    mark_dispatched(Environment, env_id)


def dispatch_delete_environment(app: Celery, env_id: str) -> None:
    _sig(app, "delete_environment", env_id, argsrepr=f"env={env_id[:8]} step=delete").apply_async()
    mark_dispatched(Environment, env_id)
