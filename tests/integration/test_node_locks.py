"""Taking and sharing a source node (shared.locks) against real PostgreSQL, with real concurrent
processes: a taken node is neither taken nor shared by another job, a shared node is not taken."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from shared import locks
from shared.db import make_engine
from shared.models import Environment, Node
from tests.helpers import race

pytestmark = pytest.mark.integration

TTL = 600.0


def _nodes(engine: Engine, count: int) -> list[str]:
    with Session(engine) as session, session.begin():
        env = Environment(tenant="t", name="src")
        nodes = [Node(environment=env, name=f"n{i}", stack="valkey", address="127.0.0.1", port=6379)
                 for i in range(count)]
        session.add_all(nodes)
        session.flush()
        return [n.id for n in nodes]


def _try(engine: Engine, how: str, node: str, job: str) -> str | None:
    """The holder that refused us, or None. A refused take's claim is committed, as the step does."""
    try:
        with Session(engine) as session, session.begin():
            if how == "take":
                busy = locks.take(session, node, job, TTL)
            else:
                busy, _token = None, locks.share(session, node, job, TTL)
    except locks.NodeBusy as refused:
        return refused.holder
    return None if busy is None else busy.holder


def _do(engine: Engine, how: str, node: str, job: str) -> None:
    with Session(engine) as session, session.begin():
        getattr(locks, how)(session, node, job)


def test_take_and_share_exclude_each_other(pg_database: str) -> None:
    engine = make_engine(pg_database)
    node, = _nodes(engine, 1)
    assert _try(engine, "share", node, "a") is None
    assert _try(engine, "share", node, "b") is None  # sharers run side by side
    assert _try(engine, "take", node, "c") in {"a", "b"}  # c now claims the node, waiting for a and b
    assert _try(engine, "share", node, "a") is None  # renewing one's own share
    _do(engine, "unshare", node, "a")
    assert _try(engine, "take", node, "c") == "b"
    _do(engine, "unshare", node, "b")
    assert _try(engine, "take", node, "c") is None
    assert _try(engine, "take", node, "c") is None  # its own lock, taken again
    assert _try(engine, "share", node, "d") == "c"
    assert _try(engine, "take", node, "e") == "c"
    _do(engine, "release", node, "c")
    assert _try(engine, "share", node, "d") is None
    _do(engine, "release", node, "d")  # a release drops the job's share too
    assert _try(engine, "take", node, "e") is None
    engine.dispose()


def test_a_taker_waiting_for_sharers_keeps_its_place(pg_database: str) -> None:
    """A window waiting for the copies under way claims the node: a copy or a window that comes
    later waits behind it (else a stream of online copies starves the window)."""
    engine = make_engine(pg_database)
    node, = _nodes(engine, 1)
    assert _try(engine, "share", node, "a") is None
    assert _try(engine, "take", node, "w") == "a"  # waits for a's copy, and claims the node
    assert _try(engine, "share", node, "b") == "w"  # b came later: behind w
    assert _try(engine, "take", node, "x") == "w"
    assert _try(engine, "share", node, "a") is None  # a's copy run again keeps its share
    _do(engine, "unshare", node, "a")
    assert _try(engine, "take", node, "w") is None  # w's turn, with no copy under way
    assert _try(engine, "share", node, "b") == "w"
    _do(engine, "release", node, "w")
    assert _try(engine, "share", node, "b") is None
    engine.dispose()


def test_an_older_share_of_a_job_does_not_end_a_newer_one(pg_database: str) -> None:
    """A resumed run (or a second delivery of the step) shares the node again; the older copy that
    ends after it must not end the newer copy's share."""
    engine = make_engine(pg_database)
    node, = _nodes(engine, 1)
    with Session(engine) as session, session.begin():
        older = locks.share(session, node, "a", TTL)
    with Session(engine) as session, session.begin():
        newer = locks.share(session, node, "a", TTL)
    with Session(engine) as session, session.begin():
        locks.unshare(session, node, "a", older)
    assert _try(engine, "take", node, "c") == "a"
    with Session(engine) as session, session.begin():
        locks.unshare(session, node, "a", newer)
    assert _try(engine, "take", node, "c") is None
    engine.dispose()


def test_an_expired_share_or_lock_holds_nothing(pg_database: str) -> None:
    engine = make_engine(pg_database)
    node, = _nodes(engine, 1)
    with Session(engine) as session, session.begin():
        locks.share(session, node, "lost", ttl_s=-1)  # its holder died long ago
    assert _try(engine, "take", node, "c") is None
    assert _try(engine, "share", node, "lost") == "c"  # nor is it renewed beside a taken node
    with Session(engine) as session, session.begin():
        assert locks.take(session, node, "c", ttl_s=-1) is None
    assert _try(engine, "share", node, "d") is None
    engine.dispose()


def _racer(url: str, how: str, job: str, nodes: list[str], barrier, out) -> None:
    engine = make_engine(url)
    won = []
    for node in nodes:
        barrier.wait()  # every process at the same node at the same moment
        if _try(engine, how, node, job) is None:
            won.append(node)
    out.put((how, job, won))
    engine.dispose()


def test_concurrent_takes_and_shares_never_overlap(pg_database: str) -> None:
    engine = make_engine(pg_database)
    nodes = _nodes(engine, 25)
    racers = [("take", "t1"), ("take", "t2"), ("share", "s1"), ("share", "s2")]
    results = race(_racer, [(pg_database, how, job, nodes) for how, job in racers])
    for node in nodes:
        takers = [job for how, job, won in results if how == "take" and node in won]
        sharers = [job for how, job, won in results if how == "share" and node in won]
        assert (len(takers), len(sharers)) in {(1, 0), (0, 1), (0, 2)}, (node, takers, sharers)
    engine.dispose()


def test_a_claim_its_taker_stopped_renewing_lapses_before_a_window_would(
        pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A taker asks again every few seconds while it waits; a claim it stopped renewing lapses
    after CLAIM_TTL_S, not after a held window's TTL."""
    engine = make_engine(pg_database)
    node, = _nodes(engine, 1)
    monkeypatch.setattr(locks, "CLAIM_TTL_S", -1.0)  # as if the taker last asked long ago
    assert _try(engine, "share", node, "a") is None
    assert _try(engine, "take", node, "w") == "a"
    assert _try(engine, "share", node, "b") is None  # the lapsed claim holds nothing
    for job in ("a", "b"):
        _do(engine, "unshare", node, job)
    assert _try(engine, "take", node, "w") is None  # taken: the window's own TTL, not a claim's
    assert _try(engine, "share", node, "b") == "w"
    engine.dispose()
