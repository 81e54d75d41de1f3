"""Provision by move: a snapshot on the clone's host that the job keeps for nothing becomes the
clone's volume by a rename (its bytes are not written twice on the source's disk); a retained one
is copied and stays. Idempotent: a provision killed after the move (before or after its record),
re-run, takes up what it moved."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from shared.drivers import NodeSpec, get_driver
from shared.drivers.local import LocalDriver
from shared.snapshots import tree_size
from shared.stacks.postgres import PostgresStack
from shared.states import NodeState
from tests.fault_helpers import counts, kill9, step_worker_pid
from tests.helpers import wait_for
from tests.stack import Backend
from tests.workflow_client import create_environment, delete_environment, environment, start_clone, wait_job

pytestmark = pytest.mark.integration

BACKEND = {"pool": "127.117.0.0/16"}
ROWS = 20000


def _fill(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, %s) g", (ROWS,))


def _rows(url: str) -> tuple[int, str]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM t").fetchone()


def _snapshot_volume(snapshot_id: str) -> Path:
    return get_driver().snaps_dir / snapshot_id / "volume"  # type: ignore[attr-defined]


def _provision_step(job):  # noqa: ANN001, ANN202
    return next(s for s in job.steps if s.step == "provision")


def test_killed_after_the_move_the_rerun_takes_up_the_moved_volume(backend: Backend) -> None:
    src = create_environment("mv", [{"name": "db", "stack": "postgres"}])
    url = get_driver().url(src.nodes[0].id)
    _fill(url)
    expected = _rows(url)
    before = counts(backend)
    job_id = start_clone("mv", "mv-copy", faults=[{"step": "provision", "kind": "hang", "seconds": 60}])

    def moved() -> int | None:
        with_job = wait_job_nodes(job_id)
        if with_job is None:
            return None
        snapshot_id, clone_id = with_job
        done = clone_id in get_driver().node_ids() and not _snapshot_volume(snapshot_id).exists()
        return step_worker_pid(job_id, "provision") if done else None

    pid = wait_for(moved, timeout=120, what="provision to have moved the snapshot")
    # As if killed between the move and its record: the clone's row still says pending.
    _set_clone_state(job_id, NodeState.PENDING)
    kill9(pid)
    job = wait_job(job_id, timeout=180)
    assert job.state == "succeeded", job.error
    step = _provision_step(job)
    assert step.attempts == 2 and step.detail["moved"] is True  # re-run, and the volume was the snapshot
    copy = environment("mv-copy").nodes[0]
    assert _rows(get_driver().url(copy.id)) == expected
    after = counts(backend)
    assert after.snapshots == before.snapshots == frozenset()  # nothing left of the moved snapshot
    assert after.volumes == before.volumes | {copy.id}
    delete_environment("mv-copy")
    delete_environment("mv")


def _set_clone_state(job_id: str, state: NodeState) -> None:
    from shared.db import session_scope
    from shared.models import JobNode, Node

    with session_scope() as session:
        jn = session.query(JobNode).filter_by(job_id=job_id).one()
        session.get(Node, jn.clone_node_id).state = state


def wait_job_nodes(job_id: str) -> tuple[str, str] | None:
    from shared.db import session_scope
    from shared.models import JobNode

    with session_scope() as session:
        jn = session.query(JobNode).filter_by(job_id=job_id).one_or_none()
        return (jn.snapshot_id, jn.clone_node_id) if jn is not None and jn.snapshot_id else None


def test_a_retained_snapshot_is_copied_not_moved(backend: Backend) -> None:
    src = create_environment("keep", [{"name": "db", "stack": "postgres"}])
    url = get_driver().url(src.nodes[0].id)
    _fill(url)
    expected = _rows(url)
    job = wait_job(start_clone("keep", "keep-copy", retain_snapshots=True), timeout=180)
    assert job.state == "succeeded", job.error
    assert _provision_step(job).detail["moved"] is False
    snapshot = _snapshot_volume(job.nodes[0].snapshot_id)
    copy = environment("keep-copy").nodes[0]
    assert _rows(get_driver().url(copy.id)) == expected
    # The snapshot is still whole, beside the clone's own copy (not the same files).
    volume = get_driver().volume(copy.id)
    assert (snapshot / "node.json").exists() and tree_size(snapshot / "data") > 0
    table = next((snapshot / "data" / "base").rglob("*"))
    assert not any(p.stat().st_ino == table.stat().st_ino for p in (volume / "data" / "base").rglob("*"))
    delete_environment("keep-copy")
    delete_environment("keep")
    get_driver().delete_snapshot(job.nodes[0].snapshot_id)


def test_driver_move_rerun_after_a_crash_mid_move_and_after_the_end(data_root: Path) -> None:
    """A crash between the rename into staging and the rename into place: the re-run finishes from
    staging; a re-run after the end changes nothing."""
    driver = LocalDriver(data_root)
    driver.create_node(NodeSpec("src", "postgres", "127.117.254.1", 5432))
    _fill(driver.url("src"))
    expected = _rows(driver.url("src"))
    info = driver.snapshot_online("src", "snap")
    staging = driver.nodes_dir / ".copy.provisioning"
    (driver.snaps_dir / "snap" / "volume").rename(staging)  # what the killed run had done
    assert driver.provision("snap", "copy", consume=True) == info.size_bytes
    assert not (driver.snaps_dir / "snap").exists() and not staging.exists()
    assert driver.provision("snap", "copy", consume=True) == info.size_bytes  # done: left as it is
    driver.set_credentials("copy", PostgresStack().new_credentials(driver._node("src")[1].secrets()))
    driver.assign_address("copy", "127.117.254.2", 5432)
    driver.restart("copy", 60)
    assert _rows(driver.url("copy")) == expected
