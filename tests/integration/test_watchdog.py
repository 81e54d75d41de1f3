"""The watchdog (run by a real celery beat) keeps its promises: sources down too long come back,
dead nodes are restarted, the outbox is sent, stalled jobs are resumed and at last reaped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy import select, text

from shared.db import session_scope
from shared.drivers import get_driver
from shared.models import CloneJob, EnvironmentEvent, JobEvent, JobNode, utcnow
from shared.planning import plan_clone
from tests.fault_helpers import counts
from tests.helpers import wait_for
from tests.stack import Backend, publisher
from tests.workflow_client import TENANT, create_environment, delete_environment, start_clone, valkey, wait_job
from workers.workflow import dispatch_clone

pytestmark = [pytest.mark.integration, pytest.mark.long]

WATCHDOG_ENV = {
    "ENVCLONE_WATCHDOG_INTERVAL_S": "1",
    "ENVCLONE_MAX_DOWNTIME_S": "2",
    "ENVCLONE_JOB_STALL_S": "8",  # above the slowest step on a loaded 2-core machine
    "ENVCLONE_MAX_RESUMES": "1",
    "ENVCLONE_DISPATCH_GRACE_S": "1",
    "ENVCLONE_WATCHDOG_LOCK_WAIT_S": "1",
}


BACKEND = {"pool": "127.102.0.0/16", "concurrency": 3, "extra_env": WATCHDOG_ENV}
BEAT = True


@pytest.fixture
def source(backend: Backend) -> Iterator[str]:
    env = create_environment("src", [{"name": "cache", "stack": "valkey"}])
    valkey(env).set("k", "v")
    yield env.nodes[0].id
    delete_environment("src")
    assert counts(backend).volumes == frozenset() and counts(backend).leases == 0


def events(job_id: str) -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(JobEvent.kind).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def test_source_down_too_long_is_restarted_and_the_job_fails_cleanly(backend: Backend, source: str) -> None:
    before = counts(backend)
    job = wait_job(start_clone("src", "dst", consistency="stop",
                               faults=[{"step": "quiesce", "kind": "hang", "seconds": 8}]), 60)
    assert job.state == "failed"
    assert "watchdog: source was down longer than 2s" in job.error
    assert get_driver().health(source).healthy
    assert job.nodes[0].downtime_ms < 8000  # restarted by the watchdog, not after the hang
    assert counts(backend) == before
    delete_environment("dst")


def test_dead_node_is_restarted_and_the_event_recorded(backend: Backend, source: str) -> None:
    pid = int((get_driver().pid_path(source)).read_text().split()[0])
    os.kill(pid, signal.SIGKILL)

    def recorded() -> bool:
        with session_scope() as session:
            return "node cache was not running; restarted" in session.scalars(select(EnvironmentEvent.message))

    wait_for(recorded, timeout=30, what="the reconciler to restart the node and record it")
    assert get_driver().health(source).healthy
    new_pid = int((get_driver().pid_path(source)).read_text().split()[0])
    assert new_pid != pid


def test_committed_but_never_sent_job_is_dispatched_by_the_outbox(backend: Backend, source: str) -> None:
    with session_scope() as session:  # as if the API died between commit and send
        job_id = plan_clone(session, TENANT, "src", "dst", {}).id
    job = wait_job(job_id, timeout=60)
    assert job.state == "succeeded" and job.dispatched_at is not None
    delete_environment("dst")


def test_job_whose_messages_were_lost_is_resumed(backend: Backend, source: str) -> None:
    with session_scope() as session:  # marked sent, but nothing reached the broker
        job = plan_clone(session, TENANT, "src", "dst", {})
        job.dispatched_at = utcnow()
        job_id = job.id
    job = wait_job(job_id, timeout=60)
    assert job.state == "succeeded" and job.run == 2
    delete_environment("dst")


def test_report_of_an_older_run_is_not_progress(backend: Backend, source: str) -> None:
    """A resumed job's first run still ends: its report must stand down without a trace. It used to
    record "report running", which reset the stall clock and let a stuck second run finish."""
    with session_scope() as session:
        job = plan_clone(session, TENANT, "src", "dst", {})
        job.run, job.dispatched_at, job_id = 2, utcnow(), job.id  # resumed: run 1 is stale
    stale = publisher().signature("envclone.report", args=(job_id, 1)).apply_async()
    wait_for(stale.ready, timeout=30, what="the stale report to run")
    assert "report" not in events(job_id)  # so the watchdog's stall clock did not move
    dispatch_clone(publisher(), job_id)
    assert wait_job(job_id, timeout=60).state == "succeeded"
    assert events(job_id).count("report") == 1  # run 2's own report
    delete_environment("dst")


def test_job_that_keeps_stalling_is_reaped_with_compensation(backend: Backend, source: str) -> None:
    before = counts(backend)
    # Each hang outlasts ENVCLONE_JOB_STALL_S (8 s) by 8 s: the watchdog (every 1 s) has that long to see it.
    job_id = start_clone("src", "dst", faults=[{"step": "assign_ips", "kind": "hang", "seconds": 16, "times": 5}])
    job = wait_job(job_id, timeout=60)
    assert job.state == "failed" and "reaped: no progress" in job.error
    assert job.run == 2  # resumed once, then reaped
    with session_scope() as session:
        assert session.get(CloneJob, job_id).state == "failed"
    assert counts(backend) == before  # the clone that assign_ips had started is gone
    assert get_driver().health(source).healthy
    delete_environment("dst")


# An envclone process that hangs inside a transaction holding one job's row (as a host gone without
# a reset would: its session stays open on the server).
_HANGS_HOLDING_A_JOB = """
import sys
from sqlalchemy import select, text
from shared.db import session_scope
from shared.models import CloneJob
with session_scope() as session:
    session.execute(select(CloneJob).where(CloneJob.id == sys.argv[1]).with_for_update()).scalar_one()
    print(session.execute(text("SELECT pg_backend_pid()")).scalar_one(), flush=True)
    sys.stdin.read()
