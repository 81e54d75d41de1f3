"""The per-process event-stream hub on an embedded SQLite state database (no services): what a
follower is given, in order and once, and when its job is seen done."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api.stream_hub import Hub, read_events
from shared.db import session_scope
from shared.models import CloneJob, JobEvent
from shared.states import JobState
from tests.stack import reset_caches


@pytest.fixture
def state_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from shared.migrate import upgrade

    monkeypatch.setenv("ENVCLONE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ENVCLONE_DATABASE_URL", f"sqlite:///{tmp_path / 'state.db'}")
    reset_caches()
    upgrade()
    yield
    reset_caches()


@pytest.fixture
def hub(state_db: None) -> Iterator[Hub]:
    hub = Hub(poll_s=0.02)
    yield hub
    for feed in list(hub.feeds.values()):  # no follower left: its thread goes idle, off this database
        for follower in list(feed.followers):
            hub.unfollow(follower)


def job(state: JobState = JobState.RUNNING) -> str:
    with session_scope() as session:
        row = CloneJob(tenant="t", source_name="a", target_name="b", state=state)
        session.add(row)
        session.flush()
        return row.id


def emit(job_id: str, n: int, state: JobState | None = None) -> list[int]:
    with session_scope() as session:
        rows = [JobEvent(job_id=job_id, kind="progress", data={"n": i}) for i in range(n)]
        session.add_all(rows)
        if state is not None:
            session.get(CloneJob, job_id).state = state
        session.flush()
        return [r.id for r in rows]


def test_a_follower_gets_the_past_from_the_database_then_each_new_event_once(hub: Hub) -> None:
    a, other = job(), job()
    past = emit(a, 3)
    emit(other, 2)
    follower, upto = hub.follow(a, past[0])
    assert upto == past[-1]
    assert [e.id for e in read_events(a, past[0], upto)] == past[1:]
    new = emit(a, 2)
    got: list[int] = []
    while len(got) < 2:
        events, state = hub.next(follower, timeout=5)
        assert events or state == JobState.RUNNING
        got += [e.id for e in events]
    assert got == new and follower.last == new[-1]
    assert hub.next(follower, timeout=0.1) == ([], JobState.RUNNING)  # nothing twice, and not done
    hub.unfollow(follower)
    assert hub.feeds == {}


def test_the_last_events_come_before_the_end(hub: Hub) -> None:
    a = job()
    follower, _ = hub.follow(a, 0)
    final = emit(a, 2, state=JobState.SUCCEEDED)  # the events and the state in one transaction
    seen: list[int] = []
    while True:
        events, state = hub.next(follower, timeout=5)
        seen += [e.id for e in events]
        if not events and state == JobState.SUCCEEDED:
            break
    assert seen == final


def test_a_job_done_before_anyone_follows_ends_at_once(hub: Hub) -> None:
    a = job(JobState.FAILED)
    emit(a, 2)
    hub.poll_s = 60  # no tick will come in time: what follow() read must be enough
    follower, upto = hub.follow(a, 0)
    assert len(list(read_events(a, 0, upto))) == 2
    assert hub.next(follower, timeout=0.1) == ([], JobState.FAILED)


def test_followers_at_different_places_each_get_their_own_rest(hub: Hub) -> None:
    a = job()
    slow, _ = hub.follow(a, 0)
    first = emit(a, 3)
    fast_events: list[int] = []
    fast, upto = hub.follow(a, 0)
    fast_events += [e.id for e in read_events(a, 0, upto)]
    second = emit(a, 2)
    while len(fast_events) < 5:
        fast_events += [e.id for e in hub.next(fast, timeout=5)[0]]
    slow_events: list[int] = []
    while len(slow_events) < 5:  # what the fast one took is still there for the slow one
        slow_events += [e.id for e in hub.next(slow, timeout=5)[0]]
    assert fast_events == slow_events == first + second
    assert hub.feeds[a].events == []  # given to everyone: dropped
