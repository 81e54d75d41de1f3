"""MariaDB copied online by reflinks on an XFS data root (shared/stacks/mariadb_reflink.py), with
real servers under a real transfer load: the copy is one moment and recovers on its first start,
no commit waits for it, a checkpoint written during the copy discards the attempt, and a worker
killed in the middle leaves the source no backup stage."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from shared.drivers import NodeSpec
from shared.drivers.local import LocalDriver
from shared.stacks import get_stack, mariadb_reflink
from shared.stacks.mariadb import mariadb_backup
from tests.helpers import wait_for, worker_stopped_at
from tests.integration.test_mariadb import MISSING, Writer, connect, fill, query

pytestmark = [pytest.mark.integration, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

SRC, COPY = "127.111.251.1", "127.111.251.2"  # apart from test_mariadb.py's, which may run beside


@pytest.fixture
def source(xfs_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LocalDriver, str]]:
    """A MariaDB node on the XFS root with 100 accounts of 100, a ledger and 20000 rows beside."""
    from shared.config import get_settings

    monkeypatch.setenv("ENVCLONE_MARIADB_ONLINE_METHOD", "auto")
    get_settings.cache_clear()
    root = xfs_root / "var"
    root.mkdir(mode=0o755)
    driver = LocalDriver(root)
    driver.create_node(NodeSpec("src", "mariadb", SRC, 3306))
    url = driver.url("src")
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE acct (id INT PRIMARY KEY, balance INT NOT NULL)")
        cur.execute("INSERT INTO acct SELECT seq, 100 FROM seq_1_to_100")
        cur.execute("CREATE TABLE ledger (n INT PRIMARY KEY)")
        cur.execute("CREATE TABLE aria_ledger (n INT PRIMARY KEY) ENGINE=Aria TRANSACTIONAL=1")  # crash-safe Aria
    fill(url, 20000)
    yield driver, url
    get_settings.cache_clear()


def root_connect(driver: LocalDriver, node: str = "src") -> pymysql.Connection:
    _, ctx = driver._node(node)
    creds = ctx.secrets()
    return pymysql.connect(host=ctx.address, port=ctx.port, user=creds.get("superuser", "root"),
                           password=creds["superuser_password"], database="app", autocommit=True, connect_timeout=5)


def ddl_waits(driver: LocalDriver) -> bool:
    """Whether DDL on the source waits (for a backup stage): a CREATE that times out in 1 s."""
    with root_connect(driver) as conn, conn.cursor() as cur:
        cur.execute("SET SESSION lock_wait_timeout = 1")
        try:
            cur.execute("CREATE TABLE IF NOT EXISTS ddl_probe (x INT)")
        except pymysql.err.OperationalError as exc:
            if exc.args[0] == 1205:  # lock wait timeout
                return True
            raise
        cur.execute("DROP TABLE ddl_probe")
        return False


class AriaWriter(threading.Thread):
    """Inserts 1, 2, 3... into a crash-safe Aria table, one statement each; records the acknowledged."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.acked, self.stopped = url, [], threading.Event()

    def run(self) -> None:
        with connect(self.url) as conn, conn.cursor() as cur:
            n = 0
            while not self.stopped.is_set():
                n += 1
                cur.execute("INSERT INTO aria_ledger VALUES (%s)", (n,))
                self.acked.append(n)


def copy_under_load(driver: LocalDriver, url: str) -> tuple[str, str, Writer, set[int]]:
    """The online snapshot taken while transfers run; the copy served. (method, copy url, writer,
    transfers acknowledged before the copy began)."""
    writer, aria = Writer(url), AriaWriter(url)
    writer.start()
    aria.start()
    try:
        wait_for(lambda: len(writer.acks) > 20 and len(aria.acked) > 20, timeout=30, what="writes to flow")
        started = writer.acks[-1][0]
        acked_before = {n for t, n in writer.acks if t <= started}
        aria_before = len(aria.acked)
        info = driver.snapshot_online("src", "snap")
        ended = writer.acks[-1][0]
        wait_for(lambda: writer.acks[-1][0] > ended, timeout=30, what="transfers after the copy")
    finally:
        writer.stopped.set()
        aria.stopped.set()
        writer.join(30)
        aria.join(30)
    assert not writer.errors
    # The reflink copy holds no commit; mariadb-backup, where it took over, holds them for its last step.
    assert info.window_ms == 0 if info.method == "online-reflink" else info.window_ms > 0
    driver.provision("snap", "copy")
    driver.assign_address("copy", COPY, 3306)
    driver.set_credentials("copy", get_stack("mariadb").new_credentials(driver._node("src")[1].secrets()))
    driver.restart("copy", 60)  # InnoDB and Aria recover from the copied logs here
    # The Aria table too: a prefix of the inserts, every one acknowledged before the copy in it.
    copy_url = driver.url("copy")
    in_copy = [n for (n,) in query(copy_url, "SELECT n FROM aria_ledger ORDER BY n")]
    assert in_copy == list(range(1, len(in_copy) + 1)) and aria_before <= len(in_copy) <= len(aria.acked)
    assert query(copy_url, "CHECK TABLE aria_ledger")[-1][-1] == "OK"
    return info.method, copy_url, writer, acked_before


