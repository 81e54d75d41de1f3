"""Online copies of Valkey from its append-only files (no fork), at driver level with real servers:
one moment under MULTI load, a rewrite in the middle of the copy, a cut inside a MULTI block,
the BGSAVE fallback for a node not persisting to the append-only file; and on an XFS reflink root
the aof_pause method: one moment, writes held only briefly, a fallback when the pause finds the
buffer busy, and a worker killed inside the pause holding nothing for long."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared import snapshots
from shared.drivers import NodeSpec
from shared.drivers.local import LocalDriver
from shared.stacks import valkey as valkey_stack
from shared.stacks.valkey import AOF_DIR, MANIFEST, PAUSE_TIMEOUT_MS, _open_cut, _write_from_fd, valkey_binary
from tests.helpers import wait_for, worker_stopped_at

pytestmark = pytest.mark.integration

SRC, COPY = ("127.113.254.21", 6379), "127.113.254.22"


class Pairs(threading.Thread):
    """4 clients looping MULTI INCR a INCR b EXEC: a == b in every consistent moment."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.rounds, self.errors = url, threading.Event(), 0, []

    def run(self) -> None:
        workers = [threading.Thread(target=self._loop, daemon=True) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def _loop(self) -> None:
        c = redis.Redis.from_url(self.url)
        try:
            while not self.stop.is_set():
                pipe = c.pipeline(transaction=True)
                pipe.incr("a")
                pipe.incr("b")
                pipe.execute()
                self.rounds += 1
        except redis.RedisError as exc:
            self.errors.append(exc)


def _source(root: Path) -> Iterator[tuple[LocalDriver, redis.Redis]]:
    driver = LocalDriver(root)
    driver.create_node(NodeSpec("src", "valkey", *SRC))
    client = redis.Redis.from_url(driver.url("src"))
    client.mset({f"k{i}": "x" * 64 for i in range(20000)})
    yield driver, client
    client.close()


@pytest.fixture
def source(data_root: Path) -> Iterator[tuple[LocalDriver, redis.Redis]]:
    yield from _source(data_root)


@pytest.fixture
def xfs_source(xfs_root: Path) -> Iterator[tuple[LocalDriver, redis.Redis]]:
    root = xfs_root / "var"
    root.mkdir(mode=0o755)
    yield from _source(root)


@pytest.fixture
def method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """ENVCLONE_VALKEY_ONLINE_METHOD: auto, or the test's indirect parameter."""
    from shared.config import get_settings

    monkeypatch.setenv("ENVCLONE_VALKEY_ONLINE_METHOD", getattr(request, "param", "auto"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _pauses(client: redis.Redis) -> int:
    """CLIENT PAUSE calls the server has served."""
    return int(client.info("commandstats").get("cmdstat_client|pause", {}).get("calls", 0))


def _forks(client: redis.Redis) -> int:
    return int(client.info("stats")["total_forks"])


def _serve_copy(driver: LocalDriver) -> redis.Redis:
    driver.provision("snap", "copy")
    driver.assign_address("copy", COPY, SRC[1])
    driver.restart("copy", 60)
    return redis.Redis.from_url(driver.url("copy"))


def _copy_under_load(driver: LocalDriver, client: redis.Redis) -> tuple[str, redis.Redis]:
    load = Pairs(driver.url("src"))
    load.start()
    try:
        wait_for(lambda: load.rounds > 200, timeout=30, interval=0.01, what="the MULTI load to run")
        client.set("acked", "before the copy")
        info = driver.snapshot_online("src", "snap")
        wait_for(lambda: load.rounds > 400, timeout=30, interval=0.01, what="the load to go on")
    finally:
        load.stop.set()
        load.join(timeout=10)
    assert not load.errors
    return info.method, _serve_copy(driver)


def _assert_one_moment(copy: redis.Redis, source: redis.Redis) -> None:
    assert copy.get("a") == copy.get("b") and int(copy.get("a")) > 0
    assert int(source.get("a")) >= int(copy.get("a"))
    assert copy.get("acked") == b"before the copy"  # acknowledged before: in the cut
    assert copy.dbsize() == 20003


@pytest.mark.parametrize("method", ["aof"], indirect=True)
def test_aof_copy_under_multi_load_is_one_moment_without_a_fork(source, method) -> None:  # noqa: ANN001
    driver, client = source
    forks = _forks(client)
    how, copy = _copy_under_load(driver, client)
    assert _forks(client) == forks, "the online copy forked the source"
    assert how == "online-aof"
    _assert_one_moment(copy, client)


@pytest.mark.parametrize("method", ["aof"], indirect=True)
def test_rewrite_during_the_copy_still_gives_a_loadable_consistent_copy(source, method,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """BGREWRITEAOF runs to its end (new base, old files unlinked) after the files were opened and
    before they are copied: the copy still has the old files' moment."""
    driver, client = source
    src_aof = driver.volume("src") / "data" / AOF_DIR
    before = (src_aof / MANIFEST).read_bytes()
    real_copy_tree, rewrites = snapshots.copy_tree, []

    def rewrite_then_copy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if rewrites:  # once: in the online copy (provision copies too)
            return real_copy_tree(*args, **kwargs)
        rewrites.append(client.bgrewriteaof())
        wait_for(lambda: not (i := client.info("persistence"))["aof_rewrite_in_progress"]
                 and not i["aof_rewrite_scheduled"] and (src_aof / MANIFEST).read_bytes() != before
                 and not any(k == "h" for k in _kinds(src_aof)),
                 timeout=60, interval=0.01, what="the rewrite to finish and its old files to go")
        return real_copy_tree(*args, **kwargs)

    monkeypatch.setattr(snapshots, "copy_tree", rewrite_then_copy)
    how, copy = _copy_under_load(driver, client)
    assert how == "online-aof" and rewrites
    assert (src_aof / MANIFEST).read_bytes() != before  # the source's files were swapped meanwhile
    _assert_one_moment(copy, client)


def _kinds(aof: Path) -> list[str]:
    return [line.split()[-1] for line in (aof / MANIFEST).read_text().splitlines() if line.strip()]


def test_bgsave_fallback_when_the_node_does_not_use_the_append_only_file(source, method) -> None:  # noqa: ANN001
    driver, client = source
    client.config_set("appendonly", "no")
    forks = _forks(client)
    how, copy = _copy_under_load(driver, client)
    assert how in ("online-copy", "online-reflink")  # the fork snapshot
    assert _forks(client) > forks
    _assert_one_moment(copy, client)


# ---- aof_pause: the live append-only file reflinked under a short pause (XFS reflink root) --------
def test_aof_pause_copy_is_one_moment_holding_writes_only_for_the_reflink(xfs_source, method) -> None:  # noqa: ANN001
    driver, client = xfs_source
    forks = _forks(client)
    how, copy = _copy_under_load(driver, client)
    assert how == "online-aofpause"  # auto on a reflink root
    assert _forks(client) == forks, "the online copy forked the source"
    info = driver.snapshot_info("snap")
    assert info is not None and 0 < info.window_ms < PAUSE_TIMEOUT_MS  # the pause's length, recorded
    assert client.info("clients")["paused_actions"] == "none"
    _assert_one_moment(copy, client)


def test_aof_pause_that_never_finds_the_buffer_empty_falls_back_to_the_aof_copy(
        xfs_source, method, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Every pause ends at once, unpaused, when the append-only buffer is busy; after the last try
    the copy is the aof method's, which holds nothing."""
    driver, client = xfs_source
    pauses: list[bool] = []

    def busy(c: redis.Redis, src: Path, aof: Path) -> None:
        pauses.append(c.info("clients")["paused_actions"] == "write")  # held right now
        return None

    monkeypatch.setattr(valkey_stack, "_cut_in_pause", busy)
    how, copy = _copy_under_load(driver, client)
    assert how == "online-aof"
    assert pauses == [True] * valkey_stack.PAUSE_ATTEMPTS
    assert driver.snapshot_info("snap").window_ms == 0
    _assert_one_moment(copy, client)


_HANG_IN_PAUSE = """
import sys, threading
from shared.drivers.local import LocalDriver
from shared.stacks import valkey

def hang(src, dst):
    print("in the pause", flush=True)
    threading.Event().wait()

valkey.reflink_fd = hang
LocalDriver(sys.argv[1]).snapshot_online("src", "snap")
"""


def test_worker_killed_inside_the_pause_holds_the_source_no_longer_than_the_pause_timeout(
        xfs_source, method) -> None:  # noqa: ANN001
    driver, client = xfs_source
    with worker_stopped_at(_HANG_IN_PAUSE, driver.root, {"ENVCLONE_VALKEY_ONLINE_METHOD": "aof_pause"},
                           "in the pause") as worker:
        paused_by = time.monotonic()  # the pause began before this
        assert client.info("clients")["paused_actions"] == "write"
        worker.kill()
        worker.wait(timeout=10)
        writer = redis.Redis.from_url(driver.url("src"), socket_timeout=10)
        assert writer.set("after", "the kill")  # waits out the pause the dead worker left, no longer
        assert time.monotonic() - paused_by < PAUSE_TIMEOUT_MS / 1000 + 0.5
        assert client.info("clients")["paused_actions"] == "none"
        writer.close()


def test_a_pause_held_by_another_job_is_never_ended_by_an_online_copy(xfs_source, method) -> None:  # noqa: ANN001
    """A stop-mode clone of the same node holds its writes: the online copy neither pauses nor
    unpauses (CLIENT UNPAUSE would end that hold) and takes the aof method's copy instead."""
    driver, client = xfs_source
    client.client_pause(60_000, all=False)
    try:
        info = driver.snapshot_online("src", "snap")
        assert info.method == "online-aof" and info.window_ms == 0
        assert client.info("clients")["paused_actions"] == "write"  # still held, as its owner left it
    finally:
        client.client_unpause()
    copy = _serve_copy(driver)
    assert copy.dbsize() == 20000


def test_a_live_file_that_cannot_be_reflinked_falls_back_at_once(xfs_source, method,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The volume and the snapshot on different filesystems (EXDEV): one pause, then the aof copy."""
    driver, client = xfs_source
    pauses = _pauses(client)
    monkeypatch.setattr(valkey_stack, "reflink_fd", lambda src, dst: False)
    how, copy = _copy_under_load(driver, client)
    assert how == "online-aof" and _pauses(client) == pauses + 1
    assert client.info("clients")["paused_actions"] == "none"
    _assert_one_moment(copy, client)


# ---- a cut inside a MULTI block, on a bare server -------------------------------------------------
def _server(data: Path) -> subprocess.Popen:
    proc = subprocess.Popen([valkey_binary(), "--port", "0", "--unixsocket", str(data / "s.sock"),
                             "--dir", str(data), "--appendonly", "yes", "--save", "", "--logfile", ""],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    c = redis.Redis(unix_socket_path=str(data / "s.sock"))

    def up() -> bool:
        if proc.poll() is not None:
            return True  # exited: said below
        try:
            return bool(c.ping())
        except redis.ConnectionError:
            return False
        except redis.BusyLoadingError:
            return False

    wait_for(up, timeout=30, interval=0.01, what="valkey to serve")
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    return proc


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out


@pytest.mark.parametrize(("where", "said"), [
    ("between INCR a and INCR b", "Revert incomplete MULTI/EXEC transaction"),
    ("inside INCR b", "Truncating the AOF appendonly.aof.1.incr.aof"),  # back to before the MULTI
    ("before EXEC", "Revert incomplete MULTI/EXEC transaction")])
def test_copy_cut_inside_a_multi_block_loads_with_the_transaction_reverted(where: str, said: str) -> None:
    """aof-load-truncated (default yes) for the last file of the manifest, which the cut one is."""
    tmp = Path(tempfile.mkdtemp(prefix="envclone-aofcut-"))
    try:
        src, dst = tmp / "src", tmp / "dst"
        src.mkdir()
        proc = _server(src)
        c = redis.Redis(unix_socket_path=str(src / "s.sock"))
        for _ in range(10):
            pipe = c.pipeline(transaction=True)
            pipe.incr("a")
            pipe.incr("b")
            pipe.execute()
        c.close()
        _stop(proc)
        cut = _open_cut(src / AOF_DIR)
        assert cut is not None
        *whole, (last, fd) = cut.files
        tail = Path(f"/proc/self/fd/{fd}").read_bytes()
        block = tail.rindex(b"*1\r\n$5\r\nMULTI\r\n")
        incr_b = tail.index(b"$1\r\nb\r\n", block)  # INCR is logged as INCRBY: *3 $6 INCRBY $1 b $1 1
        offset = {"between INCR a and INCR b": tail.rindex(b"*3\r\n", block, incr_b),
                  "inside INCR b": incr_b + 2, "before EXEC": tail.index(b"*1\r\n$4\r\nEXEC", block)}[where]
        (dst / AOF_DIR).mkdir(parents=True)
        for name, f in whole:
            _write_from_fd(f, dst / AOF_DIR / name, None)
        _write_from_fd(fd, dst / AOF_DIR / last, offset)
        (dst / AOF_DIR / MANIFEST).write_bytes(cut.manifest)
        cut.close()
        proc = _server(dst)
        c = redis.Redis(unix_socket_path=str(dst / "s.sock"))
        assert (c.get("a"), c.get("b")) == (b"9", b"9")  # the cut transaction reverted, the nine before kept
        c.close()
        assert said in _stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
