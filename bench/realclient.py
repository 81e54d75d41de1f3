"""What a real client of the source sees while it is cloned, consistency=online against
consistency=stop, on the same source in the same run.

PostgreSQL: pgbench TPC-B (-c 4 -j 2, per-transaction log) runs through the clone; beside it a
probe writes every 5 ms (reconnecting when refused) and another opens a new connection every
10 ms. Valkey: 4 clients each looping MULTI INCR a INCR b EXEC, with the same two probes. The clone
is taken at driver level with the calls the workflow makes -- stop: prepare_snapshot, quiesce,
snapshot, restart; online: snapshot_online -- then provision, assign_address, set_credentials and
restart of the copy. Reported: the longest gap any one client saw between two acknowledged
transactions, failed transactions and aborted clients, refused connections, p99 latency during the
clone against the 10 s before it, and whether the copy holds the load's invariant (pgbench: the
account, teller and branch balances each sum to the history's deltas; valkey: a == b)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import redis

from bench.common import filesystem, fill_valkey, pct
from bench.downtime import xfs_root
from shared import snapshots
from shared.config import get_settings
from shared.drivers import NodeSpec
from shared.drivers.local import LocalDriver
from shared.snapshots import tree_size
from shared.stacks import get_stack
from shared.stacks.mariadb import mariadb_backup
from shared.stacks.postgres import APP_DB, SUPERUSER, postgres_bindir
from tests import loads

# Off the test suites' address pools (127.80-115.x): tests may run on the machine at the same time.
ADDRESSES = {"postgres": ("127.120.0.1", 5432), "valkey": ("127.120.0.2", 6379), "mariadb": ("127.120.0.3", 3306)}
CLONE_ADDRESSES = {"postgres": "127.120.0.11", "valkey": "127.120.0.12", "mariadb": "127.120.0.13"}
DB_ERRORS = (redis.RedisError, psycopg.Error, pymysql.Error, OSError)
BEFORE_S = 10.0  # the baseline: the 10 s of load before the clone starts
AFTER_S = 3.0
TARGET_GAP_MS = {"postgres": 50, "valkey": 20, "mariadb": 50}


def mysql_connect(url: str) -> pymysql.Connection:
    # tests.loads' connection; a bench client waits out a long stall rather than time out of it.
    return loads.mysql_connect(url, connect_timeout=1, read_timeout=600, write_timeout=600)


# ---- probes ------------------------------------------------------------------------------------
class Probe:
    """A thread doing one small operation every `pace` s until stopped; records (time, ok)."""

    def __init__(self, pace: float) -> None:
        self.pace = pace
        self.events: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def op(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.op()
                self.events.append((time.time(), True))
            except DB_ERRORS:
                self.events.append((time.time(), False))
                self.reset()
            self._stop.wait(self.pace)

    def reset(self) -> None:
        pass

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def failures(self, t0: float, t1: float) -> int:
        return sum(1 for t, ok in self.events if not ok and t0 <= t <= t1)

    def max_gap_ms(self, t0: float, t1: float) -> float:
        return self.max_gap(t0, t1)[0]

    def max_gap(self, t0: float, t1: float) -> tuple[float, float]:
        """The longest gap between two acknowledged operations overlapping [t0, t1] (ms), and
        when it began (s after t0)."""
        ok = [t for t, good in self.events if good]
        return max((((b - a) * 1000, a - t0) for a, b in zip(ok, ok[1:], strict=False) if b >= t0 and a <= t1),
                   default=(0.0, 0.0))


class WriteProbe(Probe):
    """Writes every 5 ms on one connection, reconnecting when refused."""

    def __init__(self, stack: str, url: str) -> None:
        super().__init__(0.005)
        self.stack, self.url = stack, url
        self.client: Any = None

    def op(self) -> None:
        if self.client is None:
            if self.stack == "valkey":
                self.client = redis.Redis.from_url(self.url, socket_timeout=600, socket_connect_timeout=1)
            elif self.stack == "mariadb":
                self.client = mysql_connect(self.url)
                self.client.cursor().execute("CREATE TABLE IF NOT EXISTS bench_probe (at double) ENGINE=InnoDB")
            else:
                self.client = psycopg.connect(self.url, autocommit=True, connect_timeout=1)
                self.client.execute("CREATE TABLE IF NOT EXISTS bench_probe (at double precision)")
        if self.stack == "valkey":
            self.client.set("bench:probe", time.time())
        elif self.stack == "mariadb":
            self.client.cursor().execute("INSERT INTO bench_probe VALUES (%s)", (time.time(),))
        else:
            self.client.execute("INSERT INTO bench_probe VALUES (%s)", (time.time(),))

    def reset(self) -> None:
        self.client = None


class ConnectProbe(Probe):
    """A new connection (and one round trip) every 10 ms: a refusal is a failure."""

    def __init__(self, stack: str, url: str) -> None:
        super().__init__(0.010)
        self.stack, self.url = stack, url

    def op(self) -> None:
        if self.stack == "valkey":
            client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=1)
            try:
                client.ping()
            finally:
                client.close()
        elif self.stack == "mariadb":
            conn = mysql_connect(self.url)
            try:
                conn.cursor().execute("SELECT 1")
            finally:
                conn.close()
        else:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=1) as conn:
                conn.execute("SELECT 1")


# ---- loads -------------------------------------------------------------------------------------
def _gap_figures(per_client: dict[Any, list[float]], t0: float, t1: float, end: float) -> dict[str, Any]:
    gap, at = _client_gaps(per_client, t0, t1, end)
    return {"longest_client_gap_ms": gap, "longest_gap_began_s": at,
            "client_gaps_over_50ms": long_gaps(per_client, t0, t1, 0.050),
            "longest_gap_before_ms": _gap_before(per_client, t0)}


def _gap_before(per_client: dict[Any, list[float]], t0: float) -> float:
    """The longest wait between two acknowledged transactions of one client wholly within the
    BEFORE_S before the clone (ms): the load's own floor on this machine, beside the gap during."""
    return max((round((b - a) * 1000, 1) for times in per_client.values()
                for a, b in zip(sorted(times), sorted(times)[1:], strict=False) if t0 - BEFORE_S <= a and b < t0),
               default=0.0)


