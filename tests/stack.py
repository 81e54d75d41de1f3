"""A real envclone back end for tests: fresh PostgreSQL (or SQLite) state database, a Redis
database of its own, a data root, and a real Celery worker process (prefork, 2 processes)."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import redis
from celery import Celery

from tests.conftest import create_database, destroy_everything, drop_database, make_data_root
from tests.helpers import processes_under, wait_for

TEST_DBS = range(2, 16)
# Claims live in Redis database 1 under the owner's pid, so two test processes on one machine (a
# run and a benchmark, say) never share a broker database -- a worker would take the other's tasks.
_claims = redis.Redis(host="127.0.0.1", port=6379, db=1)


def _claim_key(n: int) -> str:
    return f"envclone:test-db:{n}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_redis_db() -> int:
    """A Redis database no live back end of any process uses; give it back with release_redis_db."""
    for _ in range(2):
        for n in TEST_DBS:
            if _claims.set(_claim_key(n), os.getpid(), nx=True):
                return n
        for n in TEST_DBS:  # claims of processes that died without giving them back
            owner = _claims.get(_claim_key(n))
            if owner is not None and not _pid_alive(int(owner)):
                _claims.delete(_claim_key(n))
    raise RuntimeError(f"every Redis test database ({TEST_DBS.start}-{TEST_DBS.stop - 1}) is claimed")


def release_redis_db(n: int) -> None:
    if _claims.get(_claim_key(n)) == str(os.getpid()).encode():
        _claims.delete(_claim_key(n))


_current: list[Celery] = []


def publisher() -> Celery:
    """The publishing Celery app of the back end this test runs against."""
    assert _current, "no back end is running"
    return _current[-1]


def reset_caches() -> None:
    from shared.config import get_settings
    from shared.db import get_engine, get_sessionmaker

    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_settings.cache_clear()
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()


def use_backend(env: dict[str, str], broker_url: str, db_url: str) -> tuple[Celery, dict[str, str | None]]:
    """Point this test process at a back end: its broker database emptied, its settings applied, its
    state database migrated. Returns its publisher and what ``leave_backend`` restores."""
    redis.Redis.from_url(broker_url).flushdb()
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    reset_caches()
    from shared.migrate import upgrade
    from workers.celery_app import Role, make_celery

    upgrade(db_url)
    celery = make_celery(Role.PUBLISHER)
    _current.append(celery)
    return celery, saved


def leave_backend(celery: Celery, saved: dict[str, str | None], db_name: str | None, broker_url: str,
                  redis_db: int | None) -> None:
    """Undo ``use_backend``: the publisher closed, the database dropped, the settings restored, the
    broker database emptied and given back."""
    _current.remove(celery)
    celery.close()
    reset_caches()
    if db_name:
        drop_database(db_name)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    reset_caches()
    if redis_db is not None:
        redis.Redis.from_url(broker_url).flushdb()
        release_redis_db(redis_db)


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    """Stop a process started in a session of its own, with everything in its group."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class PoolInUse(RuntimeError):
    """Another back end on this machine holds the address pool."""


