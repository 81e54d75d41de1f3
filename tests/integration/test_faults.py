"""Faults, with real processes: killed workers, a broker and a state database that go away, a full
disk, many jobs at once, a soak with injected failures. Every test counts processes, volumes,
snapshots and leases before and after."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import redis

from shared.db import session_scope
from shared.drivers import get_driver
from shared.models import CloneJob, JobNode
from tests.fault_helpers import counts, kill9, step_worker_pid
from tests.helpers import wait_for
from tests.stack import Backend
from tests.workflow_client import (
    clone,
    create_environment,
    delete_environment,
    environment,
    start_clone,
    wait_job,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with Backend(pool="127.100.0.0/16", extra_env={"ENVCLONE_WATCHDOG_INTERVAL_S": "1"}) as b:
        yield b


def _job_node(job_id: str) -> JobNode:
    with session_scope() as session:
        jn = session.query(JobNode).filter_by(job_id=job_id).one()
        session.expunge(jn)
        return jn


def _job_state(job_id: str) -> str:
    with session_scope() as session:
        return session.get(CloneJob, job_id).state


# What a step has visibly done by the time it stalls (hang faults stall after the work).
def _did(step: str, job_id: str, source_id: str) -> bool:
    driver = get_driver()
    jn = _job_node(job_id)
    return {
        "quiesce": lambda: not driver.health(source_id).running,
        "snapshot": lambda: jn.snapshot_id in driver.snapshot_ids(),
        "restart": lambda: jn.restarted_at is not None,
        "provision": lambda: jn.clone_node_id in driver.node_ids(),
        "assign_ips": lambda: driver.health(jn.clone_node_id).healthy,
        "report": lambda: _job_state(job_id) == "succeeded",
    }[step]()


@pytest.mark.parametrize("step", ["quiesce", "snapshot", "restart", "provision", "assign_ips", "report"])
def test_kill_9_of_the_worker_process_running_each_step(backend: Backend, step: str) -> None:
    src = create_environment("src", [{"name": "cache", "stack": "valkey"}])
    source_id = src.nodes[0].id
    redis.Redis(host=src.nodes[0].address).set("k", "v")
    before = counts(backend)
    job_id = start_clone("src", "dst", faults=[{"step": step, "kind": "hang", "seconds": 60}])
    pid = wait_for(lambda: _did(step, job_id, source_id) and step_worker_pid(job_id, step), timeout=60,
                   what=f"{step} to do its work")
    kill9(pid)
    job = wait_job(job_id, timeout=120)
    assert job.state == "succeeded", job.error
    attempts = {s.step: s.attempts for s in job.steps}
    if step != "report":
        assert attempts[step] == 2  # redelivered and re-run, harmlessly
    clone_id = job.nodes[0].clone_node_id
    after = counts(backend)
    assert after.running == before.running | {clone_id}  # the source runs; exactly one clone node
    assert after.volumes == before.volumes | {clone_id}
    assert after.snapshots == before.snapshots == frozenset()
    assert after.leases == before.leases + 1
    assert redis.Redis(host=environment("dst").nodes[0].address).get("k") == b"v"
    delete_environment("dst")
    delete_environment("src")
    assert counts(backend) == counts(backend).__class__(frozenset(), frozenset(), frozenset(), 0)


def test_whole_worker_killed_then_a_new_one_finishes_the_job() -> None:
    """kill -9 of the worker's main process and children mid-provision; a supervisor starts a new
    worker; the broker redelivers the unacknowledged step after the visibility timeout."""
    env = {"ENVCLONE_VISIBILITY_TIMEOUT_S": "8", "ENVCLONE_TASK_TIME_LIMIT_S": "6"}
    with Backend(pool="127.101.0.0/16", extra_env=env) as backend:
        create_environment("src", [{"name": "cache", "stack": "valkey"}])
        before = counts(backend)
        job_id = start_clone("src", "dst", faults=[{"step": "provision", "kind": "hang", "seconds": 4}])
        wait_for(lambda: step_worker_pid(job_id, "provision"), timeout=60, what="provision running")
        backend.stop_worker(sig=9)
        backend.start_worker()
        job = wait_job(job_id, timeout=120)
        assert job.state == "succeeded", job.error
        after = counts(backend)
        assert after.running == before.running | {job.nodes[0].clone_node_id}
        assert after.snapshots == frozenset() and after.leases == before.leases + 1