def long_gaps(per_client: dict[Any, list[float]], t0: float, t1: float, over_s: float) -> list[tuple[float, float]]:
    """(began, s after t0; length, ms) of every wait longer than ``over_s`` that one client had
    between two acknowledged transactions overlapping [t0, t1], in time order (overlapping waits
    of several clients listed once each)."""
    out = []
    for times in per_client.values():
        times = sorted(times)
        out += [(round(a - t0, 3), round((b - a) * 1000, 1)) for a, b in zip(times, times[1:], strict=False)
                if b >= t0 and a <= t1 and b - a > over_s]
    return sorted(out)


def _client_gaps(per_client: dict[Any, list[float]], t0: float, t1: float, end: float) -> tuple[float, float]:
    """The longest wait any one client had between two acknowledged transactions that overlaps
    [t0, t1] (ms), and when it began (s after t0); a client that stopped acknowledging (aborted)
    waited until the load's end."""
    worst, at = 0.0, 0.0
    for times in per_client.values():
        times = sorted(times)
        spans = [(a, b) for a, b in zip(times, times[1:], strict=False) if b >= t0 and a <= t1]
        if times and times[-1] < t1:
            spans.append((times[-1], end))
        for a, b in spans:
            if b - a > worst:
                worst, at = b - a, a - t0
    return worst * 1000, at


