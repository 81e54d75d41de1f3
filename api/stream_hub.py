"""One poller per API process for every open event stream. Each tick it reads, in two queries, the
state and the new events of every job a stream follows, and wakes the streams of the jobs that
changed. A hundred open streams then cost the database two queries a tick, not two each, and their
threads sleep until there is something to send.

The database stays the one source of truth (no second channel to lose or reorder events): a job's
events are written one transaction at a time under its row lock, so reading a job's events "after
the last id seen" never skips one. The state is read before the events in a tick, so a stream that
sees its job done has been given every event written before it was done."""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import SQLAlchemyError

from shared.db import get_engine
from shared.models import CloneJob, JobEvent
from shared.states import JobState

log = logging.getLogger("envclone.api.streams")

POLL_S = 0.25
BATCH = 500


@dataclass(eq=False)
class Follower:
    job_id: str
    last: int  # the last event id it has been given


@dataclass
class Feed:
    """What the hub has read of one job for the streams that follow it."""

    fetched: int  # events up to this id are read (into ``events`` or, before the feed began, not at all)
    changed: threading.Condition
    followers: set[Follower] = field(default_factory=set)
    events: list[Any] = field(default_factory=list)  # rows (id, job_id, kind, data), ascending ids
    state: str | None = None


def read_events(job_id: str, after: int, upto: int | None = None) -> Iterator[Any]:
    """A job's events after ``after`` (up to ``upto``), straight from the database, in batches."""
    while True:
        query = select(JobEvent.id, JobEvent.job_id, JobEvent.kind, JobEvent.data).where(
            JobEvent.job_id == job_id, JobEvent.id > after)
        if upto is not None:
            query = query.where(JobEvent.id <= upto)
        with get_engine().connect() as conn:
            rows = conn.execute(query.order_by(JobEvent.id).limit(BATCH)).all()
        yield from rows
        if len(rows) < BATCH:
            return
        after = rows[-1].id


class Hub:
    def __init__(self, poll_s: float = POLL_S) -> None:
        self.poll_s = poll_s
        self.lock = threading.Lock()
        self.feeds: dict[str, Feed] = {}
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def follow(self, job_id: str, last: int) -> tuple[Follower, int]:
        """Start following ``job_id`` from ``last``. Returns the follower and the id up to which the
        caller reads the job's past itself (read_events); the hub hands it everything after."""
        with get_engine().connect() as conn:  # the state first: if it is done, every event is in ``newest``
            state = conn.scalar(select(CloneJob.state).where(CloneJob.id == job_id))
            newest = conn.scalar(select(func.coalesce(func.max(JobEvent.id), 0)).where(JobEvent.job_id == job_id))
        with self.lock:
            feed = self.feeds.get(job_id)
            if feed is None:
                feed = self.feeds[job_id] = Feed(newest, threading.Condition(self.lock), state=state)
            follower = Follower(job_id, max(last, feed.fetched))
            feed.followers.add(follower)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="sse-hub", daemon=True)
                self.thread.start()
        self.wake.set()
        return follower, follower.last

    def unfollow(self, follower: Follower) -> None:
        with self.lock:
            feed = self.feeds.get(follower.job_id)
            if feed is not None:
                feed.followers.discard(follower)
                if not feed.followers:
                    del self.feeds[follower.job_id]

    def next(self, follower: Follower, timeout: float) -> tuple[list[Any], str | None]:
        """The events past ``follower.last`` (it advances) and the job's state (None until read),
        waiting up to ``timeout`` for either to be news."""
        with self.lock:
            feed = self.feeds[follower.job_id]
            if not self._news(feed, follower):
                feed.changed.wait(timeout)
            start = bisect.bisect_right(feed.events, follower.last, key=lambda e: e.id)
            events = feed.events[start:]
            if events:
                follower.last = events[-1].id
                oldest = min(f.last for f in feed.followers)  # what no follower needs any more
                del feed.events[:bisect.bisect_right(feed.events, oldest, key=lambda e: e.id)]
            return events, feed.state

    @staticmethod
    def _news(feed: Feed, follower: Follower) -> bool:
        ended = feed.state is not None and JobState(feed.state).done
        return ended or bool(feed.events and feed.events[-1].id > follower.last)

    def _read(self, watch: dict[str, int]) -> tuple[dict[str, str], list[Any]]:
        with get_engine().connect() as conn:
            states = dict(conn.execute(select(CloneJob.id, CloneJob.state).where(CloneJob.id.in_(watch))).all())
            rows = conn.execute(select(JobEvent.id, JobEvent.job_id, JobEvent.kind, JobEvent.data).where(
                or_(*(and_(JobEvent.job_id == job, JobEvent.id > after) for job, after in watch.items())))
                .order_by(JobEvent.id).limit(BATCH)).all()
        return states, rows

    def _tick(self) -> bool:
        with self.lock:
            watch = {job: feed.fetched for job, feed in self.feeds.items()}
        if not watch:
            return False
        states, rows = self._read(watch)
        with self.lock:
            for job, feed in self.feeds.items():
                if job not in watch:  # begun since the read: the next tick reads it
                    continue
                new = [r for r in rows if r.job_id == job and r.id > feed.fetched]
                if new:
                    feed.events += new
                    feed.fetched = new[-1].id
                if new or states.get(job) != feed.state:
                    feed.state = states.get(job)
                    feed.changed.notify_all()
        return True

    def _run(self) -> None:
        while True:
            try:
                busy = self._tick()
            except SQLAlchemyError as exc:  # the database away: streams wait (and keep alive) meanwhile
                log.warning("event streams cannot read the database: %s", exc)
                busy = True
            if not busy:
                self.wake.wait()
                self.wake.clear()
                continue
            time.sleep(self.poll_s)  # poll: the database is the source of truth
