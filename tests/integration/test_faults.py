"""Faults, with real processes: killed workers, a broker and a state database that go away, a full
disk, many jobs at once, a soak with injected failures. Every test counts processes, volumes,
snapshots, leases and node locks before and after, and a clone that succeeded must hold the source's
data."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import redis
from sqlalchemy import select

from shared.db import session_scope
from shared.drivers import get_driver
from shared.models import CloneJob, JobNode, StepRun
from tests.fault_helpers import Counts, counts, kill9, step_worker_pid
from tests.helpers import wait_for
from tests.stack import Backend
from tests.workflow_client import (
    create_environment,
    delete_environment,
    environment,
    start_clone,
    valkey_at,
    wait_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.long]


BACKEND = {"pool": "127.100.0.0/16", "extra_env": {"ENVCLONE_WATCHDOG_INTERVAL_S": "1"}}


def _job_node(job_id: str) -> JobNode:
    with session_scope() as session:
        jn = session.query(JobNode).filter_by(job_id=job_id).one()
        session.expunge(jn)
        return jn


def _step_state(job_id: str, step: str) -> str:
    with session_scope() as session:
        return session.scalars(select(StepRun.state).where(StepRun.job_id == job_id, StepRun.step == step)).one()


def _job_state(job_id: str) -> str:
    with session_scope() as session:
        return session.get(CloneJob, job_id).state


def _finished_at(job: CloneJob, step: str) -> datetime:
    """When ``step`` of the (one-node) job was recorded as ended: aware UTC, written by the worker."""
    finished = next(s.finished_at for s in job.steps if s.step == step)
    assert finished is not None, f"{step} has no finished_at"
    return finished


def _clone_value(target: str, key: str = "k") -> bytes | None:
    """What the (one-node Valkey) clone ``target`` answers for ``key``, read at its own address."""
    return valkey_at(environment(target).nodes[0].address, socket_timeout=10).get(key)


# What a step has visibly done by the time it stalls (hang faults stall after the work).
def _did(step: str, job_id: str, source_id: str) -> bool:
    driver = get_driver()
    jn = _job_node(job_id)
    return {
        "quiesce": lambda: driver.quiesced(source_id),
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
    valkey_at(src.nodes[0].address).set("k", "v")
    before = counts(backend)
    # Stop mode: the window (quiesce -> snapshot -> restart) is what a lost worker must not break.
    job_id = start_clone("src", "dst", consistency="stop", faults=[{"step": step, "kind": "hang", "seconds": 60}])
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
    assert after.locks == before.locks == 0  # the source's lock was released
    assert valkey_at(environment("dst").nodes[0].address).get("k") == b"v"
    delete_environment("dst")
    delete_environment("src")
    assert counts(backend) == Counts(frozenset(), frozenset(), frozenset(), 0, 0)


def test_whole_worker_killed_then_a_new_one_finishes_the_job() -> None:
    """kill -9 of the worker's main process and children mid-provision; a supervisor starts a new
    worker. The step's message is stuck unacknowledged in Redis until the visibility timeout (an
    hour), so it is the watchdog that notices the stalled job and re-dispatches it."""
    env = {"ENVCLONE_WATCHDOG_INTERVAL_S": "1", "ENVCLONE_JOB_STALL_S": "5"}
    with Backend(pool="127.101.0.0/16", extra_env=env) as backend:
        backend.start_beat()
        src = create_environment("src", [{"name": "cache", "stack": "valkey"}])
        valkey_at(src.nodes[0].address).set("k", "v")
        before = counts(backend)
        job_id = start_clone("src", "dst", faults=[{"step": "provision", "kind": "hang", "seconds": 4}])
        wait_for(lambda: step_worker_pid(job_id, "provision"), timeout=60, what="provision running")
        backend.stop_worker(sig=9)
        backend.start_worker()
        job = wait_job(job_id, timeout=120)
        assert job.state == "succeeded", job.error
        assert job.run == 2  # resumed by the watchdog
        after = counts(backend)
        assert after.running == before.running | {job.nodes[0].clone_node_id}
        assert after.snapshots == frozenset() and after.leases == before.leases + 1
        assert after.locks == before.locks == 0
        assert _clone_value("dst") == b"v"  # the resumed job's clone holds the source's data


# ---- the broker goes away ------------------------------------------------------------------------------
class OwnBroker:
    """A Redis-compatible broker of this test's own (the bundled valkey-server, AOF on), so it can be
    stopped and started without touching the machine's Redis."""

    def __init__(self) -> None:
        import tempfile
        from pathlib import Path

        from tests.integration.test_api_server import free_port

        self.port, self.dir = free_port(), Path(tempfile.mkdtemp(prefix="envclone-broker-"))
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> None:
        import subprocess

        from shared.stacks.valkey import valkey_binary

        self.proc = subprocess.Popen([valkey_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir",
                                      str(self.dir), "--appendonly", "yes", "--save", ""],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: redis.Redis.from_url(self.url).ping(), timeout=10, what="broker up")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        import shutil

        if self.proc and self.proc.poll() is None:
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_broker_stopped_and_started_mid_job() -> None:
    from api import create_app
    from api.auth import create_token

    broker = OwnBroker()
    broker.start()
    try:
        with Backend(pool="127.103.0.0/16", broker_url=broker.url) as backend:
            src = create_environment("src", [{"name": "cache", "stack": "valkey"}])
            valkey_at(src.nodes[0].address).set("k", "v")
            before = counts(backend)
            job_id = start_clone("src", "dst", faults=[{"step": "provision", "kind": "hang", "seconds": 3}])
            wait_for(lambda: step_worker_pid(job_id, "provision"), timeout=60, what="provision running")
            broker.stop()
            broker_stopped_at = datetime.now(UTC)
            # Submissions during the outage: a clear 503, nothing half-made.
            client = create_app().test_client()
            headers = {"Authorization": f"Bearer {create_token('acme')}"}
            response = client.post("/v1/environments", json={"name": "late", "nodes": [
                {"name": "c", "stack": "valkey"}]}, headers=headers)
            assert response.status_code == 503 and response.json["error"]["code"] == "broker_unavailable"
            assert client.get("/readyz").status_code == 503
            assert environment("late") is None
            # The step finishes while the broker is still away: its chain's next publish must wait
            # for the broker rather than fail (kombu's retry breaks on a channel its reconnect closed).
            wait_for(lambda: _step_state(job_id, "provision") == "succeeded", timeout=30, what="provision done")
            broker.start()
            try:
                job = wait_job(job_id, timeout=90)
            except AssertionError:
                print(backend.worker_log()[-8000:])
                raise
            assert job.state == "succeeded", job.error
            after = counts(backend)
            assert after.running == before.running | {job.nodes[0].clone_node_id}
            assert after.leases == before.leases + 1 and after.snapshots == frozenset()
            assert after.locks == before.locks == 0
            # The fault really overlapped the step: provision ended after the broker had gone (and,
            # by the wait above, before it came back).
            provision_finished = _finished_at(job, "provision")
            assert provision_finished > broker_stopped_at, (provision_finished, broker_stopped_at)
            assert _clone_value("dst") == b"v"
    finally:
        broker.close()