class PgbenchLoad:
    def __init__(self, driver: LocalDriver, node_id: str, duration_s: int, work: Path) -> None:
        _, ctx = driver._node(node_id)
        address, port = ADDRESSES["postgres"]
        self.prefix = work / "pgbench_log"
        self.argv = [str(postgres_bindir() / "pgbench"), "-n", "-c", "4", "-j", "2", "-T", str(duration_s),
                     "--max-tries=10", "--failures-detailed", "-l", f"--log-prefix={self.prefix}",
                     "-h", address, "-p", str(port), "-U", SUPERUSER, APP_DB]
        self.env = {**os.environ, "PGPASSWORD": ctx.secrets()["superuser_password"]}
        self.work = work

    def start(self) -> None:
        self.started = time.time()
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.work, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def finish(self) -> None:
        self.stdout, self.stderr = self.proc.communicate(timeout=900)
        self.ended = time.time()
        self.ok: dict[int, list[float]] = {}
        self.lat: list[tuple[float, float]] = []  # (completion time, latency ms)
        self.failed_logged = 0
        for path in self.work.glob("pgbench_log.*"):
            for line in path.read_text().splitlines():
                f = line.split()
                done = int(f[4]) + int(f[5]) / 1e6
                if f[2].isdigit():
                    self.ok.setdefault(int(f[0]), []).append(done)
                    self.lat.append((done, int(f[2]) / 1000))
                else:
                    self.failed_logged += 1

    def figures(self, t0: float, t1: float) -> dict[str, Any]:
        failed = re.search(r"number of failed transactions: (\d+)", self.stdout)
        processed = re.search(r"number of transactions actually processed: (\d+)", self.stdout)
        before = [ms for t, ms in self.lat if t0 - BEFORE_S <= t < t0]
        during = [ms for t, ms in self.lat if t0 <= t <= t1]
        return {"transactions": int(processed.group(1)) if processed else sum(map(len, self.ok.values())),
                "failed_transactions": int(failed.group(1)) if failed else self.failed_logged,
                "aborted_clients": len(set(re.findall(r"client (\d+) (?:script \d+ )?aborted", self.stderr))),
                "pgbench_exit": self.proc.returncode,
                **_gap_figures(self.ok, t0, t1, self.ended),
                "p99_before_ms": pct(before, 99), "p99_during_ms": pct(during, 99),
                "tx_before": len(before), "tx_during": len(during),
                "load_outlasted_clone": self.ended > t1}


