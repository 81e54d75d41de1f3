"""Placement of nodes on hosts and addresses from each host's pool, on an embedded SQLite state
database (no services): spread, pins, draining and down hosts, clones kept local or moved."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest
from sqlalchemy import select

from shared.db import session_scope
from shared.errors import PlanError, Problem
from shared.models import Host, Node
from shared.planning import NodeRequest, check_clone, plan_clone, plan_environment
from shared.states import EnvState, HostState
from tests.unit.test_planning import state_db  # noqa: F401 - the fixture

POOLS = {"host-1": "127.251.1.0/28", "host-2": "127.251.2.0/28", "host-3": "127.251.3.0/28"}


@pytest.fixture
def hosts(state_db: None) -> None:  # noqa: F811
    with session_scope() as session:
        for i, (name, pool) in enumerate(POOLS.items()):
            session.add(Host(name=name, state=HostState.UP, free_bytes=(10 + i) * 2**30, reflink=False,
                             address_pool=pool))


def _in(address: str, host: str) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network(POOLS[host])


def _running(name: str, nodes: list[NodeRequest], sizes: int = 0) -> dict[str, tuple[str, str]]:
    with session_scope() as session:
        env = plan_environment(session, "t", name, nodes)
        env.state = EnvState.RUNNING
        for node in env.nodes:
            node.size_bytes = sizes
        return {n.name: (n.host, n.address) for n in env.nodes}


def test_new_nodes_spread_over_up_hosts_most_free_disk_first(hosts: None) -> None:
    placed = _running("six", [NodeRequest(f"n{i}", "valkey") for i in range(6)])
    assert Counter(h for h, _ in placed.values()) == {"host-1": 2, "host-2": 2, "host-3": 2}
    assert placed["n0"][0] == "host-3"  # the most free disk first
    assert all(_in(address, host) for host, address in placed.values())


def test_a_pin_wins_and_draining_or_down_hosts_get_nothing(hosts: None) -> None:
    with session_scope() as session:
        session.get(Host, "host-3").state = HostState.DRAINING
        session.get(Host, "host-2").state = HostState.DOWN
    placed = _running("pinned", [NodeRequest("a", "valkey"), NodeRequest("b", "valkey")])
    assert {h for h, _ in placed.values()} == {"host-1"}
    for pin, code, problem in (("host-3", "host_unavailable", Problem.CONFLICT),
                               ("host-9", "unknown_host", Problem.INVALID)):
        with pytest.raises(PlanError) as err, session_scope() as session:
            plan_environment(session, "t", f"x-{pin}", [NodeRequest("a", "valkey", host=pin)])
        assert (err.value.conflict.code, err.value.conflict.field, err.value.problem) == (code, "nodes[0].host",
                                                                                            problem)


def test_a_clone_stays_on_its_sources_hosts_unless_moved(hosts: None) -> None:
    src = _running("src", [NodeRequest("db", "postgres", host="host-1"), NodeRequest("kv", "valkey", host="host-2")])
    with session_scope() as session:
        plan = check_clone(session, "t", "src", "copy")
        assert plan.hosts == {"db": "host-1", "kv": "host-2"} and not plan.conflicts
        assert all(_in(plan.addresses[n], h) for n, h in plan.hosts.items())
        moved = check_clone(session, "t", "src", "copy", target_host="host-3", pins={"kv": "host-1"})
        assert moved.hosts == {"db": "host-3", "kv": "host-1"}
        assert _in(moved.addresses["db"], "host-3") and _in(moved.addresses["kv"], "host-1")
    with session_scope() as session:
        job = plan_clone(session, "t", "src", "copy", {"target_host": "host-3"})
        clones = {n.name: (n.host, n.address) for n in
                  session.scalars(select(Node).where(Node.environment_id == job.target_environment_id))}
    assert set(clones) == set(src) and all(h == "host-3" and _in(a, "host-3") for h, a in clones.values())
    for bad, code in (({"target_host": "host-9"}, "unknown_host"), ({"placement": {"zz": "host-1"}}, "unknown_node")):
        with pytest.raises(PlanError) as err, session_scope() as session:
            plan_clone(session, "t", "src", "bad", bad)
        assert err.value.conflict.code == code and err.value.problem == Problem.INVALID


def test_a_source_host_without_room_sends_the_clone_elsewhere(hosts: None) -> None:
    _running("big", [NodeRequest("db", "postgres", host="host-1")], sizes=6 * 2**30)  # a copy needs 12 GiB
    with session_scope() as session:
        plan = check_clone(session, "t", "big", "copy")
    assert plan.hosts == {"db": "host-3"} and not plan.conflicts  # 10 GiB on host-1; the most free: host-3
