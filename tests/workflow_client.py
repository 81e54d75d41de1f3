"""Driving the back end the way the API does: plan in one transaction, commit, dispatch; then wait
on the database with deadlines."""

from __future__ import annotations

from typing import Any

import redis
from sqlalchemy import func, select

from shared import ipam
from shared.db import session_scope
from shared.drivers import get_driver
from shared.models import AddressLease, CloneJob, Environment, Node
from shared.planning import NodeRequest, find_environment, plan_clone, plan_environment
from shared.states import JOB_DONE, EnvState, NodeState
from tests.helpers import wait_for
from tests.stack import publisher
from workers.workflow import dispatch_clone, dispatch_create_environment, dispatch_delete_environment

TENANT = "acme"
# A small shop: a database, a cache, and an app whose config points at both.
SHOP = [
    {"name": "db", "stack": "postgres"},
    {"name": "cache", "stack": "valkey"},
    {"name": "web", "stack": "webapp", "config": {"DATABASE_URL": "{{db.url}}", "CACHE_URL": "{{cache.url}}"}},
]


def create_environment(name: str, nodes: list[dict[str, Any]], timeout: float = 120,
                       egress: list[dict[str, Any]] | None = None,
                       on_clone: list[dict[str, Any]] | None = None) -> Environment:
    with session_scope() as session:
        env = plan_environment(session, TENANT, name, [NodeRequest(**n) for n in nodes], egress, on_clone)
        env_id = env.id
    dispatch_create_environment(publisher(), env_id)

    def settled() -> Environment | None:
        with session_scope() as session:
            env = session.get(Environment, env_id)
            if env.state in ("running", "failed"):
                env.nodes  # noqa: B018 - load before the session closes
                session.expunge_all()
                return env
        return None

    env = wait_for(settled, timeout=timeout, what=f"environment {name} to be created")
    assert env.state == "running", env.error
    return env


def start_clone(source: str, target: str, **options: Any) -> str:
    with session_scope() as session:
        job = plan_clone(session, TENANT, source, target, options)
        job_id = job.id
    dispatch_clone(publisher(), job_id)
    return job_id


def plan_only(source: str, target: str, options: dict[str, Any], node: str = "db") -> tuple[str, str, int]:
    """Plan a clone without dispatching it: (job id, address, port) the clone's ``node`` will get,
    so a test can watch that address before anything of the clone exists."""
    with session_scope() as session:
        job = plan_clone(session, TENANT, source, target, options)
        clone = next(n for n in session.scalars(select(Node).where(Node.environment_id == job.target_environment_id))
                     if n.name == node)
        return job.id, clone.address, clone.port


def wait_job(job_id: str, timeout: float = 180) -> CloneJob:
    def done() -> CloneJob | None:
        with session_scope() as session:
            job = session.get(CloneJob, job_id)
            if job.state in JOB_DONE:
                job.steps, job.nodes  # noqa: B018
                session.expunge_all()
                return job
        return None

    return wait_for(done, timeout=timeout, what=f"job {job_id} to finish")


def clone(source: str, target: str, timeout: float = 180, **options: Any) -> CloneJob:
    return wait_job(start_clone(source, target, **options), timeout)


def environment(name: str) -> Environment | None:
    with session_scope() as session:
        env = find_environment(session, TENANT, name)
        if env is not None:
            env.nodes  # noqa: B018
            session.expunge_all()
        return env


def delete_environment(name: str, timeout: float = 60) -> None:
    env = environment(name)
    assert env is not None
    dispatch_delete_environment(publisher(), env.id)
    wait_for(lambda: environment(name) is None, timeout=timeout, what=f"environment {name} to be deleted")


def valkey(env: Environment, name: str = "cache") -> redis.Redis:
    """A client of the environment's valkey node, with the node's own credentials."""
    return redis.Redis.from_url(get_driver().url(next(n.id for n in env.nodes if n.name == name)))


def valkey_at(address: str, **kw: object) -> redis.Redis:
    """A client of the live valkey node at ``address``, with that node's credentials."""
    with session_scope() as session:
        node_id = session.scalar(select(Node.id).where(Node.address == address, Node.stack == "valkey",
                                                       Node.state != NodeState.DESTROYED))
    assert node_id, f"no valkey node at {address}"
    return redis.Redis.from_url(get_driver().url(node_id), **kw)


def lease_count() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(AddressLease))


def parked_job(tenant: str, name: str) -> str:
    """A clone job of ``tenant`` that stays queued: planned, never sent to a worker (its source is
    rows only, no node process), so its event stream stays open until the client or server ends it."""
    with session_scope() as session:
        plan_environment(session, tenant, name, [NodeRequest("cache", "valkey")]).state = EnvState.RUNNING
    with session_scope() as session:
        return plan_clone(session, tenant, name, f"{name}-copy", {}).id


def drop_parked(tenant: str) -> None:
    """Remove the rows parked_job made for ``tenant`` (there is nothing else to remove)."""
    with session_scope() as session:
        for job in session.scalars(select(CloneJob).where(CloneJob.tenant == tenant)):
            session.delete(job)
        for env in session.scalars(select(Environment).where(Environment.tenant == tenant)):
            for node in env.nodes:
                ipam.release_node(session, node.id)
            session.delete(env)
