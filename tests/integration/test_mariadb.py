"""The mariadb stack against real mariadbd processes: through the local driver, then a whole
environment cloned by a real worker."""

from __future__ import annotations

import os
import pwd
import threading
import time
from itertools import pairwise
from pathlib import Path

import pymysql
import pytest

from shared.config import get_settings
from shared.drivers import NodeSpec, get_driver
from shared.drivers.local import LocalDriver
from shared.identity import account_name
from shared.stacks import get_stack, mariadb
from shared.stacks.mariadb import mariadb_backup, mariadb_binaries
from tests.helpers import wait_for
from tests.loads import mysql_connect as connect
from tests.workflow_client import clone, create_environment, delete_environment, environment

try:
    mariadb_binaries()
    MISSING = None
except FileNotFoundError as exc:
    MISSING = str(exc)

pytestmark = [pytest.mark.integration, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

BACKEND = {"pool": "127.111.0.0/16"}
SRC, COPY = "127.111.250.1", "127.111.250.2"  # driver tests: far above what the pool hands out first


def login(address: str, user: str, password: str, port: int = 3306) -> str:
    """CURRENT_USER() of a login, which raises OperationalError (1045) when refused."""
    with pymysql.connect(host=address, port=port, user=user, password=password, connect_timeout=5) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER()")
            return cur.fetchone()[0]


def refused(address: str, user: str, password: str) -> bool:
    try:
        login(address, user, password)
    except pymysql.err.OperationalError as exc:
        return exc.args[0] == 1045  # access denied
    return False


def query(url: str, sql: str) -> tuple:
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def fill(url: str, rows: int) -> None:
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(64)) ENGINE=InnoDB")
        cur.execute(f"INSERT INTO t SELECT seq, MD5(seq) FROM seq_1_to_{rows}")  # the sequence engine


def process_uid(driver: LocalDriver, node_id: str) -> int:
    pid = int(driver.pid_path(node_id).read_text().split()[0])
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def test_mariadb_node_has_password_only_accounts(driver: LocalDriver) -> None:
    driver.create_node(NodeSpec("db", "mariadb", SRC, 3306))
    creds = driver._node("db")[1].secrets()
    assert creds["username"] == "app" and creds["superuser"] == "root"
    assert driver.url("db") == f"mysql://app:{creds['password']}@{SRC}:3306/app"
    assert get_stack("mariadb").url(SRC, 3306, creds, secret=False) == f"mysql://app@{SRC}:3306/app"
    assert login(SRC, "app", creds["password"]) == "app@%"
    assert login(SRC, "root", creds["superuser_password"]) == "root@%"
    root_url = driver.url("db").replace(f"app:{creds['password']}", f"root:{creds['superuser_password']}")
    accounts = query(root_url, "SELECT User, Host, JSON_VALUE(priv, '$.authentication_string') <> '', "
                               "IFNULL(JSON_VALUE(priv, '$.account_locked'), 'false') IN ('true', '1') "
                               "FROM mysql.global_priv ORDER BY User")
    # Every account that can log in has a password; mariadb.sys (owner of the system views) is locked.
    assert accounts == (("app", "%", 1, 0), ("mariadb.sys", "localhost", 0, 1), ("root", "%", 1, 0))
    for user, password in (("root", ""), ("", ""), ("app", ""), ("root", creds["password"])):
        assert refused(SRC, user, password), (user, password)
    # The app user owns the app database and nothing else.
    with connect(driver.url("db")) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE x (a INT)")
        with pytest.raises(pymysql.err.OperationalError, match="denied"):
            cur.execute("CREATE DATABASE other")
    # TCP on the node's address only: no Unix socket, the server's files inside the volume.
    assert query(driver.url("db"), "SELECT @@socket, @@bind_address, @@port") == (("", SRC, 3306),)
    assert (driver.volume("db") / "run/mariadbd.pid").exists()
    if os.geteuid() == 0:
        assert process_uid(driver, "db") == pwd.getpwnam("nobody").pw_uid
    # Health and restart through the driver.
    assert driver.health("db").healthy
    driver.stop("db")
    assert not driver.health("db").running
    driver.restart("db", 30)
    assert driver.health("db").detail == "accepting connections"


