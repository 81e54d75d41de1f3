"""Online clones of PostgreSQL: the source refuses nothing while it is copied (base backup + WAL),
the copy recovers to one consistent moment, and what can go wrong in between fails clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select

from shared import filelock
from shared.db import session_scope
from shared.drivers import NodeSpec, PermanentDriverError, get_driver
from shared.drivers.local import LocalDriver
from shared.models import JobNode, NodeShare, StepRun
from shared.stacks.postgres import BASEBACKUP_APP, RELAY_DIR_PREFIX, SUPERUSER, PostgresStack
from tests.conftest import destroy_everything, make_data_root
from tests.fault_helpers import counts, kill9, step_worker_pid
from tests.helpers import wait_for
from tests.stack import Backend
from tests.workflow_client import (
    clone,
    create_environment,
    delete_environment,
    environment,
    start_clone,
    valkey,
    wait_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.long]

BACKEND = {"pool": "127.113.0.0/16"}
PGBENCH = shutil.which("pgbench")


def db_node(env):  # noqa: ANN001, ANN201
    return next(n for n in env.nodes if n.name == "db")


def invariant(url: str) -> tuple[int, int, int, int]:
    """pgbench's TPC-B invariant: the sums of account, teller and branch balances and of history deltas."""
    with psycopg.connect(url) as conn:
        return tuple(conn.execute(  # type: ignore[return-value]
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers),"
            " (SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)"
        ).fetchone())


