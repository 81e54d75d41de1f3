"""Environment lifecycle on the workers: create (level by level, so a node's config can name the
URL of a node created before it), finish, delete, and bringing back nodes that died."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import fence, hosts, identity, ipam, templates
from shared.clone.outcome import delete_snapshots, job_hosts
from shared.config import get_settings
from shared.db import session_scope
from shared.drivers import DriverError, NodeSpec, TransientDriverError, get_driver
from shared.models import CloneJob, Environment, EnvironmentEvent, JobNode, Node
from shared.stacks import CATALOG
from shared.states import EnvState, NodeState

log = logging.getLogger("envclone.environments")


def levels(env: Environment) -> list[list[str]]:
    """Node names grouped so that each level only references nodes of earlier levels."""
    return templates.creation_levels({n.name: templates.references(n.config) - {n.name} for n in env.nodes})


class Gone(Exception):
    """The environment was deleted, or is being deleted, under a creation task: creation stops there
    (the delete cleans up; what the task itself made after the delete looked, it destroys)."""

    def __init__(self, env_id: str) -> None:
        super().__init__(f"env={env_id} is deleted or being deleted: its creation stops")


def _wanted(env: Environment | None) -> bool:
    return env is not None and env.state != EnvState.DELETING


def level_node_ids(env_id: str, level: int) -> list[tuple[str, str, str]] | None:
    """(node id, name, host) of one creation level; None once every level is made (or the environment failed)."""
    with session_scope() as session:
        env = session.get(Environment, env_id)
        if not _wanted(env):
            raise Gone(env_id)
        all_levels = levels(env)
        if level >= len(all_levels) or env.state == EnvState.FAILED:
            return None
        return [(n.id, n.name, n.host) for n in env.nodes if n.name in all_levels[level]]


def template_lookup(env: Environment) -> Callable[[str, str], str]:
    by_name = {n.name: n for n in env.nodes}

    def lookup(name: str, attr: str) -> str:
        node = by_name[name]
        if attr == "url":  # with credentials: this is a config, not a response
            return CATALOG[node.stack].url(node.address, node.port, node.credentials, secret=True)
        if attr == "port":
            return str(node.port)
        return node.address  # address | host

    return lookup


def fence_environment(env_id: str) -> str:
    """(Re)write the environment's kernel fence (its nodes reach each other and its egress, nothing
    else) before any of its processes starts; record and return the status. With
    ENVCLONE_REQUIRE_FENCE a fence that cannot be set up refuses the environment (RuntimeError)."""
    with session_scope() as session:
        env = session.get(Environment, env_id)
        if not _wanted(env):
            raise Gone(env_id)  # deleted meanwhile: no account or fence is made for it again
        own = [n.address for n in env.nodes]
        egress = [fence.Egress(e["cidr"], tuple(e.get("ports", ()))) for e in env.egress]
    account = identity.ensure_account(env_id)
    uid = identity.uid_of(env_id) if account else None
    try:
        if uid is None:
            raise fence.FenceUnavailable(fence.unavailable_reason() or "the environment has no account of its own")
        fence.apply(uid, own, egress)
        status = fence.ENFORCED
    except fence.FenceUnavailable as exc:
        status = f"unavailable: {exc}"
    with session_scope() as session:
        session.get(Environment, env_id).fence = status
    if status != fence.ENFORCED and get_settings().require_fence:
        raise RuntimeError(f"the network fence is required (ENVCLONE_REQUIRE_FENCE) but {status}")
    return status


def rebuild_fences() -> int:
    """After a restart of the machine (or a flushed ruleset) the fence of every environment with a
    node on this host comes back (each host's kernel fences its own nodes)."""
    with session_scope() as session:
        ids = list(session.scalars(select(Environment.id).distinct().join(Node, Node.environment_id == Environment.id)
                                   .where(Environment.state != EnvState.DELETING,
                                          Node.host == get_settings().host_name)))
    for env_id in ids:
        try:
            fence_environment(env_id)
        except Gone:
            continue  # deleted meanwhile: its delete removes its fence
        except RuntimeError as exc:
            log.error("env=%s fence: %s", env_id, exc)
    return len(ids)


def _locked(session: Session, env_id: str) -> Environment | None:
    return session.execute(select(Environment).where(Environment.id == env_id).with_for_update()).scalar_one_or_none()


def _abandon(env_id: str, node_id: str) -> NoReturn:
    """The environment went away under this creation: destroy what this task may have made (the
    delete may have looked before it existed), then stop."""
    get_driver().destroy_node(node_id)
    identity.remove_account(env_id)  # and the account (and fence) this task may have made for it
    raise Gone(env_id)


def create_node(env_id: str, node_id: str, may_retry: bool) -> None:
    """Make and start one node. TransientDriverError escapes only while ``may_retry``; Gone when the
    environment was deleted meanwhile (and then nothing this task made is left)."""
    with session_scope() as session:
        env, node = session.get(Environment, env_id), session.get(Node, node_id)
        if not _wanted(env) or node is None:
            _abandon(env_id, node_id)
        if node.state == NodeState.RUNNING:
            return
        config = templates.resolve(node.config, template_lookup(env))
        spec_args = (node.id, node.stack, node.address, node.port, config, dict(node.credentials))
    driver = get_driver()
    size, error = 0, None
    try:
        try:
            fence_environment(env_id)
        except Gone:
            _abandon(env_id, node_id)
        spec = NodeSpec(*spec_args, owner=identity.ensure_account(env_id))
        driver.create_node(spec)
        size = driver.volume_size(node_id)
    except RuntimeError as exc:  # no account could be made for the environment, or no fence
        error = str(exc)
    except TransientDriverError as exc:
        if may_retry:
            raise
        error = str(exc)
    except (DriverError, OSError) as exc:
        error = str(exc)
    with session_scope() as session:
        # Under the row lock: a delete committed before this sees DELETING (or no row) here; one
        # committed after finds the node running and destroys it.
        env, node = _locked(session, env_id), session.get(Node, node_id)
        wanted = _wanted(env) and node is not None
        if wanted:
            node.state = NodeState.FAILED if error else NodeState.RUNNING
            node.size_bytes = size
            if error:
                env.state, env.error = EnvState.FAILED, f"{node.name}: {error}"
    if not wanted:
        _abandon(env_id, node_id)
    log.info("env=%s node=%s create state=%s%s", env_id, node_id, node.state, f" error={error!r}" if error else "")


def _destroy(session: Session, nodes: list[Node]) -> set[str]:
    """Destroy nodes: those on this worker's own host at once, the others by their host's sweep
    (their rows say destroyed, or are gone). Returns the other hosts, to be asked to sweep."""
    driver, elsewhere = get_driver(), set()
    for node in nodes:
        if hosts.is_local(node.host):
            driver.destroy_node(node.id)
        else:
            elsewhere.add(node.host)
        ipam.release_node(session, node.id)
        node.state = NodeState.DESTROYED
    return elsewhere


def finish_environment(env_id: str) -> tuple[EnvState, set[str]]:
    """The environment's outcome, and the hosts that must sweep what a failed creation left."""
    with session_scope() as session:
        env = _locked(session, env_id)
        if not _wanted(env):
            raise Gone(env_id)
        if all(n.state == NodeState.RUNNING for n in env.nodes) and env.state != EnvState.FAILED:
            env.state = EnvState.RUNNING
            return env.state, set()
        env.state = EnvState.FAILED
        elsewhere = _destroy(session, list(env.nodes))  # a half-made environment is not left behind
        if not elsewhere:
            identity.remove_account(env_id)
        return env.state, elsewhere


def delete_environment(env_id: str) -> set[str]:
    """Delete the environment; returns the other hosts that held its nodes (they sweep them away)."""
    with session_scope() as session:
        env = session.get(Environment, env_id)
        if env is None:
            return set()
        elsewhere = _destroy(session, list(env.nodes))
        # Snapshots kept for a clone (retain_snapshots, keep_on_failure) go with it.
        for job in session.scalars(select(CloneJob).where(CloneJob.target_environment_id == env_id)):
            delete_snapshots(session, job)
            elsewhere |= {h for h in job_hosts(job.id, session) if not hosts.is_local(h)}
        if not elsewhere:
            identity.remove_account(env_id)  # before the row goes: a deleted environment has no account left
        session.delete(env)
    log.info("env=%s deleted", env_id)
    return elsewhere


def reconcile_nodes() -> int:
    """Restart this host's nodes that should run but do not (not those a job holds down on purpose)."""
    settings = get_settings()
    driver, fixed = get_driver(), 0
    with session_scope() as session:
        # Only what a job stopped: a node locked by an online copy serves, and if it died it comes back.
        down_on_purpose = set(session.scalars(select(JobNode.source_node_id).where(
            JobNode.quiesced_at.is_not(None), JobNode.restarted_at.is_(None))))
        rows = session.execute(select(Node, Environment).join(Environment, Environment.id == Node.environment_id)
                               .where(Node.state == NodeState.RUNNING, Environment.state == EnvState.RUNNING,
                                      Node.host == settings.host_name)).all()
        for node, env in rows:
            if node.id in down_on_purpose or driver.health(node.id).running:
                continue
            try:
                driver.restart(node.id, settings.health_timeout_s)
                message = f"node {node.name} was not running; restarted"
            except DriverError as exc:
                message = f"node {node.name} was not running; restart failed: {exc}"
            session.add(EnvironmentEvent(environment_id=env.id, kind="node_restarted", message=message))
            log.warning("env=%s node=%s %s", env.name, node.name, message)
            fixed += 1
    return fixed