"""


def test_a_job_row_held_by_a_hung_process_silences_neither_the_watchdog_nor_that_job(backend: Backend,
                                                                                       source: str) -> None:
    """The watchdog waits a bounded time for the held job and goes on with the rest: it used to wait
    for good, and every later round found its lock taken. Once the row is free, the held job is
    resumed. (The server ending such a transaction by itself: test_pooling.)"""
    with session_scope() as session:
        held = plan_clone(session, TENANT, "src", "dst", {})  # sent, and soon stalled: no news of it
        held.dispatched_at = utcnow()
        held_id = held.id
    hung = subprocess.Popen([sys.executable, "-c", _HANGS_HOLDING_A_JOB, held_id], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env={**os.environ, "ENVCLONE_DB_IDLE_TX_TIMEOUT_S": "0"})
    try:
        assert hung.stdout is not None
        hung_pid = int(hung.stdout.readline())

        def watchdog_waits_on_it() -> bool:
            with session_scope() as session:
                return bool(session.scalar(text("SELECT count(*) FROM pg_stat_activity "
                                                "WHERE :pid = ANY(pg_blocking_pids(pid))"), {"pid": hung_pid}))

        wait_for(watchdog_waits_on_it, timeout=60, what="the watchdog to reach the held job")
        with session_scope() as session:  # committed, never sent: the outbox's, a later rule's
            other_id = plan_clone(session, TENANT, "src", "dst2", {}).id
        assert wait_job(other_id, timeout=60).state == "succeeded"
        with session_scope() as session:
            assert session.get(CloneJob, held_id).run == 1  # not resumed meanwhile: its row was held
    finally:
        hung.kill()  # its session ends, and the row is free
        hung.wait(10)
    job = wait_job(held_id, timeout=60)
    assert job.state == "succeeded" and job.run == 2
    delete_environment("dst")
    delete_environment("dst2")


def test_a_source_down_too_long_comes_back_while_a_hung_process_holds_its_jobs_row(backend: Backend,
                                                                                    source: str) -> None:
    """Bringing the source back comes first: its restart is recorded in a transaction that needs no
    job row, so a hung holder of that row delays only the job's bookkeeping."""
    before = counts(backend)
    job_id = start_clone("src", "dst", consistency="stop", faults=[{"step": "quiesce", "kind": "hang", "seconds": 8}])

    def window_open() -> bool:
        with session_scope() as session:
            return session.scalars(select(JobNode.quiesced_at).where(JobNode.job_id == job_id)).one() is not None

    wait_for(window_open, timeout=60, what="the stop-mode clone to hold the source")
    hung = subprocess.Popen([sys.executable, "-c", _HANGS_HOLDING_A_JOB, job_id], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env={**os.environ, "ENVCLONE_DB_IDLE_TX_TIMEOUT_S": "0"})
    try:
        assert hung.stdout is not None and int(hung.stdout.readline())

        def restart_recorded() -> bool:
            with session_scope() as session:
                return session.scalars(select(JobNode.restarted_at).where(JobNode.job_id == job_id)).one() is not None

        wait_for(restart_recorded, timeout=30, what="the watchdog to record the source's restart")
        assert get_driver().health(source).healthy
    finally:
        hung.kill()
        hung.wait(10)
    job = wait_job(job_id, timeout=60)
    assert job.state == "failed" and "source was down longer than 2s" in (job.error or ""), job.error
    assert counts(backend) == before
    delete_environment("dst")
