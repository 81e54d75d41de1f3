"""The address pool against real PostgreSQL, with real concurrent processes."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import ipam
from shared.db import make_engine
from shared.models import AddressLease
from tests.helpers import race

pytestmark = pytest.mark.integration

POOL = "127.92.0.0/26"  # 62 usable addresses


def _lease_worker(url: str, count: int, barrier, out) -> None:
    engine = make_engine(url)
    barrier.wait()  # all processes hit the pool at the same moment
    got = []
    for _ in range(count):  # one transaction per lease: the worst case for collisions
        with Session(engine) as session, session.begin():
            got += ipam.lease(session, POOL, 1, job_id="j")
    out.put(got)
    engine.dispose()


def test_concurrent_leases_never_collide_and_exhaustion_is_clear(pg_database: str) -> None:
    procs, per = 4, 15
    results = race(_lease_worker, [(pg_database, per)] * procs, timeout=60)
    leased = [a for r in results for a in r]
    assert len(leased) == procs * per == len(set(leased))

    engine = make_engine(pg_database)
    with Session(engine) as session:
        assert set(session.scalars(select(AddressLease.address))) == set(leased)
        assert ipam.free_count(session, POOL) == 2
        with pytest.raises(ipam.PoolExhausted, match=r"127\.92\.0\.0/26 exhausted: 3 needed, 2 free"):
            ipam.lease(session, POOL, 3)
        session.rollback()
    engine.dispose()


def test_plan_matches_lease_and_release_frees(pg_database: str) -> None:
    engine = make_engine(pg_database)
    with Session(engine) as session:
        planned = ipam.plan(session, POOL, 3)
        assert planned == ["127.92.0.1", "127.92.0.2", "127.92.0.3"]
        assert ipam.lease(session, POOL, 3, job_id="j") == planned
        ipam.bind(session, planned[0], "node1")
        session.commit()
        ipam.release_node(session, "node1")
        ipam.release_addresses(session, planned[1:])
        session.commit()
        assert session.scalar(select(AddressLease.address)) is None
    engine.dispose()


def test_never_leases_an_address_a_live_process_listens_on(pg_database: str) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.92.0.1", 0))
    sock.listen()
    try:
        engine = make_engine(pg_database)
        with Session(engine) as session:
            assert ipam.plan(session, POOL, 1) == ["127.92.0.2"]
        engine.dispose()
    finally:
        sock.close()


def test_a_lease_in_flight_is_stepped_over_without_waiting(pg_database: str) -> None:
    """Two requests leasing at once: the second takes the next address at once instead of waiting
    for the first to commit (lock_timeout makes any wait an error), and a rollback frees it."""
    from sqlalchemy import text

    engine = make_engine(pg_database)
    with Session(engine) as first, Session(engine) as second:
        assert ipam.lease(first, POOL, 1, job_id="a") == ["127.92.0.1"]  # uncommitted
        second.execute(text("SET LOCAL lock_timeout = '200ms'"))
        assert ipam.lease(second, POOL, 1, job_id="b") == ["127.92.0.2"]
        second.commit()
        first.rollback()
        assert ipam.lease(first, POOL, 1, job_id="c") == ["127.92.0.1"]
        first.commit()
    with Session(engine) as session:
        assert set(session.scalars(select(AddressLease.address))) == {"127.92.0.1", "127.92.0.2"}
    engine.dispose()
