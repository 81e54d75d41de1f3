"""Environment lifecycle on the workers: create (level by level, so a node's config can name the
URL of a node created before it) and delete (stop, destroy, free leases)."""

from __future__ import annotations

import logging

from celery import Task, chord, group
from sqlalchemy import select

from shared import ipam, templates
from shared.db import session_scope
from shared.drivers import DriverError, NodeSpec, TransientDriverError, get_driver
from shared.models import ENV_FAILED, ENV_RUNNING, CloneJob, Environment, Node
from workers.celery_app import celery_app
from workers.compensation import delete_snapshots
from workers.step_runner import backoff
from workers.steps import TASK_OPTS

log = logging.getLogger("envclone.environments")


def _levels(env: Environment) -> list[list[str]]:
    deps = {n.name: templates.references(n.config) - {n.name} for n in env.nodes}
    return templates.creation_levels(deps)


def _lookup(env: Environment):  # noqa: ANN202
    driver = get_driver()
    by_name = {n.name: n for n in env.nodes}

    def lookup(name: str, attr: str) -> str:
        node = by_name[name]
        if attr == "url":
            return driver.url(node.id)
        if attr == "port":
            return str(node.port)
        return node.address  # address | host

    return lookup


@celery_app.task(name="envclone.create_level", **TASK_OPTS)
def create_level(self: Task, env_id: str, level: int) -> None:
    """Create the nodes of one dependency level, then chain to the next level (or finish)."""
    with session_scope() as session:
        env = session.get(Environment, env_id)
        levels = _levels(env)
        if level >= len(levels) or env.state == ENV_FAILED:
            finish_environment.delay(env_id)
            return
        ids = [n.id for n in env.nodes if n.name in levels[level]]
        names = {n.id: n.name for n in env.nodes}
    header = [create_node.si(env_id, nid).set(argsrepr=f"env={env_id[:8]} node={names[nid]} step=create")
              for nid in ids]
    chord(group(header), create_level.si(env_id, level + 1)).apply_async()


@celery_app.task(name="envclone.create_node", **TASK_OPTS)
def create_node(self: Task, env_id: str, node_id: str) -> None:
    with session_scope() as session:
        env = session.get(Environment, env_id)
        node = session.get(Node, node_id)
        if node.state == "running":
            return
        config = templates.resolve(node.config, _lookup(env))
        spec = NodeSpec(node.id, node.stack, node.address, node.port, config)
    try:
        get_driver().create_node(spec)
        state, error = "running", None
    except TransientDriverError as exc:
        from shared.config import get_settings

        if self.request.retries < get_settings().retry_max:
            raise self.retry(countdown=backoff(self.request.retries), exc=exc) from None
        state, error = "failed", str(exc)
    except DriverError as exc:
        state, error = "failed", str(exc)
    with session_scope() as session:
        node = session.get(Node, node_id)
        node.state = state
        if error:
            env = session.get(Environment, env_id)
            env.state, env.error = ENV_FAILED, f"{node.name}: {error}"
    log.info("env=%s node=%s create state=%s%s", env_id, spec.node_id, state, f" error={error!r}" if error else "")


@celery_app.task(name="envclone.finish_environment", **TASK_OPTS)
def finish_environment(self: Task, env_id: str) -> str:
    with session_scope() as session:
        env = session.execute(select(Environment).where(Environment.id == env_id).with_for_update()).scalar_one()
        if all(n.state == "running" for n in env.nodes) and env.state != ENV_FAILED:
            env.state = ENV_RUNNING
            return env.state
        env.state = ENV_FAILED
        driver = get_driver()
        for node in env.nodes:  # a half-made environment is not left behind
            driver.destroy_node(node.id)
            ipam.release_node(session, node.id)
            node.state = "destroyed"
        return env.state


@celery_app.task(name="envclone.delete_environment", **TASK_OPTS)
def delete_environment(self: Task, env_id: str) -> None:
    driver = get_driver()
    with session_scope() as session:
        env = session.get(Environment, env_id)
        if env is None:
            return
        for node in env.nodes:
            driver.destroy_node(node.id)
            ipam.release_node(session, node.id)
        # Snapshots kept for a clone (retain_snapshots, keep_on_failure) go with it.
        for job in session.scalars(select(CloneJob).where(CloneJob.target_environment_id == env_id)):
            delete_snapshots(session, job)
        session.delete(env)
    log.info("env=%s deleted", env_id)
