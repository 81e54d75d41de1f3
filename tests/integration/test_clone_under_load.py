"""Clones under a real client's load, for each stack and each consistency mode, through a real
worker: the copy is one consistent moment holding every transaction acknowledged before it was
taken (stop mode: before the source stopped; online: before the snapshot step began), an online
clone costs the clients not one failed transaction or refused connection, and after a stop-mode
window the source serves the same clients again."""

from __future__ import annotations

import shutil
import subprocess
import time
from datetime import UTC, datetime

import pytest

from shared.drivers import get_driver
from shared.stacks.mariadb import mariadb_binaries
from tests.helpers import wait_for
from tests.loads import Load, Pairs, Tpcb, Transfers
from tests.stack import Backend
from tests.workflow_client import clone, create_environment, delete_environment, environment

pytestmark = [pytest.mark.integration, pytest.mark.long]

BACKEND = {"pool": "127.119.0.0/16"}  # a pool no other module uses
LOADS: dict[str, type[Load]] = {"postgres": Tpcb, "valkey": Pairs, "mariadb": Transfers}
PGBENCH = shutil.which("pgbench")


def _missing(stack: str) -> str | None:
    if stack == "postgres" and PGBENCH is None:
        return "pgbench is not installed"
    if stack == "mariadb":
        try:
            mariadb_binaries()
        except FileNotFoundError as exc:
            return str(exc)
    return None


def _wall(at: datetime) -> float:
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


@pytest.mark.parametrize("mode", ["stop", "online"])
@pytest.mark.parametrize("stack", list(LOADS))
def test_a_clone_under_load_holds_every_transaction_acknowledged_before_it_was_taken(
        backend: Backend, stack: str, mode: str) -> None:
    if (why := _missing(stack)) is not None:
        pytest.skip(why)
    name = f"busy-{stack}-{mode}"
    try:
        _clone_under_load(stack, mode, name)
    finally:
        for env in (f"{name}-copy", name):
            if environment(env) is not None:
                delete_environment(env)


def _clone_under_load(stack: str, mode: str, name: str) -> None:
    src = create_environment(name, [{"name": "db", "stack": stack}])
    url = get_driver().url(src.nodes[0].id)
    if stack == "postgres":
        subprocess.run([PGBENCH, "-i", "-s", "1", "-q", url], check=True, capture_output=True, timeout=120)
    load = LOADS[stack](url)
    load.setup()
    load.start()
    try:
        wait_for(lambda: len(load.acks) > 50, timeout=30, what="the load to commit transactions")
        job = clone(name, f"{name}-copy", consistency=mode, timeout=180)
        ended = time.time()
        wait_for(lambda: load.acked_after(ended), timeout=60, what="the source to serve the load after the clone")
    finally:
        load.finish()
    assert job.state == "succeeded", job.error
    jn, snapshot = job.nodes[0], next(s for s in job.steps if s.step == "snapshot")
    if mode == "stop":
        assert jn.quiesced_at is not None and jn.downtime_ms is not None  # a held window, recorded
        assert not snapshot.detail["method"].startswith("online")
        taken = _wall(jn.quiesced_at)
    else:
        assert jn.quiesced_at is None and snapshot.detail["method"].startswith("online")
        assert load.errors == 0  # not one transaction failed, not one connection refused
        taken = _wall(snapshot.started_at)
    before = load.acked_before(taken)
    assert len(before) > 50
    copy_url = get_driver().url(next(n.id for n in environment(f"{name}-copy").nodes if n.name == "db"))
    committed = LOADS[stack].committed(copy_url)  # the stack's invariant, checked on the copy
    assert before <= committed, sorted(before - committed)[:10]
    LOADS[stack].committed(url)  # and on the source, after the clone and the load
