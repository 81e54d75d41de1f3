"""How long a MariaDB source refuses writes while it is copied, three ways, on the same node:

- stop: the clone's default today -- pre-copy, FLUSH TABLES + shutdown, delta copy, start;
- ftwrl: FLUSH TABLES WITH READ LOCK held across a delta copy of the live volume (pre-copied
  first). Measured only for its lock time: the lock does not stop InnoDB's background writes, so
  such a copy is not known to be consistent (envclone does not offer it);
- online: mariadb-backup while serving (the stack's online_copy), writes wait only for its
  BACKUP STAGE BLOCK_COMMIT.

A probe commits a row every 5 ms through each window, reconnecting when refused; the figure is the
longest gap between two acknowledged commits.

    python -m bench.mariadb_windows --mib 100 --runs 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pymysql

from shared import snapshots
from shared.drivers import NodeSpec
from shared.drivers.local import LocalDriver
from shared.stacks import get_stack
from shared.stacks.mariadb import mariadb_backup
from tests.conftest import destroy_everything, make_data_root
from tests.helpers import wait_for

ADDRESS = "127.110.0.3"


def connect(url: str) -> pymysql.Connection:
    u = urlsplit(url)
    return pymysql.connect(host=u.hostname, port=u.port, user=u.username, password=u.password,
                           database=u.path.lstrip("/"), autocommit=True, connect_timeout=1, read_timeout=600)


class Probe:
    PACE_S = 0.005  # pacing, not synchronisation: the gap's resolution and a light write load

    def __init__(self, url: str) -> None:
        self.url, self.acked, self.n = url, [], int(time.time() * 1000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                conn = conn or connect(self.url)
                self.n += 1
                conn.cursor().execute("INSERT INTO probe VALUES (%s)", (self.n,))
                self.acked.append(time.perf_counter())
            except (pymysql.MySQLError, OSError):
                conn = None
            self._stop.wait(self.PACE_S)

    def __enter__(self) -> Probe:
        self._thread.start()
        wait_for(lambda: len(self.acked) >= 3, 30, 0.005, "probe writes before the window")
        return self

    def __exit__(self, *exc: object) -> None:
        after = time.perf_counter()
        wait_for(lambda: sum(t > after for t in self.acked) >= 3, 120, 0.005, "probe writes after the window")
        self._stop.set()
        self._thread.join(30)

    def max_gap_ms(self) -> float:
        return max((b - a) * 1000 for a, b in zip(self.acked, self.acked[1:], strict=False))


def run(mib: int, runs: int) -> dict[str, list[float]]:
    root = make_data_root("envclone-bench-")
    driver = LocalDriver(root)
    stack = get_stack("mariadb")
    try:
        driver.create_node(NodeSpec("src", "mariadb", ADDRESS, 3306))
        _, ctx = driver._node("src")
        url = driver.url("src")
        rows = mib * 1024 * 1024 // 300
        with connect(url) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE big (id INT PRIMARY KEY, pad VARCHAR(256))")
            cur.execute(f"INSERT INTO big SELECT seq, REPEAT(MD5(seq), 8) FROM seq_1_to_{rows}")
            cur.execute("CREATE TABLE probe (n BIGINT PRIMARY KEY)")
        root_pw = ctx.secrets()["superuser_password"]
        gaps: dict[str, list[float]] = {"stop": [], "ftwrl": [], "online": []}
        for i in range(runs):
            driver.prepare_snapshot("src", f"stop{i}")
            with Probe(url) as probe:
                driver.quiesce("src")
                driver.snapshot("src", f"stop{i}")
                driver.restart("src", 600)
            gaps["stop"].append(probe.max_gap_ms())
            driver.delete_snapshot(f"stop{i}")

            scratch = Path(tempfile.mkdtemp(dir=root))
            snapshots.precopy_tree(ctx.volume, scratch / "copy", ignore=lambda rel: rel.split("/")[0] == "run")
            with pymysql.connect(host=ADDRESS, port=3306, user="root", password=root_pw) as lock, Probe(url) as probe:
                lock.cursor().execute("FLUSH TABLES WITH READ LOCK")
                snapshots.sync_tree(ctx.volume, scratch / "copy", ignore=lambda rel: rel.split("/")[0] == "run")
                lock.cursor().execute("UNLOCK TABLES")
            gaps["ftwrl"].append(probe.max_gap_ms())
            shutil.rmtree(scratch)

            if mariadb_backup():
                scratch = Path(tempfile.mkdtemp(dir=root))
                with Probe(url) as probe:
                    stack.online_copy(ctx, scratch / "copy", lambda s, d, ig: snapshots.copy_tree(
                        s, d, reflink=driver.reflink, ignore=ig, live=True))
                gaps["online"].append(probe.max_gap_ms())
                shutil.rmtree(scratch)
        return gaps
    finally:
        destroy_everything(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    gaps = run(args.mib, args.runs)
    print(f"longest gap between acknowledged commits, {args.mib} MiB, {args.runs} runs (ms):")
    for method, values in gaps.items():
        if values:
            print(f"  {method:7} median {statistics.median(values):8.1f}   worst {max(values):8.1f}   "
                  f"all {', '.join(f'{v:.0f}' for v in values)}")
        else:
            print(f"  {method:7} not measured (mariadb-backup is not installed)")


if __name__ == "__main__":
    main()
