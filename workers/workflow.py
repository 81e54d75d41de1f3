"""Canvas builders and dispatch: all the API needs from the workers. The API imports this module
(task signatures by name, published on the app it is given), never the task bodies."""

from __future__ import annotations

from celery import Celery, chain, chord, group
from celery.canvas import Signature
from sqlalchemy import select
from sqlalchemy.orm import aliased

from shared import hosts
from shared.db import session_scope
from shared.models import Environment, JobNode, Node
from shared.states import CLONE_STEPS, Step
from workers.dispatcher import mark_dispatched


def _sig(app: Celery, name: str, *args: str | int, argsrepr: str) -> Signature:
    return app.signature(f"envclone.{name}", args=args, immutable=True).set(argsrepr=argsrepr)


# Where each step runs: the source's host holds the source (quiesce, snapshot, restart), the clone's
# host makes the clone (provision, assign_ips); snapshot and restart take the host's window queue.
_ON_SOURCE = {Step.QUIESCE, Step.SNAPSHOT, Step.RESTART}
_IN_WINDOW = {Step.SNAPSHOT, Step.RESTART}


def step_queue(step: Step, source_host: str, clone_host: str) -> str:
    host = source_host if step in _ON_SOURCE else clone_host
    return hosts.window_queue(host) if step in _IN_WINDOW else hosts.queue(host)


def clone_canvas(app: Celery, job_id: str, run: int) -> Signature:
    """chord(group(chain(steps of node) for node), report) -- explicit, so one-node jobs work too.
    Every step goes to the queue of the host whose node it touches; the report to any general worker."""
    source, clone = aliased(Node), aliased(Node)
    with session_scope() as session:
        nodes = session.execute(
            select(JobNode.source_node_id, JobNode.name, source.host, clone.host)
            .join(source, source.id == JobNode.source_node_id).join(clone, clone.id == JobNode.clone_node_id)
            .where(JobNode.job_id == job_id).order_by(JobNode.name)).all()
    chains = [
        chain(*[_sig(app, step, job_id, src, run, argsrepr=f"job={job_id[:8]} node={name} step={step}")
                .set(queue=step_queue(step, src_host, clone_host)) for step in CLONE_STEPS])
        for src, name, src_host, clone_host in nodes
    ]
    return chord(group(chains), _sig(app, "report", job_id, run, argsrepr=f"job={job_id[:8]} step=report"))


# Each dispatch publishes one small message and marks its outbox row once the broker has it
# (see workers.dispatcher); the worker that takes it builds the rest.
def dispatch_clone(app: Celery, job_id: str) -> None:
    """One publish and nothing else: the worker that takes the start task marks the outbox row, so a
    clone request costs one transaction (what was not taken within the grace period is sent again
    by the watchdog; a duplicate start finds its run's canvas published and stands down)."""
    # ignore_result: no one waits on it, and a result would have the publisher subscribe to its channel.
    _sig(app, "start_clone", job_id, argsrepr=f"job={job_id[:8]} step=start").apply_async(ignore_result=True)


def dispatch_create_environment(app: Celery, env_id: str) -> None:
    _sig(app, "create_level", env_id, 0, argsrepr=f"env={env_id[:8]} step=create").apply_async()
    mark_dispatched(Environment, env_id)


def dispatch_delete_environment(app: Celery, env_id: str) -> None:
    _sig(app, "delete_environment", env_id, argsrepr=f"env={env_id[:8]} step=delete").apply_async()
    mark_dispatched(Environment, env_id)


def dispatch_sweeps(app: Celery, names: set[str] | list[str]) -> None:
    """Ask each host's agent to make its disk match the rows (what was removed elsewhere in rows)."""
    for name in sorted(set(names)):
        app.signature("envclone.sweep").set(queue=hosts.queue(name), argsrepr=f"host={name} step=sweep").apply_async()