class Probe(threading.Thread):
    """A client that opens a new connection every 10 ms and counts refusals."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.ok, self.refused = url, threading.Event(), 0, []

    def run(self) -> None:
        while not self.stop.wait(0.01):  # poll: a connection attempt every 10 ms is the probe
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                self.ok += 1
            except psycopg.Error as exc:
                self.refused.append(str(exc))


@pytest.mark.skipif(PGBENCH is None, reason="pgbench is not installed")
def test_online_clone_under_pgbench_refuses_nothing_and_keeps_the_invariant(backend: Backend) -> None:
    src = create_environment("bank", [{"name": "db", "stack": "postgres"}])
    url = get_driver().url(db_node(src).id)
    subprocess.run([PGBENCH, "-i", "-s", "2", "-q", url], check=True, capture_output=True, timeout=120)
    bench = subprocess.Popen([PGBENCH, "-c", "4", "-j", "2", "-T", "600", url],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    probe = Probe(url)
    probe.start()
    try:
        wait_for(lambda: invariant(url)[3] != 0, timeout=30, what="pgbench to commit transactions")
        job = clone("bank", "bank-copy", timeout=180)
    finally:
        probe.stop.set()
        probe.join(timeout=10)
        bench.terminate()  # SIGTERM ends pgbench's run early, with its report
        output = bench.communicate(timeout=60)[0]
    assert job.state == "succeeded", job.error
    jn = job.nodes[0]
    assert jn.quiesced_at is None and jn.downtime_ms is None  # never stopped, never held
    snapshot_step = next(s for s in job.steps if s.step == "snapshot")
    assert snapshot_step.detail["method"].startswith("online-")
    assert "aborted" not in output, output
    assert probe.refused == [] and probe.ok > 10, probe.refused[:3]
    copy = get_driver().url(db_node(_env("bank-copy")).id)
    sums = invariant(copy)
    assert sums[0] == sums[1] == sums[2] == sums[3] and sums[3] != 0  # consistent, and mid-load
    with psycopg.connect(copy) as conn:  # its own primary: it takes writes
        conn.execute("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 0, now())")
    with psycopg.connect(url) as conn:  # the source keeps no slot and no backup behind
        assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
    delete_environment("bank-copy")
    delete_environment("bank")


def _env(name: str):  # noqa: ANN202
    from tests.workflow_client import environment

    return environment(name)


def test_worker_killed_mid_backup_leaves_no_backup_on_the_source(backend: Backend) -> None:
    src = create_environment("big", [{"name": "db", "stack": "postgres"}])
    url = get_driver().url(db_node(src).id)
    with psycopg.connect(url, autocommit=True) as conn:  # enough data that the copy takes a moment
        conn.execute("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 600000) g")
    before = counts(backend)
    job_id = start_clone("big", "big-copy")

    def backing_up() -> int | None:
        with psycopg.connect(url, autocommit=True) as conn:
            # Either method's temporary slot: envclone_* (backup API), pg_basebackup_* (pg_basebackup).
            slots = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE temporary").fetchone()[0]
        return step_worker_pid(job_id, "snapshot") if slots else None

    pid = wait_for(backing_up, timeout=60, interval=0.01, what="the online backup to be under way")
    kill9(pid)
    # The session died with the worker: no slot, no backup session is left on the source.
    with psycopg.connect(url, autocommit=True) as conn:
        wait_for(lambda: conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0,
                 timeout=30, what="the backup's slot to go with its session")
    job = wait_job(job_id, timeout=180)  # the redelivered step takes the backup again
    assert job.state == "succeeded", job.error
    assert next(s for s in job.steps if s.step == "snapshot").attempts == 2
    with psycopg.connect(get_driver().url(db_node(_env("big-copy")).id)) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 600000
    delete_environment("big-copy")
    after = counts(backend)
    assert after.snapshots == before.snapshots and after.leases == before.leases and after.locks == 0
    delete_environment("big")


def test_a_copy_whose_wal_was_withheld_refuses_to_start_with_a_clear_error() -> None:
    root = make_data_root()
    driver = LocalDriver(root)
    try:
        driver.create_node(NodeSpec("src", "postgres", "127.113.255.1", 5432))
        with psycopg.connect(driver.url("src"), autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        driver.snapshot_online("src", "snap")
        wal = root / "snapshots/snap/volume/data/pg_wal"
        for segment in wal.iterdir():
            if segment.is_file():
                segment.unlink()  # withheld
        driver.provision("snap", "copy")
        driver.assign_address("copy", "127.113.255.2", 5432)
        with pytest.raises(PermanentDriverError, match="cannot recover to a consistent point"):
            driver.set_credentials("copy", PostgresStack().new_credentials(driver._node("src")[1].secrets()))
        assert not driver.pid_path("copy").exists()  # it never served
        assert driver.health("src").healthy
    finally:
        destroy_everything(root)


def test_online_valkey_copy_is_one_moment_under_multi_load(backend: Backend) -> None:
    src = create_environment("kv", [{"name": "cache", "stack": "valkey"}])
    client = valkey(src)
    client.mset({f"k{i}": "x" * 64 for i in range(20000)})
    stop, rounds = threading.Event(), [0]

    def pairs() -> None:  # MULTI INCR a, INCR b: equal in every consistent moment
        c = valkey(src)
        while not stop.is_set():
            pipe = c.pipeline(transaction=True)
            pipe.incr("a")
            pipe.incr("b")
            pipe.execute()
            rounds[0] += 1

    thread = threading.Thread(target=pairs, daemon=True)
    thread.start()
    try:
        wait_for(lambda: rounds[0] > 50, timeout=30, what="the MULTI load to run")
        job = clone("kv", "kv-copy")
    finally:
        stop.set()
        thread.join(timeout=10)
    assert job.state == "succeeded", job.error
    assert job.nodes[0].quiesced_at is None  # writes were never paused by us
    copy = valkey(_env("kv-copy"))
    assert copy.get("a") == copy.get("b") and int(copy.get("a")) > 0
    assert copy.dbsize() == 20002
    assert int(client.get("a")) >= int(copy.get("a"))
    delete_environment("kv-copy")
    delete_environment("kv")


@pytest.mark.parametrize(("stack", "node"), [("valkey", "cache"), ("postgres", "db")])
def test_an_online_copy_waits_for_another_jobs_stop_mode_window_on_the_node(backend: Backend, stack: str,
                                                                           node: str) -> None:
    """A stop-mode clone holds the node for its snapshot (Valkey: CLIENT PAUSE; PostgreSQL: stopped).
    An online clone of the same node waits for that job's restart: Valkey's copy, whose short pause
    ends with CLIENT UNPAUSE, would end the other job's hold; a stopped PostgreSQL cannot be copied
    online. Both copies come out whole."""
    env = create_environment("held", [{"name": node, "stack": stack}])
    if stack == "valkey":
        valkey(env).set("k", "v")
    stop_id = start_clone("held", "held-stop", consistency="stop",
                          faults=[{"step": "quiesce", "kind": "hang", "seconds": 4}])

    def window_open() -> bool:
        with session_scope() as session:
            return session.scalars(select(JobNode.quiesced_at).where(JobNode.job_id == stop_id)).one() is not None

    wait_for(window_open, timeout=60, what="the stop-mode clone to hold the source")
    online = clone("held", "held-online", timeout=120)
    stop = wait_job(stop_id, timeout=60)
    assert stop.state == "succeeded" and online.state == "succeeded", (stop.error, online.error)
    restarted = next(s for s in stop.steps if s.step == "restart").finished_at
    snap = next(s for s in online.steps if s.step == "snapshot")
    # It waited for the other job (Valkey as it quiesces, PostgreSQL as its copy starts), which
    # costs no attempt, and copied once the window was over.
    assert stop_id in {s.detail.get("waiting_for") for s in online.steps}
    assert snap.attempts == 1 and snap.finished_at >= restarted
    for name in ("held-stop", "held-online"):
        if stack == "valkey":
            assert valkey(environment(name)).get("k") == b"v"
        delete_environment(name)
    delete_environment("held")


def test_a_stop_mode_window_waits_for_an_online_copy_of_the_node(backend: Backend) -> None:
    """A PostgreSQL online copy shares the node while it copies: a stop-mode clone of the same node
    waits for it instead of stopping the server under the copy (which failed the copy, to be
    retried). The online copy is slowed as it starts (a hang fault, the node shared)."""
    create_environment("copied", [{"name": "db", "stack": "postgres"}])
    online_id = start_clone("copied", "copied-online",
                            faults=[{"step": "online_copy", "kind": "hang", "seconds": 10}])

    wait_for(lambda: _sharing(online_id), timeout=60, what="the online clone to start its copy")
    stop = clone("copied", "copied-stop", consistency="stop", timeout=120)
    online = wait_job(online_id, timeout=60)
    assert stop.state == "succeeded" and online.state == "succeeded", (stop.error, online.error)
    assert next(s for s in online.steps if s.step == "snapshot").attempts == 1  # never stopped under it
    assert next(s for s in stop.steps if s.step == "quiesce").detail.get("waiting_for") == online_id
    for name in ("copied-stop", "copied-online", "copied"):
        delete_environment(name)


def _sharing(job_id: str) -> bool:
    """The job's online copy has the node shared (the step's running state comes just before)."""
    with session_scope() as session:
        return session.scalar(select(NodeShare.job_id).where(NodeShare.job_id == job_id)) is not None


def _step(job_id: str, step: str) -> StepRun:
    with session_scope() as session:
        row = session.scalars(select(StepRun).where(StepRun.job_id == job_id, StepRun.step == step)).one()
        session.expunge(row)
        return row


def test_an_online_copy_that_comes_after_a_waiting_window_waits_behind_it(backend: Backend) -> None:
    """A stop-mode clone waiting for an online copy keeps its place: an online copy of the same
    node started after it waits for its window, so a stream of copies cannot starve the window
    until lock_wait_s fails it. The first copy is slowed as it starts (a hang fault, shared)."""
    create_environment("queued", [{"name": "db", "stack": "postgres"}])
    first_id = start_clone("queued", "queued-first",
                           faults=[{"step": "online_copy", "kind": "hang", "seconds": 20}])
    wait_for(lambda: _sharing(first_id), timeout=60, what="the first online clone to start its copy")
    stop_id = start_clone("queued", "queued-stop", consistency="stop")
    wait_for(lambda: _step(stop_id, "quiesce").detail.get("waiting_for") == first_id, timeout=60,
             what="the stop-mode clone to wait for that copy")
    later_id = start_clone("queued", "queued-later")
    wait_for(lambda: _step(later_id, "snapshot").detail.get("waiting_for") == stop_id, timeout=60,
             what="the later online clone to wait behind the stop-mode clone")
    stop, later, first = wait_job(stop_id, 120), wait_job(later_id, 120), wait_job(first_id, 60)
    assert {stop.state, later.state, first.state} == {"succeeded"}, (stop.error, later.error, first.error)
    copied = _step(later_id, "snapshot")
    with session_scope() as session:
        restarted = session.scalar(select(JobNode.restarted_at).where(JobNode.job_id == stop_id))
    assert restarted is not None and copied.finished_at > restarted  # copied after the window, not in it
    for name in ("queued-later", "queued-stop", "queued-first", "queued"):
        delete_environment(name)


# ---- the pg_basebackup method (ENVCLONE_PG_ONLINE_METHOD=basebackup), at driver level -------------
@pytest.fixture
def basebackup(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    from shared.config import get_settings

    monkeypatch.setenv("ENVCLONE_PG_ONLINE_METHOD", "basebackup")
    get_settings.cache_clear()
    yield
    monkeypatch.delenv("ENVCLONE_PG_ONLINE_METHOD")
    get_settings.cache_clear()


@pytest.mark.skipif(PGBENCH is None, reason="pgbench is not installed")
def test_basebackup_clone_under_pgbench_recovers_serves_and_has_the_data(basebackup: None,
                                                                        data_root: Path) -> None:
    driver = LocalDriver(data_root)
    driver.create_node(NodeSpec("src", "postgres", "127.113.254.1", 5432))
    url = driver.url("src")
    subprocess.run([PGBENCH, "-i", "-s", "1", "-q", url], check=True, capture_output=True, timeout=120)
    bench = subprocess.Popen([PGBENCH, "-c", "2", "-T", "600", url], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: invariant(url)[3] != 0, timeout=30, what="pgbench to commit transactions")
        info = driver.snapshot_online("src", "snap")
    finally:
        bench.terminate()
        output = bench.communicate(timeout=60)[0]
    assert info.method == "online-stream" and info.window_ms == 0
    assert "aborted" not in output, output
    driver.provision("snap", "copy")
    driver.assign_address("copy", "127.113.254.2", 5432)
    driver.set_credentials("copy", PostgresStack().new_credentials(driver._node("src")[1].secrets()))
    # The copy's replication rule names its own address, not its source's.
    assert "127.113.254.2/32" in (data_root / "nodes/copy/data/pg_hba.conf").read_text()
    driver.restart("copy", 60)
    copy = driver.url("copy")
    sums = invariant(copy)
    assert sums[0] == sums[1] == sums[2] == sums[3] and sums[3] != 0  # consistent, and mid-load
    with psycopg.connect(copy, autocommit=True) as conn:  # its own primary: it takes writes
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False
        assert conn.execute("SELECT count(*) FROM pgbench_accounts").fetchone()[0] == 100000
        conn.execute("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 0, now())")
    with psycopg.connect(_admin(driver, "src"), autocommit=True) as conn:  # no slot, no walsender left
        assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'"
                            ).fetchone()[0] == 0


def _admin(driver: LocalDriver, node: str) -> str:
    """The node's superuser URL (server-wide views show other sessions' details only to it)."""
    _, ctx = driver._node(node)
    return f"postgresql://{SUPERUSER}:{ctx.secrets()['superuser_password']}@{ctx.address}:{ctx.port}/postgres"


_SNAPSHOT_IN_A_CHILD = """
import sys
from shared.drivers.local import LocalDriver
LocalDriver(sys.argv[1]).snapshot_online("src", "snap")
"""


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _relay_dirs() -> set[Path]:
    return set(Path("/tmp").glob(f"{RELAY_DIR_PREFIX}*"))


def test_killed_basebackup_leaves_no_slot_no_walsender_no_backup(data_root: Path) -> None:
    """kill -9 of the process taking the copy, mid-stream: its relay dies with it, and so do the
    backup's sessions on the source (with their temporary slot); pg_basebackup dies too. What it
    left under /tmp holds no secret, and the next backup removes it."""
    driver = LocalDriver(data_root)
    driver.create_node(NodeSpec("src", "postgres", "127.113.254.3", 5432))
    url = _admin(driver, "src")
    # A node made before its pg_hba.conf admitted replication: the copy adds the rule and reloads.
    (data_root / "nodes/src/data/pg_hba.conf").write_text("host all all 0.0.0.0/0 scram-sha-256\n")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 100000) g")
    env = {**os.environ, "ENVCLONE_PG_ONLINE_METHOD": "basebackup",
           "ENVCLONE_PG_BASEBACKUP_MAX_RATE": "1M",  # slow enough to be caught mid-stream
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    before = _relay_dirs()
    child = subprocess.Popen([sys.executable, "-c", _SNAPSHOT_IN_A_CHILD, str(data_root)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ours = ("SELECT client_addr::text FROM pg_stat_activity WHERE backend_type = 'walsender' "
            f"AND application_name = '{BASEBACKUP_APP}'")
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            def streaming() -> bool:
                assert child.poll() is None, child.stderr.read() if child.stderr else ""
                slots = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE temporary").fetchone()[0]
                senders = conn.execute(ours).fetchall()
                progress = conn.execute("SELECT count(*) FROM pg_stat_progress_basebackup").fetchone()[0]
                return slots == 1 and len(senders) == 2 and progress == 1

            wait_for(streaming, timeout=60, interval=0.01, what="pg_basebackup to be streaming")
            # Replication reaches the node only from its own address (the relay's source).
            assert {row[0] for row in conn.execute(ours).fetchall()} == {"127.113.254.3/32"}
            tools = _children(child.pid)
            assert tools, "pg_basebackup runs as the copying process's child"
            child.kill()
            child.wait(timeout=10)

            def clean() -> bool:
                return (conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
                        and not conn.execute(ours).fetchall()
                        and conn.execute("SELECT count(*) FROM pg_stat_progress_basebackup").fetchone()[0] == 0)

            wait_for(clean, timeout=30, what="the backup's sessions and slot to go with the killed process")
            wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in tools), timeout=10,
                     what="pg_basebackup to die with its parent")
            # The killed one's: another test's live backup holds its own lock.
            left = [d for d in _relay_dirs() - before if filelock.free(d / "lock")]
            assert left, "the killed backup's relay directory"
            password = driver._node("src")[1].secrets()["superuser_password"].encode()
            assert not any(password in f.read_bytes() for d in left for f in d.iterdir() if f.is_file())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert "replication envclone 127.113.254.3/32" in (data_root / "nodes/src/data/pg_hba.conf").read_text()
    # A re-run (a redelivered step) takes the copy from scratch and succeeds.
    with pytest.MonkeyPatch.context() as mp:
        from shared.config import get_settings

        mp.setenv("ENVCLONE_PG_ONLINE_METHOD", "basebackup")
        get_settings.cache_clear()
        try:
            assert driver.snapshot_online("src", "snap").method == "online-stream"
        finally:
            mp.delenv("ENVCLONE_PG_ONLINE_METHOD")
            get_settings.cache_clear()
    assert not any(d.exists() for d in left), "the next backup sweeps what the killed one left"