class ThreadLoad:
    """4 clients, each looping one transaction; a failed one is counted and the client reconnects."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url, self.clients = url, clients
        self.ok: dict[int, list[float]] = {i: [] for i in range(clients)}
        self.lat: list[tuple[float, float]] = []
        self.failures: list[float] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def connect(self) -> Any:
        raise NotImplementedError

    def transaction(self, client: Any) -> None:
        raise NotImplementedError

    def _run(self, i: int) -> None:
        client = None
        while not self._stop.is_set():
            try:
                client = client or self.connect()
                sent = time.time()
                self.transaction(client)
                done = time.time()
                self.ok[i].append(done)
                self.lat.append((done, (done - sent) * 1000))
            except DB_ERRORS:
                self.failures.append(time.time())
                client = None
                time.sleep(0.005)

    def start(self) -> None:
        self.started = time.time()
        for t in self._threads:
            t.start()

    def finish(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        self.ended = time.time()

    def figures(self, t0: float, t1: float) -> dict[str, Any]:
        before = [ms for t, ms in self.lat if t0 - BEFORE_S <= t < t0]
        during = [ms for t, ms in self.lat if t0 <= t <= t1]
        return {"transactions": len(self.lat), "failed_transactions": len(self.failures), "aborted_clients": 0,
                **_gap_figures(self.ok, t0, t1, self.ended),
                "p99_before_ms": pct(before, 99), "p99_during_ms": pct(during, 99),
                "tx_before": len(before), "tx_during": len(during), "load_outlasted_clone": True}


def fill_postgres(driver: LocalDriver, node_id: str, mib: int) -> None:
    """pgbench -i at about 15 MiB per scale unit (as bench.downtime.fill)."""
    _, ctx = driver._node(node_id)
    address, port = ADDRESSES["postgres"]
    env = {**os.environ, "PGPASSWORD": ctx.secrets()["superuser_password"]}
    subprocess.run([str(postgres_bindir() / "pgbench"), "-i", "-q", "-s", str(max(1, round(mib / 15))),
                    "-h", address, "-p", str(port), "-U", SUPERUSER, APP_DB], env=env, check=True, capture_output=True)




class ClientProcess:
    """The load's and the probes' threads run in a process of their own, as real clients do.
    Threads of the driver's process share its interpreter lock with the clone's own work (copying,
    polling), which then showed as client gaps: a Valkey server whose latency monitor saw nothing
    over 6 ms, with clients reporting 36 ms. What they recorded comes back when they stop."""

    def __init__(self, clients: list[Any]) -> None:
        self.clients = clients
        self._proc: Any = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._done = ctx.Event()
        self._proc = ctx.Process(target=self._child, args=(child,), daemon=True)
        self._proc.start()

    def _child(self, conn: Any) -> None:
        for c in self.clients:
            c.start()
        self._done.wait()
        for c in self.clients:
            c.finish() if isinstance(c, ThreadLoad) else c.stop()
        conn.send([{k: v for k, v in vars(c).items() if _picklable(v)} for c in self.clients])

    def stop(self) -> None:
        if self._proc is None:
            return
        self._done.set()
        if not self._conn.poll(120):
            raise RuntimeError("the client process did not report")
        for c, state in zip(self.clients, self._conn.recv(), strict=True):
            vars(c).update(state)
        self._proc.join(30)
        self._proc = None


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # a live connection, a thread, a lock: the child's own
        return False
    return True


class ValkeyPairLoad(ThreadLoad):
    """MULTI INCR bench:a INCR bench:b EXEC."""

    def connect(self) -> Any:
        return redis.Redis.from_url(self.url, socket_timeout=600, socket_connect_timeout=1)

    def transaction(self, client: Any) -> None:
        pipe = client.pipeline(transaction=True)
        pipe.incr("bench:a")
        pipe.incr("bench:b")
        pipe.execute()


class TransferLoad(ThreadLoad):
    """A transfer between two accounts: UPDATE both in one InnoDB transaction (the balances sum to 0)."""

    def connect(self) -> Any:
        conn = mysql_connect(self.url)
        conn.autocommit(False)
        return conn

    def transaction(self, client: Any) -> None:
        try:
            with client.cursor() as cur:
                cur.execute("UPDATE bench_accounts SET balance = balance - 1 WHERE id = 1")
                cur.execute("UPDATE bench_accounts SET balance = balance + 1 WHERE id = 2")
            client.commit()
        except DB_ERRORS:
            try:
                client.close()
            finally:
                raise


def fill_mariadb(url: str, mib: int) -> None:
    """The accounts, and ``mib`` MiB of InnoDB rows beside them (random bytes: incompressible)."""
    conn = mysql_connect(url)
    cur = conn.cursor()
    cur.execute("CREATE TABLE bench_accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB")
    cur.execute("INSERT INTO bench_accounts VALUES (1, 0), (2, 0)")
    cur.execute("CREATE TABLE bench_blob (id INT AUTO_INCREMENT PRIMARY KEY, v LONGBLOB) ENGINE=InnoDB")
    chunk = os.urandom(256 * 1024)
    for _ in range(mib * 4 // 16):
        cur.executemany("INSERT INTO bench_blob (v) VALUES (%s)", [chunk[j:] + chunk[:j] for j in range(16)])
    conn.close()


def mariadb_invariant(url: str) -> dict[str, Any]:
    conn = mysql_connect(url)
    cur = conn.cursor()
    cur.execute("SELECT id, balance FROM bench_accounts ORDER BY id")
    rows = cur.fetchall()
    conn.close()
    balances = [int(b) for _, b in rows]
    return {"invariant_holds": len(balances) == 2 and sum(balances) == 0, "balances": balances}


# ---- the clone ---------------------------------------------------------------------------------
def clone(driver: LocalDriver, source: str, stack: str, mode: str, tag: str) -> dict[str, Any]:
    snap, copy_id = f"rc{tag}snap", f"rc{tag}copy"
    t: dict[str, float] = {"start": time.time()}
    if mode.partition("/")[0] == "stop":
        driver.prepare_snapshot(source, snap)
        t["quiesce"] = time.time()
        driver.quiesce(source)
        try:
            info = driver.snapshot(source, snap)
        finally:
            driver.restart(source, 600)
        t["source_back"] = time.time()
    else:
        # "online:<method>[/baseline]": the stack's ENVCLONE_*_ONLINE_METHOD
        with online_method(stack, mode.partition("/")[0].partition(":")[2]), copy_phases(t):
            info = driver.snapshot_online(source, snap)
        t["source_back"] = time.time()
    # As the workflow does for a snapshot the job does not retain: moved into place, unless off.
    driver.provision(snap, copy_id, consume=get_settings().provision_move)
    t["provisioned"] = time.time()
    driver.assign_address(copy_id, CLONE_ADDRESSES[stack], ADDRESSES[stack][1])
    credentials = get_stack(stack).new_credentials()
    driver.set_credentials(copy_id, credentials)
    t["credentials_set"] = time.time()
    driver.restart(copy_id, 600)
    t["end"] = time.time()
    phases = {k: round(v - t["start"], 3) for k, v in t.items() if k != "start"}
    return {"method": info.method, "snapshot_bytes": info.size_bytes, "window_ms": info.window_ms,
            "phases_s": phases,
            "clone_s": t["end"] - t["start"], "snapshot_done_s": t["source_back"] - t["start"],
            # Online: the hold the stack reports (a Valkey pause, mariadb-backup's BLOCK_COMMIT).
            "source_held_ms": (t["source_back"] - t["quiesce"]) * 1000
            if "quiesce" in t else float(info.window_ms),
            "t0": t["start"], "t1": t["end"], "copy_id": copy_id, "snap": snap, "credentials": credentials}


ONLINE_METHOD_ENV = {"postgres": "ENVCLONE_PG_ONLINE_METHOD", "valkey": "ENVCLONE_VALKEY_ONLINE_METHOD",
                     "mariadb": "ENVCLONE_MARIADB_ONLINE_METHOD"}


@contextmanager
def copy_phases(t: dict[str, float]) -> Iterator[None]:
    """Records in ``t`` when each copy_tree of the online copy began and ended (``copy<n>_start``,
    ``copy<n>_end``): the backup API's data-directory copy runs between pg_backup_start and
    pg_backup_stop."""
    real = snapshots.copy_tree

    def timed_copy(*args: Any, **kwargs: Any) -> int:
        n = sum(1 for k in t if k.endswith("_start"))
        t[f"copy{n}_start"] = time.time()
        try:
            return real(*args, **kwargs)
        finally:
            t[f"copy{n}_end"] = time.time()

    snapshots.copy_tree = timed_copy  # type: ignore[assignment]
    try:
        yield
    finally:
        snapshots.copy_tree = real  # type: ignore[assignment]


_PG_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (\S+) \[\d+\] (?:\S+ )?LOG:  (.*)$")


def pg_log_events(log: Path, t0: float, t1: float) -> list[tuple[float, str]]:
    """(s after t0, message) of the server log's checkpoint and recovery lines within [t0, t1]."""
    out = []
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        m = _PG_LOG_TIME.match(line)
        if not m or not re.search(r"checkpoint|redo|recovery|backup|ready to accept", m.group(3)):
            continue
        stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
        at = stamp.replace(tzinfo=UTC).timestamp() if m.group(2) in ("UTC", "GMT") else stamp.timestamp()
        if t0 - 1 <= at <= t1 + 1:
            out.append((round(at - t0, 3), m.group(3)[:160]))
    return out


