"""Test helpers: deadline waits (never bare sleeps), leak accounting and process races."""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling, report the last error on timeout
            last_exc = exc
        time.sleep(interval)  # poll
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


def processes_under(root: Path) -> list[tuple[int, str]]:
    """Live processes whose command line or working directory is inside ``root``."""
    root_s = str(root)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                cwd = ""
        except (OSError, IndexError):
            continue
        if root_s in cmd or cwd.startswith(root_s):
            found.append((int(entry), cmd.strip()))
    return found


@contextmanager
def worker_stopped_at(script: str, root: Path, env: dict[str, str], ready: str) -> Iterator[subprocess.Popen[str]]:
    """A worker process running ``script`` (argv[1]: the data root) that stops where it prints
    ``ready``; yielded once it has, for the test to kill it there (it is killed on exit anyway)."""
    worker = subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **env})
    try:
        assert worker.stdout is not None
        reached, _, _ = select.select([worker.stdout], [], [], 60)
        assert reached and worker.stdout.readline().strip() == ready, f"the worker never got to {ready!r}"
        yield worker
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)


def race(target: Callable[..., None], arg_sets: list[tuple[Any, ...]], timeout: float = 120.0) -> list[Any]:
    """Run ``target(*args, barrier, out)`` in a spawned process per ``args``, all released at once by
    ``barrier``; what each put on ``out``, once every process exited cleanly."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(arg_sets)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, out)) for args in arg_sets]
    for p in procs:
        p.start()
    results = [out.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results