def test_mariadb_snapshot_and_clone_with_new_credentials(driver: LocalDriver) -> None:
    driver.create_node(NodeSpec("src", "mariadb", SRC, 3306))
    src_url = driver.url("src")
    src_creds = driver._node("src")[1].secrets()
    fill(src_url, 5000)
    driver.prepare_snapshot("src", "snap")
    driver.quiesce("src")
    assert driver.quiesced("src") and not driver.health("src").running
    info = driver.snapshot("src", "snap")
    assert info.size_bytes > 0 and not any(p.name == "ibtmp1" for p in (driver.snaps_dir / "snap").rglob("*"))
    driver.restart("src", 30)
    query(src_url, "INSERT INTO t VALUES (999999, 'after')")

    driver.provision("snap", "copy")
    driver.assign_address("copy", COPY, 3306)
    new = get_stack("mariadb").new_credentials(src_creds, rename_users=True)
    driver.set_credentials("copy", new)
    driver.set_credentials("copy", new)  # a redelivered step
    driver.restart("copy", 30)
    copy_url = driver.url("copy")
    assert copy_url == f"mysql://{new['username']}:{new['password']}@{COPY}:3306/app"
    assert query(copy_url, "SELECT COUNT(*), MAX(id) FROM t") == ((5000, 5000),)
    assert query(copy_url, "SELECT @@bind_address, CURRENT_USER()") == ((COPY, f"{new['username']}@%"),)
    assert query(src_url, "SELECT COUNT(*) FROM t") == ((5001,),)
    # The source's credentials do not open the clone, nor the clone's the source.
    for address, creds in ((COPY, src_creds), (SRC, new)):
        assert refused(address, creds["username"], creds["password"])
        assert refused(address, "root", creds["superuser_password"])
    assert login(COPY, "root", new["superuser_password"]) == "root@%"


