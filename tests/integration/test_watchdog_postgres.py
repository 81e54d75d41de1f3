"""The watchdog's over-long-quiesce rule on a stopped PostgreSQL source (real celery beat): a source
held down past ENVCLONE_MAX_DOWNTIME_S is started again by the watchdog long before the stalled
step would have let it go. The stall limit is far away here, so that rule alone acts (in
test_watchdog.py the 4 s stall rule would also resume a job whose quiesce hangs this long)."""

from __future__ import annotations

import psycopg
import pytest

from shared.drivers import get_driver
from tests.fault_helpers import counts
from tests.helpers import wait_for
from tests.stack import Backend
from tests.workflow_client import create_environment, delete_environment, start_clone, wait_job

pytestmark = pytest.mark.integration

BACKEND = {"pool": "127.109.0.0/16", "extra_env": {
    "ENVCLONE_WATCHDOG_INTERVAL_S": "1",
    "ENVCLONE_MAX_DOWNTIME_S": "2",
    "ENVCLONE_JOB_STALL_S": "120",
}}
BEAT = True

HANG_S = 12  # the quiesce step stalls this long after stopping PostgreSQL
BACK_S = 8  # the watchdog has it healthy again within this (about 2-4 s: the limit, a tick, a start)
ROWS = 1000


def _rows(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*), max(id) FROM t").fetchone()


def test_stopped_postgres_source_is_restarted_by_the_watchdog(backend: Backend) -> None:
    env = create_environment("src", [{"name": "db", "stack": "postgres"}])
    source = env.nodes[0].id
    driver = get_driver()
    url = driver.url(source)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute(f"INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g")
    before = counts(backend)

    job_id = start_clone("src", "dst", consistency="stop",
                         faults=[{"step": "quiesce", "node": "db", "kind": "hang", "seconds": HANG_S}])
    wait_for(lambda: not driver.health(source).running, timeout=30, what="the quiesce to stop PostgreSQL")
    # Back well before the hang ends: only the watchdog can have started it.
    wait_for(lambda: driver.health(source).healthy, timeout=BACK_S, what="the watchdog to restart PostgreSQL")
    assert _rows(url) == (ROWS, ROWS)

    job = wait_job(job_id, timeout=HANG_S + 60)
    assert job.state == "failed"
    assert "watchdog: source was down longer than 2s" in job.error
    assert job.run == 1  # never resumed: the stall rule did not act
    steps = {s.step: s.state for s in job.steps}
    assert steps["quiesce"] == "failed" and steps["snapshot"] == "failed"
    jn = job.nodes[0]
    assert jn.downtime_ms is not None and jn.downtime_ms < BACK_S * 1000
    assert driver.health(source).healthy and _rows(url) == (ROWS, ROWS)
    assert counts(backend) == before
    delete_environment("dst")
    delete_environment("src")
    assert counts(backend).volumes == frozenset() and counts(backend).leases == 0
