"""Engine and sessions. One engine per process; workers dispose it after fork (see workers.celery_app)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import before_sleep_log, retry, retry_if_exception_type, stop_after_delay, wait_exponential

from shared.config import get_settings

# A pooled connection is pinged before use only when it sat idle this long: one used a moment ago
# is as alive as a ping would show, and a ping on every checkout was a round trip per transaction
# (two per API request). A server that went away meanwhile fails that one statement, and the pool
# is invalidated as on any disconnect.
PING_IDLE_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is not None and time.monotonic() - since < PING_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool drops this connection and checks out a fresh one
            raise DisconnectionError(f"stale pooled connection: {exc}") from exc


def make_engine(url: str, *, foreign_keys: bool = True, **extra: Any) -> Engine:
    """``foreign_keys=False`` is for migrations: SQLite rebuilds a table to alter it, and dropping
    the old one with foreign keys on would cascade-delete every row that references it."""
    kwargs: dict[str, Any] = dict(extra)
    if url.startswith("sqlite"):
        # Several worker processes write at once: WAL plus a generous busy timeout.
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    engine = create_engine(url, **kwargs)
    _ping_when_idle(engine)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Take the write lock up front: a deferred transaction that later writes fails at once
            # with SQLITE_BUSY when another process wrote meanwhile, instead of waiting its turn.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


# Within ``bounded_lock_waits``: how long a PostgreSQL transaction waits for a lock, in ms.
_LOCK_WAIT_MS: ContextVar[int | None] = ContextVar("envclone_lock_wait_ms", default=None)


def _bound_lock_waits(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        ms = _LOCK_WAIT_MS.get()
        if ms is not None:
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(ms)}")


def _server_side_limits(idle_tx_timeout_s: float) -> str:
    """libpq ``options``: settings of every session we open (see ``Settings.db_idle_tx_timeout_s``)."""
    limits = {"tcp_keepalives_idle": 60, "tcp_keepalives_interval": 10, "tcp_keepalives_count": 6}
    if idle_tx_timeout_s:
        limits["idle_in_transaction_session_timeout"] = int(idle_tx_timeout_s * 1000)
    return " ".join(f"-c {k}={v}" for k, v in limits.items())


def session_options(url: str, idle_tx_timeout_s: float) -> str:
    """libpq ``options`` of our sessions: what the deployment set (DATABASE_URL's ``options``, else
    PGOPTIONS, as libpq chooses), which our connect argument would otherwise replace, then our
    limits. The server applies them in order, so for the settings we set ours win: our restarts'
    records rely on them (Settings checks db_idle_tx_timeout_s); change them through ENVCLONE_."""
    theirs = make_url(url).query.get("options") or os.environ.get("PGOPTIONS", "")
    if isinstance(theirs, tuple):  # ``options`` given twice in the URL: libpq keeps the last
        theirs = theirs[-1]
    return " ".join(part for part in (theirs.strip(), _server_side_limits(idle_tx_timeout_s)) if part)


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    settings = get_settings()
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        extra: dict[str, Any] = {}
    else:
        extra = {"connect_args": {"options": session_options(url, settings.db_idle_tx_timeout_s)}}
    # LIFO: the connection used last is used next, so the ones a burst opened sit idle (and are
    # pinged before use), while the busy few never need a ping.
    engine = make_engine(url, pool_size=settings.db_pool_size, max_overflow=settings.db_pool_overflow,
                         pool_use_lifo=True, **extra)
    if engine.dialect.name == "postgresql":
        _bound_lock_waits(engine)
    return engine


@contextmanager
def bounded_lock_waits(seconds: float) -> Iterator[None]:
    """Every transaction begun within waits at most ``seconds`` for a lock another holds, then
    fails with a lock timeout (``is_lock_conflict``). PostgreSQL only: SQLite waits its busy timeout."""
    token = _LOCK_WAIT_MS.set(max(1, round(seconds * 1000)))
    try:
        yield
    finally:
        _LOCK_WAIT_MS.reset(token)


def wait_for_locks_from_here(session: Session) -> None:
    """The transaction is about to record what it did outside the database (a server restarted):
    from here it waits for locks as long as it takes. A lock timeout now would roll back the record
    of an act that stays done."""
    if _LOCK_WAIT_MS.get() is not None and session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL lock_timeout = 0"))


def is_lock_conflict(exc: BaseException) -> bool:
    """A lock timeout (bounded_lock_waits) or a deadlock PostgreSQL broke by failing this side."""
    return isinstance(exc, OperationalError) and getattr(exc.orig, "sqlstate", None) in ("55P03", "40P01")


@lru_cache(maxsize=1)
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A unit of work: commit on success, roll back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def autocommit() -> Iterator[Connection]:
    """A connection on which each statement commits by itself, for a lone read or a lone write: on
    PostgreSQL one round trip instead of three (BEGIN, the statement, COMMIT). SQLite, in process,
    keeps its transaction (its BEGIN costs no round trip and takes the write lock, as everywhere)."""
    engine = get_engine()
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            with conn.begin():
                yield conn
        else:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")


def dispose_engine() -> None:
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)


F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("envclone.db")


def retry_db(fn: F) -> F:
    """Run a whole transaction function again while the state database is unreachable, for up to
    ENVCLONE_DB_WAIT_S: a worker waits out an outage where it stands rather than fail a step that
    did its work. Only for functions whose every effect is in that database."""

    def stop(state: Any) -> bool:
        return stop_after_delay(get_settings().db_wait_s)(state)

    return retry(retry=retry_if_exception_type(OperationalError), stop=stop, reraise=True,
                 wait=wait_exponential(multiplier=0.2, max=5), before_sleep=before_sleep_log(log, logging.WARNING),
                 )(fn)  # type: ignore[return-value]
