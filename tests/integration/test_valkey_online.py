"""Online copies of Valkey from its append-only files (no fork), at driver level with real servers:
one moment under MULTI load, a rewrite in the middle of the copy, a cut inside a MULTI block,
and the BGSAVE fallback for a node not persisting to the append-only file."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared import snapshots
from shared.drivers import NodeSpec
from shared.drivers.local import LocalDriver
from shared.stacks.valkey import AOF_DIR, MANIFEST, _open_cut, _write_from_fd, valkey_binary
from tests.helpers import wait_for

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


@pytest.fixture
def source(data_root: Path) -> Iterator[tuple[LocalDriver, redis.Redis]]:
    driver = LocalDriver(data_root)
    driver.create_node(NodeSpec("src", "valkey", *SRC))
    client = redis.Redis.from_url(driver.url("src"))
    client.mset({f"k{i}": "x" * 64 for i in range(20000)})
    yield driver, client
    client.close()


@pytest.fixture
def method(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from shared.config import get_settings

    monkeypatch.setenv("ENVCLONE_VALKEY_ONLINE_METHOD", "auto")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


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


def test_aof_copy_under_multi_load_is_one_moment_without_a_fork(source, method) -> None:  # noqa: ANN001
    driver, client = source
    forks = _forks(client)
    how, copy = _copy_under_load(driver, client)
    assert _forks(client) == forks, "the online copy forked the source"
    assert how == "online-aof"
    _assert_one_moment(copy, client)


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