@contextmanager
def online_method(stack: str, method: str) -> Iterator[None]:
    """The stack's ENVCLONE_*_ONLINE_METHOD for the calls inside (unchanged when ``method`` is empty)."""
    with settings_env({ONLINE_METHOD_ENV[stack]: method} if method else {}):
        yield


# A mode ending in "/baseline" clones as before the paced copy: no write-behind, provision copies.
SUFFIX_ENV = {"baseline": {"ENVCLONE_COPY_WRITE_BEHIND_MIB": "0", "ENVCLONE_PROVISION_MOVE": "false"}}


@contextmanager
def settings_env(values: dict[str, str]) -> Iterator[None]:
    """These ENVCLONE_* settings for the calls inside; the environment as it was afterwards."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()



def pg_invariant(address: str, port: int, password: str) -> dict[str, Any]:
    with psycopg.connect(host=address, port=port, user=SUPERUSER, password=password, dbname=APP_DB,
                         connect_timeout=10) as conn:
        a, t, b, h, n = conn.execute(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers),"
            " (SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
            " (SELECT count(*) FROM pgbench_history)").fetchone()
    return {"invariant_holds": a == t == b == h, "sums": [int(a), int(t), int(b), int(h)], "history_rows": n}


def valkey_latency_reset(url: str) -> None:
    """Valkey's own latency monitor on the source (events of 5 ms and more), from now on."""
    with redis.Redis.from_url(url, socket_timeout=10) as client:
        client.config_set("latency-monitor-threshold", 5)
        client.execute_command("LATENCY", "RESET")


def valkey_latency_events(url: str, t0: float) -> dict[str, list[tuple[int, int]]]:
    """event -> [(s after t0, ms)]: where the source's own main thread stalled (fork, aof-write,
    aof-fsync..., command), as its latency monitor saw it (one sample per event per second)."""
    with redis.Redis.from_url(url, socket_timeout=10) as client:
        latest = client.execute_command("LATENCY", "LATEST")
        return {(e := row[0].decode() if isinstance(row[0], bytes) else row[0]):
                [(int(ts - t0), int(ms)) for ts, ms in client.execute_command("LATENCY", "HISTORY", e)]
                for row in latest}


