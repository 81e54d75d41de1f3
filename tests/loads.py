"""Real clients that keep writing while a node is cloned, reconnecting whenever the server goes away
(a stop-mode clone stops it), and that record when each transaction was acknowledged. Each load
numbers its transactions and keeps an invariant, so a copy can be checked for one consistent moment
holding every transaction acknowledged before the source stopped."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
import pymysql
import redis


def mysql_connect(url: str, **kw: Any) -> pymysql.Connection:
    u = urlsplit(url)
    return pymysql.connect(host=u.hostname, port=u.port or 3306, user=unquote(u.username or ""),
                           password=unquote(u.password or ""), database=u.path.lstrip("/") or None,
                           autocommit=True, **{"connect_timeout": 5, **kw})


class Load(threading.Thread):
    """``clients`` connections, each looping one numbered transaction."""

    clients = 2

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()
        self.acks: list[tuple[float, int]] = []  # (wall-clock time acknowledged, transaction number)
        self.errors = 0
        self._numbers = itertools.count(1)

    def setup(self) -> None:
        """Create what the transactions need (before the load starts)."""

    def connect(self) -> Any:
        raise NotImplementedError

    def transaction(self, conn: Any, n: int) -> None:
        raise NotImplementedError

    @staticmethod
    def committed(url: str) -> set[int]:
        """The transactions in the copy at ``url``, after checking the load's invariant there."""
        raise NotImplementedError

    def run(self) -> None:
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _client(self) -> None:
        conn = None
        while not self.stop.is_set():
            n = next(self._numbers)
            try:
                conn = conn or self.connect()
                self.transaction(conn, n)
                self.acks.append((time.time(), n))
            except Exception:  # the server went away or refused: not acknowledged, try again
                self.errors += 1
                _close(conn)
                conn = None
                self.stop.wait(0.05)  # back off while the server is down
        _close(conn)

    def acked_before(self, wall: float) -> set[int]:
        return {n for t, n in list(self.acks) if t < wall}

    def acked_after(self, wall: float) -> bool:
        return any(t > wall for t, _ in list(self.acks))

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=30)
        assert not self.is_alive(), "the load did not stop"


def _close(conn: Any) -> None:
    if conn is not None:
        try:
            conn.close()
        except Exception:  # already broken: nothing to release
            pass


class Tpcb(Load):
    """pgbench's TPC-B transaction on its schema (``pgbench -i`` first): the sums of account, teller
    and branch balances each equal the sum of the history's deltas, and the history names every
    transaction committed (its number in ``filler``; the delta stays small, as the balances are
    32-bit)."""

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, connect_timeout=5)

    def transaction(self, conn: psycopg.Connection, n: int) -> None:
        aid, tid, bid, delta = n % 100000 + 1, n % 10 + 1, 1, n % 97 + 1
        with conn.transaction():
            conn.execute("UPDATE pgbench_accounts SET abalance = abalance + %s WHERE aid = %s", (delta, aid))
            conn.execute("UPDATE pgbench_tellers SET tbalance = tbalance + %s WHERE tid = %s", (delta, tid))
            conn.execute("UPDATE pgbench_branches SET bbalance = bbalance + %s WHERE bid = %s", (delta, bid))
            conn.execute("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime, filler)"
                         " VALUES (%s, %s, %s, %s, now(), %s)", (tid, bid, aid, delta, str(n)))

    @staticmethod
    def committed(url: str) -> set[int]:
        """The transactions in a copy, after checking its invariant (AssertionError if it breaks)."""
        with psycopg.connect(url) as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # both reads see one moment
            sums = conn.execute(
                "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers),"
                " (SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)"
            ).fetchone()
            assert sums[0] == sums[1] == sums[2] == sums[3], sums
            return {int(f) for (f,) in conn.execute("SELECT filler FROM pgbench_history")}


class Pairs(Load):
    """MULTI INCR a INCR b SADD seen n EXEC: a == b == the number of transactions in ``seen`` in
    every consistent moment, and ``seen`` names them."""

    def connect(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def transaction(self, conn: redis.Redis, n: int) -> None:
        pipe = conn.pipeline(transaction=True)
        pipe.incr("a")
        pipe.incr("b")
        pipe.sadd("seen", n)
        pipe.execute()

    @staticmethod
    def committed(url: str) -> set[int]:
        with redis.Redis.from_url(url) as client:
            pipe = client.pipeline(transaction=True)  # one moment
            pipe.mget("a", "b")
            pipe.smembers("seen")
            (a, b), seen = pipe.execute()
        numbers = {int(m) for m in seen}
        assert int(a or 0) == int(b or 0) == len(numbers), (a, b, len(numbers))
        return numbers


ACCOUNTS, OPENING = 100, 100


def _transfer(n: int) -> tuple[int, int]:
    return n % ACCOUNTS + 1, (n * 7) % ACCOUNTS + 1


class Transfers(Load):
    """A transfer of 1 between two accounts and a ledger row, one InnoDB transaction: in every
    consistent moment each balance is its opening less what the ledger's transfers took from it
    plus what they brought."""

    def setup(self) -> None:
        with mysql_connect(self.url) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE acct (id INT PRIMARY KEY, balance INT NOT NULL) ENGINE=InnoDB")
            cur.execute(f"INSERT INTO acct SELECT seq, {OPENING} FROM seq_1_to_{ACCOUNTS}")
            cur.execute("CREATE TABLE ledger (n INT PRIMARY KEY) ENGINE=InnoDB")

    def connect(self) -> pymysql.Connection:
        conn = mysql_connect(self.url)
        conn.autocommit(False)
        return conn

    def transaction(self, conn: pymysql.Connection, n: int) -> None:
        a, b = _transfer(n)
        try:
            with conn.cursor() as cur:
                # In id order, so two clients never wait for each other's rows in a cycle.
                for acct, delta in sorted(((a, -1), (b, 1))):
                    cur.execute("UPDATE acct SET balance = balance + %s WHERE id = %s", (delta, acct))
                cur.execute("INSERT INTO ledger VALUES (%s)", (n,))
            conn.commit()
        except pymysql.MySQLError:
            conn.rollback()
            raise

    @staticmethod
    def committed(url: str) -> set[int]:
        with mysql_connect(url) as conn, conn.cursor() as cur:
            cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")  # both reads see one moment
            cur.execute("SELECT n FROM ledger")
            ledger = {n for (n,) in cur.fetchall()}
            cur.execute("SELECT id, balance FROM acct")
            balances = dict(cur.fetchall())
        expected = dict.fromkeys(range(1, ACCOUNTS + 1), OPENING)
        for n in ledger:
            a, b = _transfer(n)
            expected[a] -= 1
            expected[b] += 1
        assert balances == expected
        return ledger
