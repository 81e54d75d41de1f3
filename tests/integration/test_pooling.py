"""The API's cheap paths, against the real services: a pooled PostgreSQL connection pinged only
after it sat idle (shared.db), and one Redis client per publishing channel
(workers.publish_transport)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import redis
from kombu import Connection
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from shared import db
from tests.conftest import PG_ADMIN_URL, create_database, drop_database
from tests.helpers import wait_for
from tests.stack import claim_redis_db, release_redis_db, reset_caches
from workers import publish_transport

pytestmark = pytest.mark.integration


@pytest.fixture
def engine() -> Iterator[Engine]:
    name, url = create_database()
    engine = db.make_engine(url, pool_size=1, max_overflow=0)
    try:
        yield engine
    finally:
        engine.dispose()
        drop_database(name)


@pytest.mark.parametrize(("theirs", "idle", "statement"), [
    ("", "5min", "0"),
    ("?options=-c%20statement_timeout%3D7000%20-c%20idle_in_transaction_session_timeout%3D60000", "5min", "7s"),
])
def test_our_sessions_end_a_hung_transaction_and_drop_a_vanished_client(
        monkeypatch: pytest.MonkeyPatch, theirs: str, idle: str, statement: str) -> None:
    """The engine envclone's processes use (``get_engine``) gives every session the server-side
    limits of ENVCLONE_DB_IDLE_TX_TIMEOUT_S and the TCP keepalives; options the deployment put in
    its DATABASE_URL are kept, but not in place of ours (a 1 min idle limit would end our restarts'
    records: ENVCLONE_DB_IDLE_TX_TIMEOUT_S is the setting, checked)."""
    name, url = create_database()
    monkeypatch.setenv("ENVCLONE_DATABASE_URL", url + theirs)
    monkeypatch.delenv("PGOPTIONS", raising=False)
    reset_caches()
    try:
        with db.get_engine().connect() as conn:
            got = {k: conn.execute(text(f"SHOW {k}")).scalar_one()
                   for k in ("idle_in_transaction_session_timeout", "tcp_keepalives_idle", "statement_timeout")}
        assert got == {"idle_in_transaction_session_timeout": idle, "tcp_keepalives_idle": "60",
                       "statement_timeout": statement}
    finally:
        monkeypatch.undo()
        reset_caches()
        drop_database(name)


def test_a_session_hung_inside_a_transaction_is_ended_and_its_row_locks_freed(engine: Engine) -> None:
    """A process hung mid-transaction (or a host gone without a reset) holds its rows only for
    ENVCLONE_DB_IDLE_TX_TIMEOUT_S (2 s here, on an engine with our sessions' limits): the server
    ends its session, not TCP hours later."""
    url = engine.url.render_as_string(hide_password=False)
    limited = db.make_engine(url, connect_args={"options": db._server_side_limits(2)})
    with limited.begin() as conn:
        conn.execute(text("CREATE TABLE probe (id int PRIMARY KEY)"))
        conn.execute(text("INSERT INTO probe VALUES (1)"))
    hung = limited.connect()
    hung.begin()
    hung.execute(text("SELECT id FROM probe WHERE id = 1 FOR UPDATE"))

    def free() -> bool:
        with psycopg.connect(url.replace("+psycopg", "")) as other:
            try:
                other.execute("SELECT id FROM probe WHERE id = 1 FOR UPDATE NOWAIT")
            except psycopg.errors.LockNotAvailable:
                return False
            return True

    wait_for(free, timeout=30, what="the hung transaction's row lock to go")
    with pytest.raises(DBAPIError) as ended:  # the hung process learns it on its next statement
        hung.execute(text("SELECT 1"))
    assert ended.value.connection_invalidated  # and the pool drops that connection
    hung.close()
    limited.dispose()


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(pid: int) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))


def test_an_idle_connection_the_server_dropped_is_replaced_unseen(engine: Engine,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pid = _backend_pid(engine)
    _terminate(pid)
    monkeypatch.setattr(db, "PING_IDLE_S", 0.0)  # every checkout counts as idle: it is pinged
    assert _backend_pid(engine) != pid  # the ping found it dead; the pool made a new one


def test_a_connection_used_a_moment_ago_is_not_pinged(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trade made for speed, shown: within PING_IDLE_S a dead connection fails its one statement
    (as any statement would had the server gone mid-request), and the next checkout is fresh."""
    monkeypatch.setattr(db, "PING_IDLE_S", 3600.0)
    pid = _backend_pid(engine)
    _terminate(pid)
    with pytest.raises(OperationalError), engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert _backend_pid(engine) != pid


@pytest.fixture
def redis_url() -> Iterator[str]:
    n = claim_redis_db()
    try:
        yield f"redis://127.0.0.1:6379/{n}"
    finally:
        redis.Redis(db=n).flushdb()
        release_redis_db(n)


def test_a_publishing_channel_keeps_one_redis_client(redis_url: str) -> None:
    with Connection(redis_url, transport=publish_transport.NAME) as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second and isinstance(first, redis.Redis)
        given = redis.Redis.from_url(redis_url)
        with channel.conn_or_acquire(given) as passed:
            assert passed is given  # a client the caller holds is used as before
        producer = conn.Producer()
        for i in range(3):
            producer.publish({"n": i}, routing_key="envclone-test-publish")
        assert given.llen("envclone-test-publish") == 3  # published through the one client
        channel.close()
        assert "_publish_client" not in channel.__dict__  # dropped with the channel's pool


def test_publishers_use_it_and_workers_do_not(redis_url: str) -> None:
    from shared.config import Settings
    from workers.celery_app import Role, make_celery

    settings = Settings(broker_url=redis_url)
    with make_celery(Role.PUBLISHER, settings).connection_for_write() as conn:
        assert isinstance(conn.default_channel, publish_transport.Channel)
    with make_celery(Role.WORKER, settings).connection_for_write() as conn:
        assert not isinstance(conn.default_channel, publish_transport.Channel)