def valkey_invariant(url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url, socket_timeout=10)
    a, b = (int(client.get(k) or 0) for k in ("bench:a", "bench:b"))
    client.close()
    return {"invariant_holds": a == b, "pair": [a, b]}


def run_one(driver: LocalDriver, source: str, stack: str, mode: str, tag: str, budget_s: float,
            work: Path) -> dict[str, Any]:
    url = driver.url(source)
    if stack == "postgres":
        load: Any = PgbenchLoad(driver, source, int(BEFORE_S + budget_s + AFTER_S), work)
    elif stack == "mariadb":
        load = TransferLoad(url)
    else:
        load = ValkeyPairLoad(url)
    probes = [WriteProbe(stack, url), ConnectProbe(stack, url)]
    clients = ClientProcess([*probes, *([load] if isinstance(load, ThreadLoad) else [])])
    result: dict[str, Any] = {}
    try:
        clients.start()
        if not isinstance(load, ThreadLoad):
            load.start()  # pgbench: a process of its own already
        time.sleep(BEFORE_S)
        if stack == "valkey":
            valkey_latency_reset(url)
        with settings_env(SUFFIX_ENV.get(mode.partition("/")[2], {})):
            c = clone(driver, source, stack, mode, tag)
        if stack != "postgres":
            time.sleep(AFTER_S)
        if not isinstance(load, ThreadLoad):
            load.finish()
        clients.stop()
        t0, t1 = c["t0"], c["t1"]
        result = {**{k: v for k, v in c.items() if k not in ("credentials",)}, **load.figures(t0, t1),
                  "probe_write_gap_ms": probes[0].max_gap_ms(t0, t1),
                  "probe_gap_began_s": probes[0].max_gap(t0, t1)[1],
                  "probe_write_failures": probes[0].failures(t0, t1),
                  "refused_connections": probes[1].failures(t0, t1),
                  "connect_attempts": sum(1 for t, _ in probes[1].events if t0 <= t <= t1)}
        if stack == "postgres":
            result.update(pg_invariant(CLONE_ADDRESSES[stack], ADDRESSES[stack][1],
                                       c["credentials"]["superuser_password"]))
            result["source_log"] = pg_log_events(driver.log_path(source), t0, t1)
            result["copy_log"] = pg_log_events(driver.log_path(c["copy_id"]), t0, t1)
        elif stack == "mariadb":
            result.update(mariadb_invariant(driver.url(c["copy_id"])))
        else:
            result.update(valkey_invariant(driver.url(c["copy_id"])))
            result["source_latency"] = valkey_latency_events(url, t0)
        return result
    finally:
        clients.stop()
        if getattr(load, "proc", None) is not None and load.proc.poll() is None:
            load.proc.kill()
            load.proc.wait()
        if isinstance(load, ThreadLoad):
            load._stop.set()
        driver.destroy_node(f"rc{tag}copy")
        driver.delete_snapshot(f"rc{tag}snap")
        for path in work.glob("pgbench_log.*"):
            path.unlink()