def claim_pool(pool: str) -> int:
    """Hold ``pool`` for one back end, machine-wide, until the returned descriptor is closed.

    Leases live in a back end's own state database, so two back ends over one pool each lease its
    lowest address to their first node and one of the servers fails "address already in use" --
    at random, depending on which starts first. That happens when pytest-xdist spreads one
    module's tests over several workers (``--dist load``): each worker builds the module's
    back end, with the module's pool. Refused here, at once and by name, instead."""
    name = str(ipaddress.ip_network(pool, strict=False)).replace("/", "_")
    path = Path(tempfile.gettempdir()) / f"envclone-test-pool-{name}.lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = Path(path).read_text().strip() or "?"
        os.close(fd)
        raise PoolInUse(f"address pool {pool} is held by another back end (pid {holder}): a module's pool "
                        "is its own, so its tests must run in one process (pytest-xdist --dist loadfile, "
                        "as pyproject's addopts say)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Backend:
    def __init__(self, database: str = "postgres", pool: str = "127.93.0.0/16", concurrency: int = 2,
                 extra_env: dict[str, str] | None = None, broker_url: str | None = None,
                 data_dir: Path | None = None) -> None:
        """``database``: "postgres" (a fresh database on the local server), "sqlite", or a URL.
        ``data_dir``: where volumes and snapshots go (default: inside this backend's own root)."""
        self._pool_fd = claim_pool(pool)  # first: a refused back end has made nothing to clean up
        self.root = make_data_root()
        self.data_dir = data_dir or self.root
        self.db_name: str | None = None
        try:
            if database == "postgres":
                self.db_name, self.db_url = create_database()
            elif database == "sqlite":
                self.db_url = f"sqlite:///{self.root / 'state.sqlite3'}"
            else:
                self.db_url = database
        except BaseException:
            os.close(self._pool_fd)
            raise
        # Its own Redis database: a worker of another back end still alive must not take its tasks.
        self.redis_db = None if broker_url else claim_redis_db()
        self.broker_url = broker_url or f"redis://127.0.0.1:6379/{self.redis_db}"
        self.env = {
            "ENVCLONE_DATA_DIR": str(self.data_dir),
            "ENVCLONE_DATABASE_URL": self.db_url,
            "ENVCLONE_BROKER_URL": self.broker_url,
            "ENVCLONE_ADDRESS_POOL": pool,
            "ENVCLONE_RETRY_BASE_S": "0.1",
            "ENVCLONE_RETRY_CAP_S": "1",
            "ENVCLONE_HEALTH_TIMEOUT_S": "30",
            "ENVCLONE_FAULT_INJECTION": "1",
            **(extra_env or {}),
        }
        self.concurrency = concurrency
        self.beat: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "worker.log"
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self) -> Backend:
        self.celery, self._saved_env = use_backend(self.env, self.broker_url, self.db_url)
        self.start_worker()
        return self

    def start_worker(self) -> None:
        name = f"test-{uuid.uuid4().hex[:8]}@%h"
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.worker", "worker", "-c", str(self.concurrency),
             "-n", name, "-l", "info", "-E"],
            env={**os.environ, **self.env}, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(lambda: self.celery.control.ping(timeout=0.5), timeout=60, what="worker to answer ping")

    def start_beat(self) -> None:
        """celery beat, which runs the watchdog every ENVCLONE_WATCHDOG_INTERVAL_S."""
        self.beat = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.worker", "beat", "-l", "info",
             "-s", str(self.root / "beat-schedule")],
            env={**os.environ, **self.env}, stdout=open(self.root / "beat.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop_worker(self, sig: int = signal.SIGTERM) -> None:
        if self.worker is None:
            return
        stop_group(self.worker, sig)
        self.worker = None

    def idle(self) -> bool:
        """Nothing queued, nothing delivered and unacknowledged (tasks run with late acks, so one in
        progress is still unacknowledged, and it publishes what follows it before its ack)."""
        broker = redis.Redis.from_url(self.broker_url)
        queued = sum(broker.llen(k) for k in broker.scan_iter("envclone*") if broker.type(k) == b"list")
        return queued == 0 and broker.hlen("unacked") == 0

    def worker_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __exit__(self, *exc: object) -> None:
        if self.beat is not None:
            stop_group(self.beat, timeout=30)
        self.stop_worker()
        if self.log_path.exists():  # kept for a post-mortem after the data root is gone
            shutil.copy(self.log_path, Path(tempfile.gettempdir()) / "envclone-last-worker.log")
        leftovers = destroy_everything(self.data_dir) if self.data_dir != self.root else []
        leftovers += destroy_everything(self.root)
        reset_caches()
        leave_backend(self.celery, self._saved_env, self.db_name, self.broker_url, self.redis_db)
        os.close(self._pool_fd)  # its nodes are gone: the pool is free for the next back end
        assert not leftovers, f"processes left behind: {leftovers}"

    def processes(self) -> list[tuple[int, str]]:
        return processes_under(self.data_dir / "nodes")

    def volumes(self) -> set[str]:
        """Node volumes, finished or half-made (staging dirs count: they are leaks too)."""
        nodes = self.data_dir / "nodes"
        return {p.name for p in nodes.iterdir()} if nodes.exists() else set()

    def snapshots(self) -> set[str]:
        snaps = self.data_dir / "snapshots"
        return {p.name for p in snaps.iterdir() if not p.name.startswith(".reflink-probe")} if snaps.exists() else set()


__all__ = ["Backend", "Path"]
