"""Many hosts: each host's agent alone acts on its nodes, clones move between hosts agent to agent,
and a host that goes down fails its jobs cleanly. Hosts are network and PID namespaces of their own
when the tests run as root (tests/cluster.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import select

from shared.db import session_scope
from shared.models import JobNode, Node, StepRun
from shared.stacks import CATALOG
from shared.states import JobState, Step
from tests.cluster import HOST_DOWN_S, Cluster
from tests.helpers import wait_for
from tests.workflow_client import clone, create_environment, delete_environment, environment, start_clone, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.long]

SOURCE_STEPS = {Step.QUIESCE, Step.SNAPSHOT, Step.RESTART}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # A capped link (48 MiB/s per stream) so a kill lands mid-transfer; the job stall rule resumes a
    # job whose agent was killed (its task is not redelivered before the visibility timeout).
    with Cluster(count=3, general_workers=2, extra_env={"ENVCLONE_JOB_STALL_S": "20",
                                                        "ENVCLONE_TRANSFER_MAX_RATE": str(48 * 2**20)}) as c:
        yield c


def _url(node: Node) -> str:
    return CATALOG[node.stack].url(node.address, node.port, node.credentials, secret=True)


def _node(env_name: str, name: str) -> Node:
    env = environment(env_name)
    assert env is not None
    return next(n for n in env.nodes if n.name == name)


def _steps_on_their_hosts(job_id: str) -> list[str]:
    """Every step that ran on a host other than its node's: the source's for quiesce, snapshot and
    restart; the clone's for provision and assign_ips."""
    wrong = []
    with session_scope() as session:
        for jn in session.scalars(select(JobNode).where(JobNode.job_id == job_id)):
            src, copy = session.get(Node, jn.source_node_id), session.get(Node, jn.clone_node_id)
            for step in session.scalars(select(StepRun).where(StepRun.job_id == job_id,
                                                              StepRun.source_node_id == jn.source_node_id)):
                want = src.host if step.step in SOURCE_STEPS else copy.host
                if step.host != want:
                    wrong.append(f"{jn.name}/{step.step} ran on {step.host}, belongs on {want}")
    return wrong


def _connects(host: object, env_id: str, address: str, port: int) -> bool:
    """Whether a process of the environment's account, on ``host``'s network, can open a TCP
    connection to address:port (the kernel fence decides)."""
    import pwd

    from shared.identity import account_name

    account = pwd.getpwnam(account_name(env_id))
    probe = (f"import socket\ntry:\n    socket.create_connection(({address!r}, {port}), 3).close()\n"
             "    print('open')\nexcept OSError as e:\n    print('refused', e)")
    done = subprocess.run(["nsenter", f"--net=/run/netns/{host.net.netns}", "setpriv",  # type: ignore[attr-defined]
                           f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups",
                           "/usr/bin/python3", "-c", probe], capture_output=True, text=True, timeout=30)
    return done.stdout.startswith("open")