def assert_one_moment(copy_url: str, writer: Writer, acked_before: set[int]) -> None:
    assert query(copy_url, "SELECT SUM(balance), COUNT(*) FROM acct") == ((10000, 100),)
    in_copy = {n for (n,) in query(copy_url, "SELECT n FROM ledger")}
    # One connection commits them in order: the copy holds a prefix, at least all acknowledged before.
    assert in_copy == set(range(1, max(in_copy) + 1)) and acked_before <= in_copy
    assert in_copy <= {n for _, n in writer.acks}
    assert query(copy_url, "SELECT COUNT(*) FROM t") == ((20000,),)
    assert query(copy_url, "CHECK TABLE acct, ledger, t")[-1][-1] == "OK"


def test_reflink_copy_under_transfers_is_one_moment(source) -> None:  # noqa: ANN001
    driver, url = source
    method, copy_url, writer, acked_before = copy_under_load(driver, url)
    assert method == "online-reflink"
    assert_one_moment(copy_url, writer, acked_before)
    assert not ddl_waits(driver)  # the backup stage ended with the copy


@pytest.mark.skipif(mariadb_backup() is None, reason="mariadb-backup is not installed")
def test_a_checkpoint_during_the_copy_discards_the_attempt(source, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Each attempt waits, before its redo log is reflinked, for InnoDB to write a real checkpoint
    (its page cleaner told to flush everything): every attempt is discarded, and mariadb-backup
    takes the copy, one moment all the same."""
    driver, url = source
    with root_connect(driver) as conn, conn.cursor() as cur:
        cur.execute("SET GLOBAL innodb_max_dirty_pages_pct_lwm = 0.001")
        cur.execute("SET GLOBAL innodb_max_dirty_pages_pct = 0")
    real, checkpoints = mariadb_reflink._reflink, []

    def after_a_checkpoint(src: Path, dst: Path, rel: str) -> None:
        if rel == mariadb_reflink.INNODB_LOG:
            now = mariadb_reflink._head(src / rel, mariadb_reflink.LOG_HEADER_BYTES)
            wait_for(lambda: mariadb_reflink._head(src / rel, mariadb_reflink.LOG_HEADER_BYTES) != now,
                     timeout=30, what="InnoDB to write a checkpoint")
            checkpoints.append(rel)
        real(src, dst, rel)

    monkeypatch.setattr(mariadb_reflink, "_reflink", after_a_checkpoint)
    method, copy_url, writer, acked_before = copy_under_load(driver, url)
    # Every attempt discarded; each by the checkpoint waited for here (or, rarely, one of Aria's first).
    assert 1 <= len(checkpoints) <= mariadb_reflink.ATTEMPTS
    assert method == "online-backup"
    assert_one_moment(copy_url, writer, acked_before)
    assert not ddl_waits(driver)


_HANG_IN_COPY = """
import sys, threading
from shared.drivers.local import LocalDriver
from shared.stacks import mariadb_reflink

def hang(src, dst, rel):
    print("in the copy", flush=True)
    threading.Event().wait()

mariadb_reflink._reflink = hang
LocalDriver(sys.argv[1]).snapshot_online("src", "snap")
"""


def test_a_worker_killed_inside_the_copy_leaves_no_backup_stage(source) -> None:  # noqa: ANN001
    """While the copy holds BLOCK_DDL, transfers still commit (no commit ever waits for it) and
    DDL waits; kill -9 of the worker ends the stage with its connection."""
    driver, url = source
    with worker_stopped_at(_HANG_IN_COPY, driver.root, {"ENVCLONE_MARIADB_ONLINE_METHOD": "reflink"},
                           "in the copy") as worker:
        with connect(url) as conn, conn.cursor() as cur:
            cur.execute("SET SESSION innodb_lock_wait_timeout = 1, lock_wait_timeout = 1")
            conn.begin()
            cur.execute("UPDATE acct SET balance = balance - 5 WHERE id = 1")
            cur.execute("UPDATE acct SET balance = balance + 5 WHERE id = 2")
            conn.commit()  # under the copy's stage: commits go on
        assert ddl_waits(driver)
        worker.kill()
        worker.wait(timeout=10)
        wait_for(lambda: not ddl_waits(driver), timeout=30, what="the stage to end with the worker's connection")
    assert query(url, "SELECT balance FROM acct WHERE id IN (1, 2) ORDER BY id") == ((95,), (105,))
