"""The local driver against real valkey and PostgreSQL processes and real data."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from shared.drivers import NodeSpec, PermanentDriverError
from shared.drivers.local import LocalDriver
from shared.stacks.postgres import SUPERUSER
from tests.conftest import destroy_everything, make_data_root
from tests.helpers import processes_under, wait_for

pytestmark = pytest.mark.integration

SRC, COPY = "127.91.0.1", "127.91.0.2"


def snapshot_cycle(driver: LocalDriver, node_id: str, snap_id: str) -> None:
    driver.prepare_snapshot(node_id, snap_id)
    driver.quiesce(node_id)
    assert driver.quiesced(node_id)
    driver.snapshot(node_id, snap_id)
    driver.restart(node_id, 30)


def blocked_clients(client: redis.Redis) -> int:
    return int(client.info("clients")["blocked_clients"])


def clone_from(driver: LocalDriver, snap_id: str, node_id: str, address: str, port: int) -> None:
    driver.provision(snap_id, node_id)
    driver.assign_address(node_id, address, port)
    driver.restart(node_id, 30)


def check_valkey_clone(driver: LocalDriver) -> None:
    """Valkey quiesces online: reads go on, a write waits for the restart (the resume) and is in
    the source afterwards but not in the clone."""
    driver.create_node(NodeSpec("src", "valkey", SRC, 6379))
    src = redis.Redis.from_url(driver.url("src"))
    src.mset({f"k{i}": f"v{i}" for i in range(100)})
    pid = (driver.pid_path("src")).read_text()
    driver.prepare_snapshot("src", "snap")
    driver.quiesce("src")
    assert driver.health("src").healthy and src.get("k5") == b"v5"  # still serving reads
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(redis.Redis.from_url(driver.url("src")).set, "during", "pause")
        wait_for(lambda: blocked_clients(src) == 1, timeout=10, what="the write to be held")
        driver.snapshot("src", "snap")
        assert not held.done()
        driver.restart("src", 30)
        assert held.result(timeout=10) is True
    assert (driver.pid_path("src")).read_text() == pid  # never stopped
    src.set("after", "snapshot")
    clone_from(driver, "snap", "copy", COPY, 6379)
    copy = redis.Redis.from_url(driver.url("copy"))
    assert copy.mget([f"k{i}" for i in range(100)]) == [f"v{i}".encode() for i in range(100)]
    assert copy.get("during") is None and copy.get("after") is None
    assert src.get("during") == b"pause" and src.get("after") == b"snapshot" and src.get("k5") == b"v5"
    assert driver.url("copy").endswith(f"@{COPY}:6379/0")  # with its password


def test_valkey_snapshot_and_clone(driver: LocalDriver) -> None:
    check_valkey_clone(driver)
    info = driver.snapshot_info("snap")
    assert info is not None and info.method in ("copy", "delta", "reflink") and info.size_bytes > 0


def test_valkey_rewrite_in_progress_finishes_before_the_window(driver: LocalDriver) -> None:
    """A rewrite of the append-only file running when a clone starts is waited for while the node
    still takes writes, not inside the window."""
    driver.create_node(NodeSpec("src", "valkey", SRC, 6379))
    src = redis.Redis.from_url(driver.url("src"))
    blob = os.urandom(1024 * 1024)
    for start in range(0, 100, 20):
        src.mset({f"b{i}": blob for i in range(start, start + 20)})
    try:
        src.bgrewriteaof()
    except redis.ResponseError:
        pass  # valkey's auto-rewrite (the file passed 64 MB) is already at it
    persistence = src.info("persistence")
    assert persistence["aof_rewrite_in_progress"] or persistence["aof_rewrite_scheduled"]
    driver.prepare_snapshot("src", "snap")
    persistence = src.info("persistence")
    assert persistence["aof_rewrite_in_progress"] == 0 and persistence["aof_rewrite_scheduled"] == 0
    driver.quiesce("src")
    info = driver.snapshot("src", "snap")
    driver.restart("src", 30)
    assert info.size_bytes >= 100 * 1024 * 1024


def test_postgres_snapshot_and_clone(driver: LocalDriver) -> None:
    driver.create_node(NodeSpec("src", "postgres", SRC, 5432))
    src_url = driver.url("src")
    with psycopg.connect(src_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
    snapshot_cycle(driver, "src", "snap")
    with psycopg.connect(src_url, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (999999, 'after')")
    clone_from(driver, "snap", "copy", COPY, 5432)
    copy_url = driver.url("copy")
    assert COPY in copy_url and SRC not in copy_url
    with psycopg.connect(copy_url) as conn:
        assert conn.execute("SELECT count(*), max(id) FROM t").fetchone() == (5000, 5000)
        assert conn.execute("SELECT host(inet_server_addr())").fetchone()[0] == COPY
    with psycopg.connect(src_url) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 5001
    # Runs unprivileged when we are root (PostgreSQL refuses root).
    owner = (driver.volume("src") / "data").stat().st_uid
    assert (os.geteuid() != 0) or owner != 0


def test_webapp_reads_env_and_rewrite_repoints_it(driver: LocalDriver) -> None:
    driver.create_node(NodeSpec("db", "postgres", "127.91.0.1", 5432))
    driver.create_node(NodeSpec("cache", "valkey", "127.91.0.2", 6379))
    config = {"DATABASE_URL": driver.url("db"), "CACHE_URL": driver.url("cache")}
    driver.create_node(NodeSpec("web", "webapp", "127.91.0.3", 8080, config))
    assert httpx.post("http://127.91.0.3:8080/items", json={"name": "a"}).status_code == 201
    assert httpx.put("http://127.91.0.3:8080/cache", json={"value": "hi"}).status_code == 200
    body = httpx.get("http://127.91.0.3:8080/").json()
    assert body == {"database": "127.91.0.1:5432", "items": 1,
                    "cache": {"address": "127.91.0.2:6379", "value": "hi"}}
    rewrites = driver.rewrite_config("web", {"127.91.0.1": "127.91.0.9", "127.91.0.2": "127.91.0.8"})
    assert {(r.file, r.old, r.new) for r in rewrites} == {
        ("config/.env", "127.91.0.1", "127.91.0.9"), ("config/.env", "127.91.0.2", "127.91.0.8")}
    env = (driver.volume("web") / "config/.env").read_text()
    assert "127.91.0.9:5432" in env and "127.91.0.1" not in env
    assert driver.rewrite_config("web", {"127.91.0.1": "127.91.0.9"}) == []  # idempotent


def test_operations_are_idempotent(driver: LocalDriver) -> None:
    spec = NodeSpec("src", "valkey", SRC, 6379)
    driver.create_node(spec)
    redis.Redis.from_url(driver.url("src")).set("a", "1")
    driver.create_node(spec)  # finds what the first call made
    driver.quiesce("src")
    driver.quiesce("src")
    first = driver.snapshot("src", "snap")
    assert driver.snapshot("src", "snap") == first
    driver.restart("src", 30)
    driver.restart("src", 30)
    n = driver.provision("snap", "copy")
    assert driver.provision("snap", "copy") == n
    driver.assign_address("copy", COPY, 6379)
    driver.assign_address("copy", COPY, 6379)
    driver.start("copy")
    driver.start("copy")
    driver.wait_healthy("copy", 30)
    assert redis.Redis.from_url(driver.url("copy")).get("a") == b"1"
    driver.destroy_node("copy")
    driver.destroy_node("copy")
    driver.delete_snapshot("snap")
    driver.delete_snapshot("snap")
    assert driver.node_ids() == {"src"} and driver.snapshot_ids() == set()


def test_snapshot_refuses_a_running_node_and_bad_ids(driver: LocalDriver) -> None:
    driver.create_node(NodeSpec("src", "valkey", SRC, 6379))
    with pytest.raises(PermanentDriverError, match="quiesced"):
        driver.snapshot("src", "snap")
    # Writes let through behind the driver's back (a pause that ran out): no snapshot.
    driver.quiesce("src")
    redis.Redis.from_url(driver.url("src")).client_unpause()
    redis.Redis.from_url(driver.url("src")).set("sneaked", "in")
    with pytest.raises(PermanentDriverError, match="quiesced"):
        driver.snapshot("src", "snap")
    assert driver.snapshot_ids() == set()
    with pytest.raises(PermanentDriverError, match="invalid node id"):
        driver.volume("../etc")
    with pytest.raises(PermanentDriverError, match="does not exist"):
        driver.provision("missing", "copy")


def test_stop_is_graceful_and_detached_pid_file_tracks_the_process(driver: LocalDriver) -> None:
    driver.create_node(NodeSpec("src", "valkey", SRC, 6379))
    pid = int((driver.pid_path("src")).read_text().split()[0])
    assert os.getsid(pid) == pid  # own session: detached from whoever started it
    driver.stop("src")
    assert not driver.health("src").running
    assert not (driver.pid_path("src")).exists()


def test_concurrent_starts_of_one_node_run_one_process(driver: LocalDriver) -> None:
    """A step and the watchdog may start the same stopped node at once. Both used to see it not
    running and both spawn: the second could not bind the address and, if its pid file landed
    last, the live first one was orphaned -- every later start failed "address in use"."""
    driver.create_node(NodeSpec("src", "postgres", SRC, 5432))
    for _ in range(3):
        driver.stop("src")
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: driver.restart("src", 30), range(4)))
        pid = int((driver.pid_path("src")).read_text().split()[0])
        # Servers started: the processes whose parent is not one of them (the rest are its children).
        running = {p for p, _ in processes_under(driver.volume("src"))}
        assert [p for p in running if _parent(p) not in running] == [pid]
        assert driver.health("src").healthy


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_reflink_path_on_xfs(xfs_root: Path) -> None:
    root = xfs_root / "var"
    root.mkdir(mode=0o755)
    driver = LocalDriver(root)
    assert driver.reflink
    check_valkey_clone(driver)
    info = driver.snapshot_info("snap")
    assert info is not None and info.method == "reflink"


def test_copy_path_without_reflink() -> None:
    root = make_data_root()
    try:
        driver = LocalDriver(root)
        driver._reflink = False  # the copy path, whatever this filesystem can do
        driver.create_node(NodeSpec("src", "postgres", SRC, 5432))
        with psycopg.connect(driver.url("src"), autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
        precopied = driver.prepare_snapshot("src", "snap")
        assert precopied > 0
        driver.quiesce("src")
        info = driver.snapshot("src", "snap")
        driver.restart("src", 30)
        assert info.method == "delta"
        clone_from(driver, "snap", "copy", COPY, 5432)
        with psycopg.connect(driver.url("copy")) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 1000
        with psycopg.connect(host=COPY, port=5432, user=SUPERUSER, dbname="app",
                             password=driver._node("copy")[1].secrets()["superuser_password"]):
            pass
    finally:
        destroy_everything(root)


def test_destroy_during_create_waits_for_it_and_leaves_nothing(driver: LocalDriver, data_root: Path) -> None:
    """A delete racing a half-made node: the destroy waits for the creation, then removes all of it."""
    with ThreadPoolExecutor(1) as pool:
        creating = pool.submit(driver.create_node, NodeSpec("racer", "postgres", "127.91.0.77", 5432))
        wait_for(lambda: (data_root / "nodes" / ".racer.creating").exists(), timeout=30, what="creation under way")
        driver.destroy_node("racer")
        creating.result(timeout=120)  # the creation was not cut short under its feet
    assert not driver.health("racer").running and driver.node_ids() == set()
    assert list((data_root / "nodes").iterdir()) == [] and processes_under(data_root) == []