def measure(root: Path, stack: str, mib: int, modes: list[str], label: str) -> list[dict[str, Any]]:
    driver = LocalDriver(root)
    source = f"rc{stack}"
    address, port = ADDRESSES[stack]
    work = Path(tempfile.mkdtemp(prefix="envclone-rc-", dir="/tmp"))
    work.chmod(0o777)
    out = []
    try:
        driver.create_node(NodeSpec(source, stack, address, port))
        started = time.monotonic()
        if stack == "postgres":
            fill_postgres(driver, source, mib)
        elif stack == "mariadb":
            fill_mariadb(driver.url(source), mib)
        else:
            fill_valkey(driver.url(source), mib)
        fill_s = time.monotonic() - started
        driver.stop(source)
        driver.restart(source, 600)
        budget = 60.0 if not driver.reflink else 30.0
        budget *= max(1.0, mib / 1024)
        for n, mode in enumerate(modes):
            r = run_one(driver, source, stack, mode, f"{stack[0]}{n}", budget, work)
            budget = max(20.0, 2.0 * r["clone_s"] + 10)
            r.update(stack=stack, size_mib=mib, mode=mode, root=label, filesystem=filesystem(root),
                     reflink=driver.reflink, fill_s=fill_s, volume_bytes=tree_size(driver.volume(source)))
            out.append(r)
            print(f"realclient {label:<11} {stack:<8} {mib:>5} MiB {mode:<6}: clone {r['clone_s']:.1f}s "
                  f"({r['method']}), longest client gap {r['longest_client_gap_ms']:.0f} ms (before the clone "
                  f"{r['longest_gap_before_ms']:.0f} ms), probe gap "
                  f"{r['probe_write_gap_ms']:.0f} ms, failed {r['failed_transactions']}, aborted "
                  f"{r['aborted_clients']}, refused {r['refused_connections']}/{r['connect_attempts']}, p99 "
                  f"{r['p99_before_ms']:.1f} -> {r['p99_during_ms']:.1f} ms, invariant "
                  f"{'holds' if r['invariant_holds'] else 'BROKEN'}", flush=True)
            if os.environ.get("BENCH_REALCLIENT_DETAIL"):
                print(f"  phases (s after clone start): {r['phases_s']}", flush=True)
                print(f"  client gaps > 50 ms (began s, ms): {r['client_gaps_over_50ms']}", flush=True)
                for key in ("source_log", "copy_log"):
                    for at, msg in r.get(key, []):
                        print(f"  {key} {at:8.3f} {msg}", flush=True)
                if r.get("source_latency"):
                    print(f"  source stalls (event: [(s, ms)]): {r['source_latency']}", flush=True)
    finally:
        driver.destroy_node(source)
        shutil.rmtree(work, ignore_errors=True)
    return out


def data_roots(stack: ExitStack, roots: list[str], default_root: Path, largest_mib: int,
               who: str) -> list[tuple[str, Path]]:
    """(label, data root) to measure on: ``default`` (the given directory) and ``xfs`` (a reflink
    loop image sized for ``largest_mib``, kept until ``stack`` closes; skipped, said, without root)."""
    places = []
    if "default" in roots:
        places.append(("default", default_root))
    if "xfs" in roots:
        xfs = stack.enter_context(xfs_root(max(8, largest_mib * 4 // 1024 + 4)))
        if xfs is not None:
            places.append(("xfs-reflink", xfs / "var"))
        else:
            print(f"{who}: no XFS loop image (needs root and mkfs.xfs): skipped", flush=True)
    for _, root in places:
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
    return places


def run(sizes_mib: list[int], roots: list[str], default_root: Path, valkey_mib: int,
        stacks: list[str], mariadb_mib: int = 256, modes: list[str] | None = None,
        valkey_modes: list[str] | None = None, mariadb_modes: list[str] | None = None) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    modes = modes or ["online", "online/baseline", "stop"]
    with ExitStack() as stack:
        largest = max(sizes_mib + [valkey_mib, mariadb_mib])  # mariadb-backup's copy needs room too
        for label, root in data_roots(stack, roots, default_root, largest, "realclient"):
            if "postgres" in stacks:
                for mib in sizes_mib:
                    results += measure(root, "postgres", mib, modes, label)
            if "valkey" in stacks:
                # The online methods side by side in one run: on a reflink root the short pause
                # (aof_pause, auto's choice there), the fork-free AOF prefix, and BGSAVE's fork.
                reflink = snapshots.reflink_at(root)
                wanted = valkey_modes or ["online:aof_pause", "online:aof", "online:bgsave", "stop"]
                runnable = [m for m in wanted if reflink or not m.startswith("online:aof_pause")]
                if runnable != wanted:
                    print(f"realclient {label}: no reflink here, so no online:aof_pause", flush=True)
                results += measure(root, "valkey", valkey_mib, runnable, label)
            if "mariadb" in stacks:
                if mariadb_backup() is None:
                    print("realclient: no mariadb-backup, so no online copy of MariaDB: skipped", flush=True)
                else:
                    # On a reflink root the reflink copy (auto's choice there) beside mariadb-backup.
                    reflink = snapshots.reflink_at(root)
                    wanted = mariadb_modes or (["online:reflink", "online:backup", "stop"] if reflink
                                               else ["online:backup", "stop"])
                    runnable = [m for m in wanted if reflink or not m.startswith("online:reflink")]
                    if runnable != wanted:
                        print(f"realclient {label}: no reflink here, so no MariaDB online:reflink", flush=True)
                    results += measure(root, "mariadb", mariadb_mib, runnable, label)
    return results