def test_mariadb_new_credentials_are_idempotent_and_finish_a_half_done_run(
        driver: LocalDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = get_stack("mariadb")
    driver.create_node(NodeSpec("db", "mariadb", SRC, 3306))
    _, ctx = driver._node("db")
    old = ctx.secrets()
    old_file = ctx.secrets_path.read_text()
    driver.stop("db")
    new = stack.new_credentials(old, rename_users=True)
    stack.apply_credentials(ctx, new)
    # A run that died after the server took the credentials but before they were recorded.
    ctx.secrets_path.write_text(old_file)
    stack.apply_credentials(ctx, new)
    assert ctx.secrets() == new
    with monkeypatch.context() as patched:
        patched.setattr(mariadb, "_run_as_node", lambda *a, **kw: pytest.fail("ran the server again"))
        stack.apply_credentials(ctx, new)  # the same again: nothing runs
    driver.restart("db", 30)
    assert login(SRC, new["username"], new["password"]) == f"{new['username']}@%"
    assert refused(SRC, old["username"], old["password"]) and refused(SRC, "root", old["superuser_password"])


class Writer(threading.Thread):
    """Transfers between accounts, one transaction each, as fast as the server takes them; records
    when each was acknowledged. The sum of all balances never changes in any consistent copy."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.acks, self.stopped, self.errors = url, [], threading.Event(), []

    def run(self) -> None:
        n = 0
        with connect(self.url) as conn, conn.cursor() as cur:
            conn.autocommit(False)
            while not self.stopped.is_set():
                n += 1
                a, b = n % 100 + 1, (n * 7) % 100 + 1
                try:
                    cur.execute("UPDATE acct SET balance = balance - 1 WHERE id = %s", (a,))
                    cur.execute("UPDATE acct SET balance = balance + 1 WHERE id = %s", (b,))
                    cur.execute("INSERT INTO ledger VALUES (%s)", (n,))
                    conn.commit()
                    self.acks.append((time.monotonic(), n))
                except pymysql.MySQLError as exc:
                    self.errors.append(exc)
                    conn.rollback()

    def longest_gap(self, start: float, end: float) -> float:
        times = [t for t, _ in self.acks if start - 1 <= t <= end + 1]
        return max(b - a for a, b in pairwise(times))


@pytest.mark.skipif(mariadb_backup() is None, reason="mariadb-backup is not installed")
def test_mariadb_online_copy_under_transfers_is_one_consistent_moment(
        driver: LocalDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    """mariadb-backup copies the node while it serves: transfers go on during the copy, the copy
    holds every transfer acknowledged before it began and a balanced ledger."""
    monkeypatch.setenv("ENVCLONE_MARIADB_ONLINE_METHOD", "backup")  # not reflink, where /tmp can
    get_settings.cache_clear()
    try:
        _online_copy_under_transfers(driver)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def _online_copy_under_transfers(driver: LocalDriver) -> None:
    driver.create_node(NodeSpec("src", "mariadb", SRC, 3306))
    stack = get_stack("mariadb")
    assert stack.online_copy_supported
    url = driver.url("src")
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE acct (id INT PRIMARY KEY, balance INT NOT NULL)")
        cur.execute("INSERT INTO acct SELECT seq, 100 FROM seq_1_to_100")
        cur.execute("CREATE TABLE ledger (n INT PRIMARY KEY)")
    fill(url, 20000)
    writer = Writer(url)
    writer.start()
    try:
        wait_for(lambda: len(writer.acks) > 20, timeout=30, what="transfers to flow")
        started = time.monotonic()
        acked_before = {n for t, n in writer.acks if t < started}
        info = driver.snapshot_online("src", "snap")
        ended = time.monotonic()
        wait_for(lambda: writer.acks[-1][0] > ended, timeout=30, what="transfers after the copy")
    finally:
        writer.stopped.set()
        writer.join(30)
    during = [n for t, n in writer.acks if started < t < ended]
    assert during, "no transfer was acknowledged while the copy was taken"
    assert not writer.errors and driver.health("src").running
    gap = writer.longest_gap(started, ended)
    print(f"online copy {ended - started:.2f}s, longest gap between acknowledged transfers {gap:.3f}s, "
          f"commits held {info.window_ms} ms")
    # mariadb-backup holds commits under BLOCK_COMMIT for its last step: the job reports that hold.
    assert info.method == "online-backup" and 0 < info.window_ms < (ended - started) * 1000
    assert not (driver.snaps_dir / "snap/volume/run").exists()
    driver.provision("snap", "copy")
    driver.assign_address("copy", COPY, 3306)
    driver.set_credentials("copy", stack.new_credentials(driver._node("src")[1].secrets()))
    driver.restart("copy", 30)
    copy_url = driver.url("copy")
    assert query(copy_url, "SELECT SUM(balance), COUNT(*) FROM acct") == ((10000, 100),)
    in_copy = {n for (n,) in query(copy_url, "SELECT n FROM ledger")}
    # One connection commits them in order: the copy holds a prefix, at least all acknowledged before.
    assert in_copy == set(range(1, max(in_copy) + 1)) and acked_before <= in_copy
    assert in_copy <= {n for _, n in writer.acks}
    assert query(copy_url, "SELECT COUNT(*) FROM t") == ((20000,),)


# ---- environments, through a real worker -------------------------------------------------------------

SHOP = [{"name": "db", "stack": "mariadb"},
        {"name": "web", "stack": "webapp", "config": {"MYSQL_URL": "{{db.url}}"}}]


def node_of(env, name: str):  # noqa: ANN001, ANN201
    return next(n for n in env.nodes if n.name == name)


def test_an_environment_with_mariadb_is_cloned_with_its_data_and_new_credentials(backend) -> None:  # noqa: ANN001
    src = create_environment("mshop", SHOP)
    driver = get_driver()
    db = node_of(src, "db")
    src_url = driver.url(db.id)
    fill(src_url, 2000)
    job = clone("mshop", "mstage", rename_db_users=True)
    assert job.state == "succeeded", job.error
    dst = environment("mstage")
    copy = node_of(dst, "db")
    copy_url = driver.url(copy.id)
    assert copy.address != db.address and copy.address in copy_url
    assert query(copy_url, "SELECT COUNT(*), SUM(id), MAX(v) FROM t") == query(src_url, "SELECT COUNT(*), SUM(id), "
                                                                                      "MAX(v) FROM t")
    s, d = dict(db.credentials), dict(copy.credentials)
    assert d["username"] != s["username"] and d["password"] != s["password"]
    assert d["superuser_password"] != s["superuser_password"]
    for address, creds in ((copy.address, s), (db.address, d)):
        assert refused(address, creds["username"], creds["password"])
        assert refused(address, "root", creds["superuser_password"])
    assert login(copy.address, d["username"], d["password"]) == f"{d['username']}@%"
    # The clone's webapp was rewired to the clone's database, with the clone's credentials.
    env_file = (driver.volume(node_of(dst, "web").id) / "config/.env").read_text()
    assert f"MYSQL_URL={copy_url}\n" in env_file and s["password"] not in env_file
    assert {(r["node"], r["kind"]) for r in job.rewrites} == {("web", "address"), ("web", "credential")}
    assert s["password"] not in repr(job.rewrites) and d["password"] not in repr(job.rewrites)
    # Every node of the clone runs as the clone's own account, never root.
    if os.geteuid() == 0:
        uid = pwd.getpwnam(account_name(dst.id)).pw_uid
        assert uid != 0 and uid != pwd.getpwnam(account_name(src.id)).pw_uid
        for node in dst.nodes:
            assert process_uid(driver, node.id) == uid
    else:
        assert all(process_uid(driver, n.id) == os.geteuid() for n in dst.nodes)
    delete_environment("mstage")
    delete_environment("mshop")
    assert backend.processes() == []
