"""What every benchmark shares: the machine description, timing, and writing results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

RESULTS = Path(__file__).parent / "results"
MIB = 1024 * 1024


def filesystem(path: Path) -> str:
    out = subprocess.run(["df", "--output=fstype", str(path)], capture_output=True, text=True, check=False)
    lines = out.stdout.split()
    return lines[-1] if len(lines) > 1 else "unknown"


def machine(data_root: Path | None = None) -> dict[str, Any]:
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return {"cores": os.cpu_count(), "memory_mib": mem, "kernel": platform.release(),
            "python": platform.python_version(),
            "filesystem": filesystem(data_root) if data_root else None}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return (time.perf_counter() - start) * 1000, value


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def ratio(baseline: float, ours: float) -> float:
    return baseline / ours if ours else float("inf")


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"

def fill_valkey(url: str, mib: int) -> None:
    """``mib`` values of 1 MiB through the node's URL (it has a password), then an append-only
    rewrite, as a long-running server would have done."""
    client = redis.Redis.from_url(url, socket_timeout=600)
    value = os.urandom(MIB)
    for start in range(0, mib, 64):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(mib, start + 64)):
            pipe.set(f"blob:{i}", value[i % 1024:] + value[: i % 1024])
        pipe.execute()
    try:
        client.bgrewriteaof()
    except redis.ResponseError:
        pass  # valkey's own auto-rewrite is already at it
    while client.info("persistence")["aof_rewrite_in_progress"] or client.info("persistence")["aof_rewrite_scheduled"]:
        time.sleep(0.1)  # poll: valkey reports the rewrite's end only through INFO
    client.close()