def _in_pool(address: str, pool: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(address) in ipaddress.ip_network(pool)


SPREAD = [
    {"name": "db", "stack": "postgres", "host": "host-1"},
    {"name": "cache", "stack": "valkey", "host": "host-2"},
    {"name": "web", "stack": "webapp", "host": "host-3",
     "config": {"DATABASE_URL": "{{db.url}}", "CACHE_URL": "{{cache.url}}"}},
]


def test_clone_onto_one_host_moves_data_agent_to_agent(cluster: Cluster) -> None:
    create_environment("spread", SPREAD, timeout=180)
    db, cache = _node("spread", "db"), _node("spread", "cache")
    assert {n.name: n.host for n in environment("spread").nodes} == {"db": "host-1", "cache": "host-2",
                                                                       "web": "host-3"}
    with psycopg.connect(_url(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 5000) g")
    redis.Redis.from_url(_url(cache)).set("greeting", "hello from host-2")

    from api.planner import dry_run_plan

    with session_scope() as session:
        plan = dry_run_plan(session, "acme", "spread", "spread-h3", target_host="host-3")
    assert plan["ok"], plan["conflicts"]
    assert {n["name"]: (n["source_host"], n["host"]) for n in plan["nodes"]} == {
        "db": ("host-1", "host-3"), "cache": ("host-2", "host-3"), "web": ("host-3", "host-3")}
    assert [n["bytes_across_hosts"] > 0 for n in plan["nodes"]] == [True, True, False]  # cache, db, web

    job = clone("spread", "spread-h3", timeout=240, target_host="host-3")
    assert job.state == JobState.SUCCEEDED, (job.error, cluster.log()[-3000:])
    assert _steps_on_their_hosts(job.id) == []
    copy = environment("spread-h3")
    pool3 = cluster.host("host-3").pool
    assert all(n.host == "host-3" and _in_pool(n.address, pool3) for n in copy.nodes), \
        [(n.name, n.host, n.address) for n in copy.nodes]
    copy_db, copy_cache, copy_web = (_node("spread-h3", n) for n in ("db", "cache", "web"))
    with psycopg.connect(_url(copy_db)) as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM items").fetchone() == (5000, 5000 * 5001 // 2)
    assert redis.Redis.from_url(_url(copy_cache)).get("greeting") == b"hello from host-2"
    # The provision steps that crossed hosts say so, with the bytes that arrived.
    with session_scope() as session:
        moved = {s.node_name: s.detail.get("transfer") for s in session.scalars(
            select(StepRun).where(StepRun.job_id == job.id, StepRun.step == Step.PROVISION))}
    assert moved["db"]["from"] == "host-1" and moved["db"]["bytes_received"] > 0
    assert moved["cache"]["from"] == "host-2" and moved["web"] is None
    # The clone's web (host-3) reaches the clone's db (host-3), not the source's db on host-1.
    import httpx

    status = httpx.get(f"http://{copy_web.address}:{copy_web.port}/", timeout=10).json()
    assert status["database"] == f"{copy_db.address}:{copy_db.port}" and status["items"] == 5000, status
    assert status["cache"]["address"].startswith(copy_cache.address), status
    if cluster.isolated:  # the fence holds on every host: its kernel, its rules
        clone_env = environment("spread-h3")
        assert clone_env.fence == "enforced"
        host3 = cluster.host("host-3")
        assert _connects(host3, clone_env.id, copy_db.address, copy_db.port)  # its own db, same host
        assert not _connects(host3, clone_env.id, db.address, db.port)  # the source's db, on host-1
        src_env = environment("spread")
        assert _connects(host3, src_env.id, db.address, db.port)  # the source's web does reach it
    # Snapshots are gone everywhere once the job succeeded (the source hosts' by their sweep).
    wait_for(lambda: all(not cluster.snapshots(h) for h in cluster.hosts), timeout=30, what="snapshots removed")
    delete_environment("spread-h3", timeout=120)


def test_default_placement_keeps_each_clone_on_its_sources_host(cluster: Cluster) -> None:
    if environment("spread") is None:
        create_environment("spread", SPREAD, timeout=180)
    job = clone("spread", "spread-local", timeout=240)
    assert job.state == JobState.SUCCEEDED, job.error
    assert _steps_on_their_hosts(job.id) == []
    copy = {n.name: n for n in environment("spread-local").nodes}
    assert {k: n.host for k, n in copy.items()} == {"db": "host-1", "cache": "host-2", "web": "host-3"}
    with session_scope() as session:
        transfers = [s.detail.get("transfer") for s in session.scalars(
            select(StepRun).where(StepRun.job_id == job.id, StepRun.step == Step.PROVISION))]
    assert transfers == [None, None, None]  # copied locally: nothing crossed hosts
    for name, node in copy.items():
        assert node.id in cluster.volumes(cluster.host(node.host)), name
    # The clone's web on host-3 talks to the clone's db on host-1 (its rewritten address), across hosts.
    import httpx

    status = httpx.get(f"http://{copy['web'].address}:{copy['web'].port}/", timeout=10).json()
    assert status["database"] == f"{copy['db'].address}:{copy['db'].port}", status
    delete_environment("spread-local", timeout=120)
    wait_for(lambda: all(copy[n].id not in cluster.volumes(cluster.host(copy[n].host)) for n in copy),
             timeout=60, what="the clone's volumes removed on their hosts")


def _plant_blobs(node: Node, host_dir: Path, count: int, mib: int) -> int:
    """Files in a webapp node's volume, random bytes: a snapshot of many files to move."""
    blobs = host_dir / "nodes" / node.id / "data" / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (blobs / f"blob-{i:02d}.bin").write_bytes(os.urandom(mib * 2**20))
    stat = (host_dir / "nodes" / node.id).stat()
    subprocess.run(["chown", "-R", f"{stat.st_uid}:{stat.st_gid}", str(blobs)], check=True)
    return count * mib * 2**20


def _journal(host_dir: Path) -> set[str]:
    """Files (paths in the volume) received and verified so far by pulls in progress on this host."""
    from shared.transfer.client import read_journal

    return {path for p in (host_dir / "snapshots").glob(".*.incoming") for path in read_journal(p)[1]}


def test_killed_target_agent_resumes_the_transfer(cluster: Cluster) -> None:
    create_environment("files", [{"name": "web", "stack": "webapp", "host": "host-1"}], timeout=120)
    web = _node("files", "web")
    total = _plant_blobs(web, cluster.host("host-1").data_dir, count=8, mib=16)
    target = cluster.host("host-2")
    job_id = start_clone("files", "files-h2", target_host="host-2")
    wait_for(lambda: sum(p.startswith("data/blobs/") for p in _journal(target.data_dir)) >= 2, timeout=120,
             what="two blobs verified on host-2")
    cluster.kill_agent(target)
    verified = _journal(target.data_dir)
    source_volume = cluster.host("host-1").data_dir / "nodes" / web.id
    verified_bytes = sum((source_volume / p).stat().st_size for p in verified)
    assert verified_bytes < total, "the transfer ended before the kill: nothing to resume"
    cluster.start_agent(target)
    job = wait_job(job_id, timeout=240)
    assert job.state == JobState.SUCCEEDED, (job.error, cluster.log()[-3000:])
    with session_scope() as session:
        step = session.scalar(select(StepRun).where(StepRun.job_id == job_id, StepRun.step == Step.PROVISION))
        moved = step.detail["transfer"]
    # The pull after the kill skipped what was verified before it, and sent no more than the rest plus
    # the file in flight at the kill (and the snapshot's small files).
    assert moved["files_skipped"] >= len(verified) >= 2
    assert moved["bytes_received"] <= moved["bytes_total"] - verified_bytes + 16 * 2**20 + 2**20
    copy = _node("files-h2", "web")
    blobs = target.data_dir / "nodes" / copy.id / "data" / "blobs"
    source_blobs = cluster.host("host-1").data_dir / "nodes" / web.id / "data" / "blobs"
    assert sorted(p.name for p in blobs.iterdir()) == sorted(p.name for p in source_blobs.iterdir())
    assert all((blobs / p.name).read_bytes() == p.read_bytes() for p in source_blobs.iterdir())
    delete_environment("files-h2", timeout=120)
    delete_environment("files", timeout=120)
    # The row goes first; host-2's agent sweeps the volume after it (the next test counts volumes).
    wait_for(lambda: copy.id not in cluster.volumes(target), timeout=60, what="the clone's volume swept on host-2")


def test_a_host_gone_for_good_fails_the_job_cleanly(cluster: Cluster) -> None:
    if environment("spread") is None:
        create_environment("spread", SPREAD, timeout=180)
    host1, host2, host3 = (cluster.host(f"host-{i}") for i in (1, 2, 3))
    before = {h.name: cluster.volumes(h) for h in cluster.hosts}
    # cache's provision (on host-2) does its work, then stalls: host-2's agent dies there.
    job_id = start_clone("spread", "spread-lost", faults=[{"step": "provision", "node": "cache", "kind": "hang",
                                                          "seconds": 120}])

    def cache_provisioned() -> bool:
        with session_scope() as session:
            clone_id = session.scalar(select(JobNode.clone_node_id).where(JobNode.job_id == job_id,
                                                                          JobNode.name == "cache"))
        return clone_id in cluster.volumes(host2)

    wait_for(cache_provisioned, timeout=120, what="the cache clone's volume on host-2")
    cluster.kill_agent(host2)
    job = wait_job(job_id, timeout=HOST_DOWN_S + 30)
    assert job.state == JobState.FAILED and "host-2 is down" in (job.error or ""), job.error
    # Nothing of the clone is left on the hosts that are up.
    def left() -> dict[str, object]:
        return {h.name: (cluster.volumes(h) - before[h.name], cluster.snapshots(h)) for h in (host1, host3)}

    try:
        wait_for(lambda: not any(v or sn for v, sn in left().values()), timeout=30,
                 what="the partial clone removed from host-1 and host-3")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; left: {left()}") from None
    # host-2's leftovers wait for its agent. Compared by the clone's own node ids, not with the
    # "before" reading: an earlier test's deletion may still be sweeping host-2 when it is taken.
    with session_scope() as session:
        clone_ids = set(session.scalars(select(JobNode.clone_node_id).where(JobNode.job_id == job_id)))
    assert cluster.volumes(host2) & clone_ids
    cluster.start_agent(host2)
    wait_for(lambda: not cluster.volumes(host2) & clone_ids and not cluster.snapshots(host2),
             timeout=60, what="host-2's leftovers reconciled when its agent came back")
    assert cluster.all_up()
    # The sources all still serve.
    assert redis.Redis.from_url(_url(_node("spread", "cache"))).ping()


def test_ten_concurrent_clones_across_three_hosts(cluster: Cluster) -> None:
    create_environment("tiny", [{"name": f"kv{i}", "stack": "valkey", "host": f"host-{i}"} for i in (1, 2, 3)],
                       timeout=120)
    for i in (1, 2, 3):
        redis.Redis.from_url(_url(_node("tiny", f"kv{i}"))).set("k", f"v{i}")
    jobs = [start_clone("tiny", f"tiny-{n:02d}", **({"target_host": f"host-{n % 3 + 1}"} if n % 2 else {}))
            for n in range(10)]
    done = [wait_job(j, timeout=300) for j in jobs]
    assert [j.state for j in done] == [JobState.SUCCEEDED] * 10, [j.error for j in done if j.error]
    for job in done:
        assert _steps_on_their_hosts(job.id) == []
    for n in range(10):
        for i in (1, 2, 3):
            assert redis.Redis.from_url(_url(_node(f"tiny-{n:02d}", f"kv{i}"))).get("k") == f"v{i}".encode()
    for n in range(10):
        delete_environment(f"tiny-{n:02d}", timeout=120)
