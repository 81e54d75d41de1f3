"""Source downtime per node (quiesce start -> source healthy again) for postgres (pgbench data) and
valkey at several sizes, on the default data root and on a reflink-capable XFS loop image, side by
side with the naive way -- stop, `cp -a --reflink=never` the data directory, start -- on the same
data in the same process. A probe client writes to the source through every window, so beside
the server-side figure stands the longest gap between acknowledged writes that a user saw."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench import common
from bench.common import filesystem, median, ratio, timed
from shared.drivers import NodeSpec
from shared.drivers.local import LocalDriver
from shared.snapshots import tree_size
from shared.stacks.postgres import SUPERUSER, postgres_bindir
from tests.helpers import wait_for

MIB = 1024 * 1024
ADDRESSES = {"postgres": ("127.110.0.1", 5432), "valkey": ("127.110.0.2", 6379)}


def fill(driver: LocalDriver, node_id: str, stack: str, mib: int) -> None:
    address, port = ADDRESSES[stack]
    if stack == "postgres":
        _, ctx = driver._node(node_id)
        env = {**os.environ, "PGPASSWORD": ctx.secrets()["superuser_password"]}
        scale = max(1, round(mib / 15))  # pgbench: about 15 MiB per scale unit
        subprocess.run([str(postgres_bindir() / "pgbench"), "-i", "-q", "-s", str(scale), "-h", address,
                        "-p", str(port), "-U", SUPERUSER, "app"], env=env, check=True, capture_output=True)
    else:
        common.fill_valkey(driver.url(node_id), mib)


class WriteProbe:
    """A client of the source writing every few ms through the window, reconnecting when refused:
    the longest gap between two acknowledged writes is the outage a user of the source saw."""

    PACE_S = 0.005  # pacing, not synchronisation: the gap's resolution and a light write load

    def __init__(self, driver: LocalDriver, node_id: str, stack: str) -> None:
        self.stack, self.url = stack, driver.url(node_id)
        self.acked: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self) -> Any:
        if self.stack == "valkey":
            return redis.Redis.from_url(self.url, socket_timeout=600, socket_connect_timeout=1)
        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=1)
        conn.execute("CREATE TABLE IF NOT EXISTS bench_probe (at double precision)")
        return conn

    def _write(self, client: Any) -> None:
        if self.stack == "valkey":
            client.set("bench:probe", time.time())
        else:
            client.execute("INSERT INTO bench_probe VALUES (%s)", (time.time(),))

    def _run(self) -> None:
        client = None
        while not self._stop.is_set():
            try:
                client = client or self._connect()
                self._write(client)
                self.acked.append(time.perf_counter())
            except (redis.RedisError, psycopg.Error, OSError):
                client = None  # the server is away: connect again
            self._stop.wait(self.PACE_S)

    def __enter__(self) -> WriteProbe:
        self._thread.start()
        wait_for(lambda: len(self.acked) >= 3, 30, 0.005, "probe writes before the window")
        return self

    def settle(self, after: float) -> None:
        wait_for(lambda: sum(t > after for t in self.acked) >= 3, 120, 0.005, "probe writes after the window")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def max_gap_ms(self) -> float:
        return max((b - a) * 1000 for a, b in zip(self.acked, self.acked[1:], strict=False))


def _probed(driver: LocalDriver, node_id: str, stack: str, window: Any) -> tuple[float, float, Any]:
    with WriteProbe(driver, node_id, stack) as probe:
        downtime_ms, value = timed(window)
        probe.settle(time.perf_counter())
    return downtime_ms, probe.max_gap_ms(), value


def ours(driver: LocalDriver, node_id: str, stack: str, n: int) -> dict[str, Any]:
    snap = f"bench{n}"
    precopy_ms, _ = timed(lambda: driver.prepare_snapshot(node_id, snap))  # before the window

    def window() -> Any:
        driver.quiesce(node_id)
        info = driver.snapshot(node_id, snap)
        driver.restart(node_id, 600)
        return info

    downtime_ms, gap_ms, info = _probed(driver, node_id, stack, window)
    driver.delete_snapshot(snap)
    return {"downtime_ms": downtime_ms, "write_gap_ms": gap_ms, "method": info.method,
            "in_window_copy_ms": info.window_ms, "precopy_ms": precopy_ms}


def naive(driver: LocalDriver, node_id: str, stack: str, scratch: Path) -> dict[str, Any]:
    target = scratch / "naive-copy"

    def window() -> None:
        driver.stop(node_id)
        subprocess.run(["cp", "-a", "--reflink=never", str(driver.volume(node_id) / "data"), str(target)],
                       check=True)
        driver.restart(node_id, 600)

    downtime_ms, gap_ms, _ = _probed(driver, node_id, stack, window)
    shutil.rmtree(target)
    return {"downtime_ms": downtime_ms, "write_gap_ms": gap_ms}


def measure(root: Path, stack: str, mib: int, repeats: int) -> dict[str, Any]:
    driver = LocalDriver(root)
    node_id = f"bench{stack}"
    address, port = ADDRESSES[stack]
    try:
        driver.create_node(NodeSpec(node_id, stack, address, port))
        fill_ms, _ = timed(lambda: fill(driver, node_id, stack, mib))
        driver.stop(node_id)  # let the data settle on disk (valkey writes its RDB) before measuring
        driver.restart(node_id, 600)
        runs_ours, runs_naive = [], []
        for n in range(repeats):  # interleaved, so both see the same cache state and data
            runs_ours.append(ours(driver, node_id, stack, n))
            runs_naive.append(naive(driver, node_id, stack, root))
        o = median([r["downtime_ms"] for r in runs_ours])
        b = median([r["downtime_ms"] for r in runs_naive])
        gap_o = median([r["write_gap_ms"] for r in runs_ours])
        gap_b = median([r["write_gap_ms"] for r in runs_naive])
        return {"stack": stack, "size_mib": mib, "volume_bytes": tree_size(driver.volume(node_id)),
                "filesystem": filesystem(root), "reflink": driver.reflink, "fill_ms": fill_ms,
                "ours_ms": o, "naive_ms": b, "ratio": ratio(b, o), "method": runs_ours[-1]["method"],
                "write_gap_ours_ms": gap_o, "write_gap_naive_ms": gap_b,
                "runs_ours": runs_ours, "runs_naive": runs_naive}
    finally:
        driver.destroy_node(node_id)


@contextmanager
def xfs_root(size_gib: int) -> Any:
    """A reflink-capable XFS loop image (root only)."""
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
        yield None
        return
    work = Path(tempfile.mkdtemp(prefix="envclone-bench-xfs-", dir="/tmp"))
    work.chmod(0o755)
    image, mnt = work / "xfs.img", work / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_gib * 1024 * MIB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    mnt.chmod(0o755)
    try:
        yield mnt
    finally:
        # A node process that is still exiting keeps the mount busy for a moment: detach lazily
        # rather than delete files out from under a mount that is still there.
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def run(sizes_mib: list[int], stacks: list[str], default_root: Path) -> list[dict[str, Any]]:
    results = []
    default_root.mkdir(parents=True, exist_ok=True)
    default_root.chmod(0o755)
    biggest = max(sizes_mib)
    with xfs_root(max(8, biggest * 5 // 1024 + 4)) as xfs:
        roots = [("default", default_root)] + ([("xfs-reflink", xfs / "var")] if xfs else [])
        for label, root in roots:
            root.mkdir(parents=True, exist_ok=True)
            root.chmod(0o755)
            for stack in stacks:
                for mib in sizes_mib:
                    repeats = 3 if mib <= 1024 else 2
                    started = time.monotonic()
                    r = measure(root, stack, mib, repeats)
                    r["root"] = label
                    results.append(r)
                    print(f"downtime {label:<12} {stack:<8} {mib:>5} MiB: ours {r['ours_ms']:8.0f} ms "
                          f"({r['method']})  naive {r['naive_ms']:8.0f} ms  ratio {r['ratio']:5.1f}x  "
                          f"client write gap {r['write_gap_ours_ms']:.0f} vs {r['write_gap_naive_ms']:.0f} ms  "
                          f"[{time.monotonic() - started:.0f}s]", flush=True)
    return results
