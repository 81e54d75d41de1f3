"""PostgreSQL online copy, its two methods side by side under the same pgbench load (issue 15):
``backup_api`` (pg_backup_start with a fast checkpoint, copy or reflink of the data directory while
the source serves, pg_backup_stop, label and WAL written into the copy) and ``basebackup``
(pg_basebackup -X stream -c fast, through a relay from the node's own address). Each on the
default data root (ext4 here) and on an XFS reflink loop image (root only), one source per root,
filled once; the clone and the figures are bench.realclient's: longest client gap, failed
transactions, refused connections, p99 during vs before, copy time (snapshot_online), the
invariant on the copy."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import realclient

METHODS = ("backup_api", "basebackup")


def run(mib: int, roots: list[str], default_root: Path, rounds: int = 1) -> list[dict[str, Any]]:
    """``rounds`` > 1: the methods again, in turn reversed (ABBA...), on the same source: the source
    grows under the load, and the later run would otherwise always meet the bigger one."""
    results: list[dict[str, Any]] = []
    order = [METHODS if n % 2 == 0 else METHODS[::-1] for n in range(rounds)]
    modes = [f"online:{m}" for methods in order for m in methods]
    with ExitStack() as stack:
        for label, root in realclient.data_roots(stack, roots, default_root, mib, "pg_online"):
            for n, r in enumerate(realclient.measure(root, "postgres", mib, modes, label)):
                r["pg_online_method"] = r["mode"].partition(":")[2]
                r["round"] = n // len(METHODS) + 1
                r["copy_s"] = r["snapshot_done_s"]
                results.append(r)
    return results
