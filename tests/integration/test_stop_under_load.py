"""Stop-mode clones under a real client's load, one stack at a time, through a real worker: the copy
is one consistent moment that holds every transaction acknowledged before the source stopped, and
the source serves the same clients again once the window closes. (Online clones under load:
test_online, test_valkey_online, test_mariadb.)"""

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

pytestmark = pytest.mark.integration

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


@pytest.mark.parametrize("stack", list(LOADS))
def test_a_stop_mode_clone_under_load_holds_every_transaction_acknowledged_before_the_stop(
        backend: Backend, stack: str) -> None:
    if (why := _missing(stack)) is not None:
        pytest.skip(why)
    name = f"busy-{stack}"
    src = create_environment(name, [{"name": "db", "stack": stack}])
    url = get_driver().url(src.nodes[0].id)
    if stack == "postgres":
        subprocess.run([PGBENCH, "-i", "-s", "1", "-q", url], check=True, capture_output=True, timeout=120)
    load = LOADS[stack](url)
    load.setup()
    load.start()
    try:
        wait_for(lambda: len(load.acks) > 50, timeout=30, what="the load to commit transactions")
        job = clone(name, f"{name}-copy", consistency="stop", timeout=180)
        ended = time.time()
        wait_for(lambda: load.acked_after(ended), timeout=60, what="the source to serve the load again")
    finally:
        load.finish()
    assert job.state == "succeeded", job.error
    jn = job.nodes[0]
    assert jn.quiesced_at is not None and jn.downtime_ms is not None  # a held window, recorded
    assert not next(s for s in job.steps if s.step == "snapshot").detail["method"].startswith("online")
    before_stop = load.acked_before(_wall(jn.quiesced_at))
    assert len(before_stop) > 50
    copy_url = get_driver().url(next(n.id for n in environment(f"{name}-copy").nodes if n.name == "db"))
    committed = LOADS[stack].committed(copy_url)  # the stack's invariant, checked on the copy
    if isinstance(committed, int):  # Valkey's pairs are counted, not named
        assert committed >= len(before_stop)
    else:
        assert before_stop <= committed, sorted(before_stop - committed)[:10]
    LOADS[stack].committed(url)  # and on the source, after the window and the load
    delete_environment(f"{name}-copy")
    delete_environment(name)
