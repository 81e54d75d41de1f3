"""Cancelling a clone, with a real worker and a real PostgreSQL source: a job cancelled before it ran
never touches the source; a job cancelled while its source is stopped brings the source back in
its own restart step, and either way nothing of the clone is left behind."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import func, select

from shared import locks
from shared.clone import gate
from shared.clone.control import request_cancel
from shared.clone.gate import Ticket, step_row
from shared.db import session_scope
from shared.drivers import get_driver
from shared.models import CloneJob, JobEvent, NodeLock
from shared.planning import plan_clone
from shared.states import Step
from tests.helpers import wait_for
from tests.stack import Backend, publisher
from tests.workflow_client import TENANT, create_environment, delete_environment, lease_count, wait_job
from workers.workflow import dispatch_clone

pytestmark = pytest.mark.integration

BACKEND = {"pool": "127.108.0.0/16"}  # a pool no other module uses
ROWS = 1000


@pytest.fixture(scope="module")
def source(backend: Backend) -> Iterator[str]:
    """A one-node PostgreSQL environment holding ROWS rows (shared: a node takes a second or two)."""
    env = create_environment("src", [{"name": "db", "stack": "postgres"}])
    node_id = env.nodes[0].id
    with psycopg.connect(get_driver().url(node_id), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute(f"INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g")
    yield node_id
    delete_environment("src")
    assert backend.volumes() == set() and lease_count() == 0


def _pid(node_id: str) -> int:
    return int((get_driver().pid_path(node_id)).read_text().split()[0])


def _rows(node_id: str) -> tuple[int, int]:
    with psycopg.connect(get_driver().url(node_id)) as conn:
        return conn.execute("SELECT count(*), max(id) FROM t").fetchone()


def _node_locks() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(NodeLock))


def _cancel(job_id: str) -> None:
    with session_scope() as session:
        request_cancel(session, session.get(CloneJob, job_id))


def _cancel_while_open(job_id: str, source_node_id: str, step: Step) -> str:
    """Cancel while holding ``step``'s row: it cannot close, nor the next step open, before the
    cancel is committed. Returns the step's state at that moment."""
    with session_scope() as session:
        state = step_row(session, job_id, source_node_id, step).state
        request_cancel(session, session.get(CloneJob, job_id))
        return state


def test_cancel_while_queued_never_touches_the_source(backend: Backend, source: str) -> None:
    pid, leases, volumes = _pid(source), lease_count(), backend.volumes()
    with session_scope() as session:  # planned and committed, not yet sent: as the API does
        job_id = plan_clone(session, TENANT, "src", "queued-copy", {}).id
    assert lease_count() > leases  # the plan leased the clone's address
    _cancel(job_id)
    dispatch_clone(publisher(), job_id)
    job = wait_job(job_id, timeout=60)

    assert job.state == "cancelled"
    steps = {s.step: s for s in job.steps}
    assert steps["quiesce"].state == "cancelled" and steps["quiesce"].attempts == 0
    assert {steps[s].state for s in ("snapshot", "provision", "assign_ips")} == {"cancelled"}
    assert steps["restart"].state == "succeeded"  # always runs; nothing of this job to bring back
    jn = job.nodes[0]
    assert jn.quiesced_at is None and jn.restarted_at is None and jn.downtime_ms is None
    assert _pid(source) == pid  # never stopped
    assert get_driver().health(source).healthy and _rows(source) == (ROWS, ROWS)
    assert lease_count() == leases
    assert _node_locks() == 0
    assert backend.volumes() == volumes and backend.snapshots() == set()
    delete_environment("queued-copy")


def test_cancel_inside_the_quiesce_window_restarts_the_source_in_its_restart_step(
        backend: Backend, source: str) -> None:
    driver = get_driver()
    leases, volumes = lease_count(), backend.volumes()
    with session_scope() as session:
        job_id = plan_clone(session, TENANT, "src", "window-copy", {"consistency": "stop",
            "faults": [{"step": "quiesce", "node": "db", "kind": "hang", "seconds": 4}]}).id
    dispatch_clone(publisher(), job_id)
    # PostgreSQL stopped while the quiesce step is still open: we are inside the window.
    wait_for(lambda: not driver.health(source).running, timeout=30, what="the source to be stopped")
    assert _cancel_while_open(job_id, source, Step.QUIESCE) == "running"
    job = wait_job(job_id, timeout=60)

    assert job.state == "cancelled"
    steps = {s.step: s for s in job.steps}
    assert steps["quiesce"].state == "succeeded"  # it had done its work when the cancel came
    assert {steps[s].state for s in ("snapshot", "provision", "assign_ips")} == {"cancelled"}
    assert steps["snapshot"].attempts == 0
    restart = steps["restart"]
    assert restart.state == "succeeded", restart.error
    jn = job.nodes[0]
    assert jn.downtime_ms is not None and jn.restarted_at is not None
    # The restart step itself brought the source back, before the report ran -- not the report's
    # safety net.
    with session_scope() as session:
        report_at = session.scalar(select(func.min(JobEvent.at)).where(JobEvent.job_id == job_id,
                                                                       JobEvent.kind == "report"))
    assert jn.restarted_at <= restart.finished_at < report_at <= job.finished_at
    assert driver.health(source).healthy and _rows(source) == (ROWS, ROWS)
    assert lease_count() == leases
    assert _node_locks() == 0
    assert backend.volumes() == volumes and backend.snapshots() == set()
    delete_environment("window-copy")


def test_a_step_that_finds_its_job_ended_as_it_waits_leaves_no_claim(backend: Backend, source: str) -> None:
    """A quiesce step still running when its job ended (the watchdog's reaper, a cancel) claims the
    node behind an online copy, then hands its attempt back: it must not wait, nor leave the claim
    to hold later copies off."""
    with session_scope() as session:
        job_id = plan_clone(session, TENANT, "src", "ended-copy", {"consistency": "stop"}).id
    _cancel(job_id)
    dispatch_clone(publisher(), job_id)
    assert wait_job(job_id, timeout=60).state == "cancelled"
    with session_scope() as session:
        token = locks.share(session, source, "copying", 600)
    with session_scope() as session:
        busy = locks.take(session, source, job_id, 600)  # what the late step body does
    assert busy is not None and busy.holder == "copying" and _node_locks() == 1
    late = Ticket(job_id, source, "db", Step.QUIESCE, 1, {}, run=1)
    assert gate.hand_back(late, busy, lock_wait_s=1800) is None  # no wait
    assert _node_locks() == 0
    with session_scope() as session:
        assert step_row(session, job_id, source, Step.QUIESCE).state == "cancelled"  # still closed
        locks.unshare(session, source, "copying", token)
    delete_environment("ended-copy")
