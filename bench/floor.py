"""The machine's own floor under the real-client gap targets: each stack's load from bench.realclient
against one of our nodes with nothing else running -- no clone, no copy -- for a clone-length
window, in two arms alternating on the same node: commits durable as the node is configured
(MariaDB flushes its redo log at each commit; Valkey appends and fsyncs every second) and the same
load with that flush off. What the durable arm shows is what a clone's longest gap cannot be told
apart from on this machine; the gap between the arms is the disk's flush tail."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pymysql
import redis

from bench.common import filesystem, fill_valkey, pct
from bench.realclient import ClientProcess, ThreadLoad, TransferLoad, ValkeyPairLoad, fill_mariadb, mysql_connect
from shared.drivers import NodeSpec
from shared.drivers.local import LocalDriver
from shared.stacks.mariadb import SUPERUSER as MARIADB_SUPERUSER
from shared.stacks.mariadb import mariadb_binaries

# Off the realclient bench's addresses (127.120.0.1-13) and the test suites' pools.
ADDRESSES = {"mariadb": ("127.120.0.21", 3306), "valkey": ("127.120.0.22", 6379)}


def _mariadb_flush(driver: LocalDriver, node: str) -> Callable[[bool], None]:
    _, ctx = driver._node(node)
    creds = ctx.secrets()  # the server-wide setting needs the node's superuser, not the app's account
    url = f"mysql://{creds.get('superuser', MARIADB_SUPERUSER)}:{quote(creds['superuser_password'], safe='')}" \
          f"@{ctx.address}:{ctx.port}/"

    def flush(durable: bool) -> None:
        conn = mysql_connect(url)
        with conn.cursor() as cur:
            cur.execute(f"SET GLOBAL innodb_flush_log_at_trx_commit = {1 if durable else 2}")
        conn.close()
    return flush


def _valkey_flush(url: str) -> Callable[[bool], None]:
    def flush(durable: bool) -> None:
        client = redis.Redis.from_url(url, socket_timeout=10)
        client.config_set("appendfsync", "everysec" if durable else "no")  # the node's own: everysec
        client.close()
    return flush


def window(load: ThreadLoad, seconds: float) -> dict[str, Any]:
    """Run ``load`` in a process of its own for ``seconds``; its gaps and p99 after the first second."""
    clients = ClientProcess([load])
    clients.start()
    t0 = time.time()
    time.sleep(seconds)  # the measured window itself: nothing to wait for
    clients.stop()
    gaps: list[float] = []
    for times in load.ok.values():
        # Waits overlapping the window: a client still waiting when it closed waited until then (as
        # realclient counts it), one that has not committed since it opened waited from then.
        times = [t0 + 1, *sorted(t for t in times if t >= t0 + 1), load.ended]
        gaps += [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False)]
    gaps.sort(reverse=True)
    lat = [ms for t, ms in load.lat if t >= t0 + 1]
    return {"longest_gap_ms": round(gaps[0], 1) if gaps else 0.0, "gaps_over_20ms": sum(g > 20 for g in gaps),
            "gaps_over_50ms": sum(g > 50 for g in gaps), "p99_ms": round(pct(lat, 99), 1),
            "transactions": len(lat), "failed": len(load.failures)}


def measure(root: Path, stack: str, mib: int, seconds: float, rounds: int) -> list[dict[str, Any]]:
    driver = LocalDriver(root)
    node = f"floor{stack}"
    address, port = ADDRESSES[stack]
    rows = []
    try:
        driver.create_node(NodeSpec(node, stack, address, port))
        url = driver.url(node)
        if stack == "mariadb":
            fill_mariadb(url, mib)
            flush, make = _mariadb_flush(driver, node), lambda: TransferLoad(url)
        else:
            fill_valkey(url, mib)
            flush, make = _valkey_flush(url), lambda: ValkeyPairLoad(url)
        driver.stop(node)  # as realclient starts its source after the fill: a server that loaded its data
        driver.restart(node, 600)
        for n in range(rounds):
            for durable in (True, False) if n % 2 == 0 else (False, True):
                flush(durable)
                r = {"stack": stack, "size_mib": mib, "round": n, "durable": durable, "window_s": seconds,
                     "filesystem": filesystem(root), **window(make(), seconds)}
                rows.append(r)
                arm = "durable" if durable else "no flush"
                print(f"floor {stack:<8} {mib:>5} MiB {arm:<8} {seconds:.0f}s: "
                      f"longest gap {r['longest_gap_ms']:.0f} ms, >20 ms {r['gaps_over_20ms']}, "
                      f">50 ms {r['gaps_over_50ms']}, p99 {r['p99_ms']:.1f} ms, {r['transactions']} tx, "
                      f"{r['failed']} failed", flush=True)
        flush(True)
    except (pymysql.Error, redis.RedisError) as exc:
        raise RuntimeError(f"floor {stack}: {exc}") from exc
    finally:
        driver.destroy_node(node)
    return rows


def run(stacks: list[str], mib: int = 1024, seconds: float = 20.0, rounds: int = 2,
        data_root: Path | None = None) -> list[dict[str, Any]]:
    root = data_root or Path(tempfile.mkdtemp(prefix="envclone-floor-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    rows: list[dict[str, Any]] = []
    try:
        for stack in stacks:
            if stack == "mariadb":
                try:
                    mariadb_binaries()
                except FileNotFoundError as exc:
                    print(f"floor: no MariaDB server here, so no MariaDB floor: skipped ({exc})", flush=True)
                    continue
            rows += measure(root, stack, mib, seconds, rounds)
        return rows
    finally:
        if data_root is None:
            shutil.rmtree(root, ignore_errors=True)
