"""Many jobs at once, and a soak with injected failures: all succeed, no address collides, every
clone holds exactly its own snapshot's data, nothing leaks."""

from __future__ import annotations

import random
import threading

import httpx
import psycopg
import pytest
import redis

from shared.db import session_scope
from shared.drivers import get_driver
from shared.models import CloneJob
from shared.planning import plan_clone
from tests.fault_helpers import Counts, counts
from tests.stack import Backend, publisher
from tests.workflow_client import SHOP, TENANT, create_environment, delete_environment, environment, valkey_at, wait_job
from workers.workflow import dispatch_clone

pytestmark = [pytest.mark.integration, pytest.mark.long]

BACKEND = {"pool": "127.106.0.0/16", "concurrency": 4}


def submit_all(source: str, targets: list[str], options: list[dict]) -> list[str]:
    """Plan every job first, then dispatch them together: they all compete at once."""
    ids = []
    for target, opts in zip(targets, options, strict=True):
        with session_scope() as session:
            ids.append(plan_clone(session, TENANT, source, target, opts).id)
    for job_id in ids:
        dispatch_clone(publisher(), job_id)
    return ids


def wait_jobs(backend: Backend, ids: list[str], timeout: float) -> list[CloneJob]:
    """Wait for every job; on a timeout, say where each unfinished one stands."""
    try:
        return [wait_job(job_id, timeout=timeout) for job_id in ids]
    except AssertionError:
        from shared.models import NodeLock, StepRun

        with session_scope() as session:
            print("locks:", [(lk.node_id, lk.job_id) for lk in session.query(NodeLock)])
            for job_id in ids:
                job = session.get(CloneJob, job_id)
                if job.state not in ("succeeded", "failed", "cancelled"):
                    print("job", job_id, job.state, [(r.node_name, r.step, r.state, r.attempts, r.detail)
                                                     for r in session.query(StepRun).filter_by(job_id=job_id)])
        print(backend.worker_log()[-6000:])
        raise


def _scratch_copy(snapshot_id: str, stack_port: int, address: str) -> str:
    """Bring a snapshot up as a scratch node, to read what it holds."""
    driver = get_driver()
    node_id = "scratch" + snapshot_id[:12]
    driver.provision(snapshot_id, node_id)
    driver.assign_address(node_id, address, stack_port)
    driver.restart(node_id, 60)
    return node_id


def test_twenty_clones_of_one_source_at_once(backend: Backend) -> None:
    src = create_environment("shop", SHOP)
    web = next(f"http://{n.address}:{n.port}" for n in src.nodes if n.name == "web")
    cache = valkey_at(next(n.address for n in src.nodes if n.name == "cache"))
    stop = threading.Event()

    def writer() -> None:  # the source keeps changing while it is cloned (and is briefly down)
        i = 0
        while not stop.is_set():
            try:
                httpx.post(f"{web}/items", json={"name": f"w{i}"}, timeout=10)
                cache.incr("counter")
            except (httpx.HTTPError, redis.RedisError):
                stop.wait(0.05)  # the node is in its quiesce window
            i += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        ids = submit_all("shop", [f"stage-{i:02d}" for i in range(20)], [{"retain_snapshots": True}] * 20)
        jobs = wait_jobs(backend, ids, timeout=300)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert [j.state for j in jobs] == ["succeeded"] * 20, [j.error for j in jobs if j.error]

    addresses = [n.address for i in range(20) for n in environment(f"stage-{i:02d}").nodes]
    assert len(addresses) == 60 and len(set(addresses) | {n.address for n in src.nodes}) == 63

    # Online copies: twenty jobs at once and not one of them stopped a source node (Valkey's took
    # turns at the node lock, each for its few-ms pause's sake).
    assert all(jn.quiesced_at is None and jn.downtime_ms is None for j in jobs for jn in j.nodes)

    # Each clone holds exactly its own snapshot's data (a scratch copy of the snapshot agrees).
    for i, job in enumerate(jobs):
        clone = environment(f"stage-{i:02d}")
        addr = {n.name: n.address for n in clone.nodes}
        body = httpx.get(f"http://{addr['web']}:8080/", timeout=10).json()
        assert body["database"] == f"{addr['db']}:5432"
        snaps = {jn.name: jn.snapshot_id for jn in job.nodes}
        db_copy = _scratch_copy(snaps["db"], 5432, f"127.106.255.{2 * i + 1}")
        cache_copy = _scratch_copy(snaps["cache"], 6379, f"127.106.255.{2 * i + 2}")
        db_url = get_driver().url(db_copy)
        with psycopg.connect(db_url) as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == body["items"]
        with psycopg.connect(get_driver().url(next(n.id for n in clone.nodes if n.name == "db"))) as conn:
            assert conn.execute("SELECT host(inet_server_addr())").fetchone()[0] == addr["db"]
        assert redis.Redis.from_url(get_driver().url(cache_copy)).get("counter") == \
            valkey_at(addr["cache"]).get("counter")
        get_driver().destroy_node(db_copy)
        get_driver().destroy_node(cache_copy)

    for i in range(20):
        delete_environment(f"stage-{i:02d}")
    delete_environment("shop")
    after = counts(backend)
    assert (after.running, after.volumes, after.snapshots, after.leases, after.locks) == \
        (frozenset(), frozenset(), frozenset(), 0, 0)


