"""The clone workflow end to end: real Redis broker, real PostgreSQL state, a real prefork worker,
real node processes."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from shared.db import session_scope
from shared.drivers import get_driver
from shared.models import StepRun
from tests.stack import Backend, publisher
from tests.workflow_client import (
    SHOP,
    clone,
    create_environment,
    delete_environment,
    environment,
    lease_count,
    start_clone,
    valkey,
    wait_job,
)

pytestmark = pytest.mark.integration

BACKEND = {}


@pytest.fixture
def clean(backend: Backend) -> Iterator[Backend]:
    """Each test starts and must end with nothing: no node process, volume, snapshot or lease."""
    yield backend
    with session_scope() as session:
        from shared.models import Environment

        names = [e.name for e in session.query(Environment).all()]
    for name in names:
        delete_environment(name)
    assert backend.processes() == []
    assert backend.volumes() == set()
    assert backend.snapshots() == set()
    assert lease_count() == 0


def web_url(env, name: str = "web") -> str:
    node = next(n for n in env.nodes if n.name == name)
    return f"http://{node.address}:{node.port}"


def addr(env, name: str) -> str:
    return next(n.address for n in env.nodes if n.name == name)


def check_three_node_clone(backend: Backend) -> None:
    src = create_environment("shop", SHOP)
    for item in ("a", "b", "c"):
        assert httpx.post(web_url(src) + "/items", json={"name": item}).status_code == 201
    assert httpx.put(web_url(src) + "/cache", json={"value": "v1"}).status_code == 200

    job = clone("shop", "shop-stage")
    assert job.state == "succeeded", job.error
    assert job.percent == 100
    dst = environment("shop-stage")
    assert dst.state == "running"
    src_addrs = {n.address for n in src.nodes}
    dst_addrs = {n.address for n in dst.nodes}
    assert len(dst_addrs) == 3 and not (src_addrs & dst_addrs)

    body = httpx.get(web_url(dst) + "/").json()
    assert body["database"] == f"{addr(dst, 'db')}:5432"
    assert body["items"] == 3
    assert body["cache"] == {"address": f"{addr(dst, 'cache')}:6379", "value": "v1"}

    # The source lives on, independent of the clone.
    assert httpx.post(web_url(src) + "/items", json={"name": "after"}).status_code == 201
    assert httpx.get(web_url(src) + "/").json()["items"] == 4
    assert httpx.get(web_url(dst) + "/").json()["items"] == 3
    assert httpx.get(web_url(src) + "/").json()["database"] == f"{addr(src, 'db')}:5432"

    rewrites = {(r["node"], r["file"], r["old"], r["new"]) for r in job.rewrites if r["kind"] == "address"}
    assert rewrites == {
        ("web", "config/.env", addr(src, "db"), addr(dst, "db")),
        ("web", "config/.env", addr(src, "cache"), addr(dst, "cache")),
    }
    # The clone's credentials are new; the job says so without showing a value.
    credential_rewrites = [r for r in job.rewrites if r["kind"] == "credential"]
    assert credential_rewrites and all(r["old"] == r["new"] == "[redacted]" for r in credential_rewrites)
    secrets = {v for n in src.nodes + dst.nodes for k, v in n.credentials.items() if k.endswith("password")}
    assert not any(s in repr(job.rewrites) for s in secrets)
    for jn in job.nodes:  # online by default: no source was stopped or held
        assert jn.quiesced_at is None and jn.downtime_ms is None
    assert all(s.state == "succeeded" and s.attempts == 1 for s in job.steps)
    driver = get_driver()
    assert all(driver.health(n.id).healthy for n in src.nodes + dst.nodes)
    assert backend.snapshots() == set()  # deleted on success


def test_clone_three_node_environment(clean: Backend) -> None:
    check_three_node_clone(clean)


def test_one_node_environment(clean: Backend) -> None:
    src = create_environment("solo", [{"name": "cache", "stack": "valkey"}])
    valkey(src).set("k", "v")
    job = clone("solo", "solo-copy")
    assert job.state == "succeeded", job.error
    dst = environment("solo-copy")
    assert valkey(dst).get("k") == b"v"


def test_twelve_nodes_run_in_parallel(clean: Backend) -> None:
    create_environment("wide", [{"name": f"n{i:02d}", "stack": "valkey"} for i in range(12)])
    job = clone("wide", "wide-copy")
    assert job.state == "succeeded", job.error
    spans = {}
    for s in job.steps:
        lo, hi = spans.get(s.node_name, (s.started_at, s.finished_at))
        spans[s.node_name] = (min(lo, s.started_at), max(hi, s.finished_at))
    assert len(spans) == 12
    # Nodes' chains overlap in time: some node started before another had finished.
    ordered = sorted(spans.values())
    overlaps = sum(1 for a, b in zip(ordered, ordered[1:], strict=False) if b[0] < a[1])
    assert overlaps >= 6, spans
    # Two worker processes: at some instant two steps of different nodes were running at once.
    events = sorted([(s.started_at, 1) for s in job.steps] + [(s.finished_at, -1) for s in job.steps])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak >= 2


@pytest.mark.parametrize("step", ["quiesce", "snapshot", "restart", "provision", "assign_ips"])
def test_transient_failure_in_each_step_is_retried(clean: Backend, step: str) -> None:
    create_environment("src", [{"name": "cache", "stack": "valkey"}])
    job = clone("src", "dst", faults=[{"step": step, "node": "cache", "times": 2, "kind": "transient"}])
    assert job.state == "succeeded", job.error
    attempts = {s.step: s.attempts for s in job.steps}
    assert attempts[step] == 3
    assert all(n == 1 for s, n in attempts.items() if s != step), attempts
    assert get_driver().health(environment("src").nodes[0].id).healthy


def test_permanent_snapshot_failure_restarts_source_and_leaves_nothing(clean: Backend) -> None:
    src = create_environment("shop", SHOP)
    before_volumes, before_leases = clean.volumes(), lease_count()
    job = clone("shop", "shop-stage", consistency="stop",
                faults=[{"step": "snapshot", "node": "db", "kind": "permanent"}])
    assert job.state == "failed"
    assert "db: snapshot: PermanentDriverError: injected permanent fault" in job.error
    states = {(s.node_name, s.step): s.state for s in job.steps}
    assert states[("db", "snapshot")] == "failed"
    assert states[("db", "restart")] == "succeeded"
    assert states[("db", "provision")] == "skipped" and states[("db", "assign_ips")] == "skipped"
    driver = get_driver()
    assert all(driver.health(n.id).healthy for n in src.nodes)
    assert next(jn for jn in job.nodes if jn.name == "db").downtime_ms > 0
    # Nothing of the clone is left: no process, volume, snapshot, lease.
    assert clean.volumes() == before_volumes
    assert clean.snapshots() == set()
    assert lease_count() == before_leases
    assert driver.running_node_ids() == {n.id for n in src.nodes}
    clone_addrs = {n.address for n in environment("shop-stage").nodes}
    assert not [cmd for _, cmd in clean.processes() if any(a in cmd for a in clone_addrs)]
    assert environment("shop-stage").state == "failed"
    # The source still serves its data.
    assert httpx.get(web_url(src) + "/").json()["database"] == f"{addr(src, 'db')}:5432"


def test_keep_on_failure_keeps_the_partial_clone(clean: Backend) -> None:
    create_environment("src", [{"name": "cache", "stack": "valkey"}])
    job = clone("src", "dst", keep_on_failure=True,
                faults=[{"step": "assign_ips", "node": "cache", "kind": "permanent"}])
    assert job.state == "failed"
    clone_id = job.nodes[0].clone_node_id
    assert clone_id in clean.volumes()


def test_steps_run_twice_do_no_harm(clean: Backend) -> None:
    src = create_environment("src", [{"name": "cache", "stack": "valkey"}])
    valkey(src).set("k", "v")
    job = clone("src", "dst", retain_snapshots=True)
    assert job.state == "succeeded", job.error
    dst = environment("dst")
    volumes, processes = clean.volumes(), clean.processes()
    # As if the worker died after doing provision and assign_ips but before recording it:
    # the redelivered tasks run their bodies again.
    for step in ("provision", "assign_ips"):
        with session_scope() as session:
            row = session.query(StepRun).filter_by(job_id=job.id, step=step).one()
            row.state = "running"
        publisher().signature(f"envclone.{step}", args=(job.id, src.nodes[0].id)).apply_async()
        wait_job(job.id)  # job row stays done

        def finished(step: str = step) -> bool:
            with session_scope() as session:
                return session.query(StepRun).filter_by(job_id=job.id, step=step).one().state == "succeeded"

        from tests.helpers import wait_for

        wait_for(finished, timeout=60, what=f"{step} re-run")
    assert clean.volumes() == volumes
    assert sorted(p for p, _ in clean.processes()) == sorted(p for p, _ in processes)
    assert valkey(dst).get("k") == b"v"
    with session_scope() as session:
        attempts = {r.step: r.attempts for r in session.query(StepRun).filter_by(job_id=job.id)}
    assert attempts["provision"] == 2 and attempts["assign_ips"] == 2
    assert clean.snapshots() == {job.nodes[0].snapshot_id}  # retained; deleted with the clone


def test_two_clones_of_one_source_take_turns_at_the_node(clean: Backend) -> None:
    from shared.errors import PlanError

    create_environment("src", [{"name": "cache", "stack": "valkey"}])
    # Stop mode: each job holds the node for its copy.
    first, second = start_clone("src", "dst1", consistency="stop"), start_clone("src", "dst2", consistency="stop")
    with pytest.raises(PlanError) as err:
        start_clone("src", "dst1")
    assert err.value.conflict.code == "name_taken"
    a, b = wait_job(first), wait_job(second)
    assert a.state == b.state == "succeeded", (a.error, b.error)
    wa, wb = (a.nodes[0].quiesced_at, a.nodes[0].restarted_at), (b.nodes[0].quiesced_at, b.nodes[0].restarted_at)
    assert wa[1] <= wb[0] or wb[1] <= wa[0], f"the source was stopped by both jobs at once: {wa} {wb}"
