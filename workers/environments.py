"""Environment tasks: create level by level, finish, delete. Bodies live in shared.environments."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from celery import Task, chord, group, shared_task

from shared import environments, hosts
from shared.clone.retry import RetryPolicy
from shared.db import retry_db
from shared.drivers import TransientDriverError
from workers.celery_app import TASK_OPTS
from workers.workflow import dispatch_sweeps

log = logging.getLogger("envclone.environments")
T = TypeVar("T")


def _unless_gone(fn: Callable[..., T], *args: object, **kw: object) -> T | None:
    """Run a creation body; None when the environment was deleted under it (not an error)."""
    try:
        return retry_db(fn)(*args, **kw)
    except environments.Gone as gone:
        log.info("%s", gone)
        return None


@shared_task(name="envclone.create_level", **TASK_OPTS)
def create_level(self: Task, env_id: str, level: int) -> None:
    """Create the nodes of one dependency level, then chain to the next level (or finish)."""
    try:
        nodes = retry_db(environments.level_node_ids)(env_id, level)
    except environments.Gone as gone:
        log.info("%s", gone)
        return
    if nodes is None:
        self.app.signature("envclone.finish_environment", args=(env_id,)).apply_async()
        return
    header = [self.app.signature("envclone.create_node", args=(env_id, node_id), immutable=True)
              .set(argsrepr=f"env={env_id[:8]} node={name} step=create", queue=hosts.queue(host))
              for node_id, name, host in nodes]
    chord(group(header), self.app.signature("envclone.create_level", args=(env_id, level + 1),
                                            immutable=True)).apply_async()


@shared_task(name="envclone.create_node", **TASK_OPTS)
def create_node(self: Task, env_id: str, node_id: str) -> None:
    delay = RetryPolicy.from_settings().delay(self.request.retries + 1)
    try:
        _unless_gone(environments.create_node, env_id, node_id, may_retry=delay is not None)
    except TransientDriverError as exc:
        raise self.retry(countdown=delay, exc=exc) from None


@shared_task(name="envclone.finish_environment", **TASK_OPTS)
def finish_environment(self: Task, env_id: str) -> str | None:
    outcome = _unless_gone(environments.finish_environment, env_id)
    if outcome is None:
        return None
    state, elsewhere = outcome
    dispatch_sweeps(self.app, elsewhere)
    return state


@shared_task(name="envclone.delete_environment", **TASK_OPTS)
def delete_environment(self: Task, env_id: str) -> None:
    dispatch_sweeps(self.app, retry_db(environments.delete_environment)(env_id))