def _sources_left_stopped(source: str) -> int:
    """Source nodes that do not answer their health check."""
    return sum(1 for n in environment(source).nodes if not get_driver().health(n.id).healthy)


def _leaks(before: Counts, after: Counts, processes_before: int, processes_after: int) -> dict[str, int]:
    """What changed between two counts, per kind (every figure is 0 when nothing leaked)."""
    return {
        "running": len(after.running ^ before.running),
        "volumes": len(after.volumes ^ before.volumes),
        "snapshots": len(after.snapshots ^ before.snapshots),
        "leases": abs(after.leases - before.leases),
        "locks": abs(after.locks - before.locks),
        "processes": abs(processes_after - processes_before),
    }


def test_soak_fifty_jobs_with_injected_transient_failures(backend: Backend) -> None:
    create_environment("src", [{"name": "cache", "stack": "valkey"}])
    before = counts(backend)
    processes_before = len(backend.processes())
    rng = random.Random(20261127)
    steps = ["quiesce", "snapshot", "restart", "provision", "assign_ips"]
    plans = [[{"step": s, "node": "cache", "times": 1, "kind": "transient"} for s in steps if rng.random() < 0.2]
             for _ in range(50)]
    injected = sum(len(p) for p in plans)
    # Half the jobs in stop mode, so held windows meet faults and take turns at the node under load.
    modes = ["stop" if i % 2 else "online" for i in range(50)]
    ids = submit_all("src", [f"soak-{i:02d}" for i in range(50)],
                     [{"faults": p, "consistency": m} for p, m in zip(plans, modes, strict=True)])
    jobs = wait_jobs(backend, ids, timeout=300)
    windows = sorted((jn.quiesced_at, jn.restarted_at) for j in jobs for jn in j.nodes if jn.quiesced_at)
    assert len(windows) == 25  # every stop-mode job held the source once; no online one did
    assert all(a[1] <= b[0] for a, b in zip(windows, windows[1:], strict=False))  # one window at a time
    lost = sum(1 for j in jobs if j.state not in ("succeeded", "failed", "cancelled"))
    retried = sum(s.attempts - 1 for j in jobs for s in j.steps)
    assert [j.state for j in jobs] == ["succeeded"] * 50, [j.error for j in jobs if j.error]
    assert retried == injected  # every injected failure was met once and retried once
    sources_left_stopped = _sources_left_stopped("src")
    assert sources_left_stopped == 0
    assert get_driver().health(environment("src").nodes[0].id).healthy
    for i in range(50):
        delete_environment(f"soak-{i:02d}")
    after = counts(backend)
    leaks = _leaks(before, after, processes_before, len(backend.processes()))
    print(f"\nsoak: jobs={len(jobs)} faults_injected={injected} retries={retried} jobs_lost={lost} "
          f"sources_left_stopped={sources_left_stopped} leaks={sum(leaks.values())}")
    assert sum(leaks.values()) == 0, leaks
    assert after == before
    with session_scope() as session:
        assert session.query(CloneJob).filter(CloneJob.state != "succeeded").count() == 0
    delete_environment("src")