# ---- the state database goes away ----------------------------------------------------------------------
def test_state_database_unavailable_mid_job() -> None:
    from shared.drivers import NodeSpec
    from shared.drivers.local import LocalDriver
    from shared.stacks.postgres import SUPERUSER
    from tests.conftest import destroy_everything, make_data_root

    db_root = make_data_root("envclone-statedb-")
    db_driver = LocalDriver(db_root)
    try:
        db_driver.create_node(NodeSpec("statedb", "postgres", "127.104.255.1", 5432))
        secret = db_driver._node("statedb")[1].secrets()["superuser_password"]
        url = f"postgresql+psycopg://{SUPERUSER}:{secret}@127.104.255.1:5432/postgres"
        with Backend(database=url, pool="127.104.0.0/24") as backend:
            src = create_environment("src", [{"name": "cache", "stack": "valkey"}])
            valkey_at(src.nodes[0].address).set("k", "v")
            before = counts(backend)
            job_id = start_clone("src", "dst", consistency="stop",
                                 faults=[{"step": "provision", "kind": "hang", "seconds": 2}])
            wait_for(lambda: step_worker_pid(job_id, "provision"), timeout=60, what="provision running")
            db_driver.stop("statedb")
            db_stopped_at = datetime.now(UTC)
            wait_for(lambda: "OperationalError" in backend.worker_log(), timeout=60,
                     what="the worker to meet the missing database and retry")
            db_driver.restart("statedb", 30)
            job = wait_job(job_id, timeout=180)
            assert job.state == "succeeded", job.error
            assert all(s.state == "succeeded" for s in job.steps)
            jn = job.nodes[0]
            assert jn.bytes_copied == jn.bytes_total > 0 and jn.downtime_ms > 0
            after = counts(backend)
            assert after.running == before.running | {jn.clone_node_id}
            assert after.leases == before.leases + 1 and after.snapshots == frozenset()
            assert after.locks == before.locks == 0
            # The fault really overlapped the step: provision was recorded as ended only after the
            # database had gone away.
            provision_finished = _finished_at(job, "provision")
            assert provision_finished > db_stopped_at, (provision_finished, db_stopped_at)
            assert _clone_value("dst") == b"v"
    finally:
        destroy_everything(db_root)


# ---- the disk fills up ---------------------------------------------------------------------------------
@pytest.mark.parametrize("move", [False, True], ids=["copy", "move"])
def test_disk_full_during_provision_fails_cleanly(move: bool) -> None:
    """A provision that copies fails cleanly when the disk fills; one that moves the job's snapshot
    into place (the default for a snapshot the job does not keep) needs no room and succeeds."""
    import os
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs data root needs root")
    mnt = Path(tempfile.mkdtemp(prefix="envclone-full-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=755", "tmpfs", str(mnt)]).returncode:
        shutil.rmtree(mnt)
        pytest.skip("cannot mount tmpfs here")
    try:
        env = {"ENVCLONE_PROVISION_MOVE": "true" if move else "false"}
        with Backend(pool="127.105.0.0/16", data_dir=mnt, extra_env=env) as backend:
            src = create_environment("src", [{"name": "cache", "stack": "valkey"}])
            client = valkey_at(src.nodes[0].address)
            for i in range(3):
                client.set(f"blob{i}", os.urandom(1024 * 1024))
            before = counts(backend)
            job_id = start_clone("src", "dst", faults=[{"step": "restart", "kind": "hang", "seconds": 3}])
            wait_for(lambda: step_worker_pid(job_id, "restart"), timeout=60, what="snapshot taken")
            filler = mnt / "filler"
            with open(filler, "wb") as f:  # leave 512 KiB: the clone's volume cannot fit
                f.write(b"\0" * max(0, shutil.disk_usage(mnt).free - 512 * 1024))
            job = wait_job(job_id, timeout=120)
            filler.unlink()
            if move:
                assert job.state == "succeeded", job.error
                assert valkey_at(environment("dst").nodes[0].address).get("blob2") is not None
            else:
                assert job.state == "failed"
                assert "No space left on device" in job.error and "provision" in job.error
                assert counts(backend) == before  # no clone volume, no half-copied staging dir, no snapshot
            assert get_driver().health(src.nodes[0].id).healthy
            assert client.get("blob2") is not None
            delete_environment("dst")
            delete_environment("src")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)
