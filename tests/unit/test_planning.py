"""Planning requests into rows, on an embedded SQLite state database (no services)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from shared.config import get_settings
from shared.db import session_scope
from shared.errors import PlanError, Problem
from shared.models import AddressLease, Host, StepRun
from shared.planning import NodeRequest, check_clone, plan_clone, plan_environment
from shared.states import CLONE_STEPS, EnvState
from tests.stack import reset_caches


@pytest.fixture
def state_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from shared.migrate import upgrade

    monkeypatch.setenv("ENVCLONE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ENVCLONE_DATABASE_URL", f"sqlite:///{tmp_path / 'state.db'}")
    monkeypatch.setenv("ENVCLONE_ADDRESS_POOL", "127.250.0.0/29")  # 6 addresses
    reset_caches()
    upgrade()
    yield
    reset_caches()


SHOP = [NodeRequest("db", "postgres"), NodeRequest("web", "webapp", {"DATABASE_URL": "{{db.url}}"})]


@pytest.mark.parametrize("nodes, code, field", [
    ([NodeRequest("a", "valkey"), NodeRequest("a", "valkey")], "duplicate_node", "nodes"),
    ([NodeRequest("a", "mysql")], "unknown_stack", "nodes[0].stack"),
    ([NodeRequest("a", "webapp", {"U": "{{zz.url}}"})], "unknown_reference", "nodes[0].config"),
    ([NodeRequest("a", "webapp", {"U": "{{b.url}}"}), NodeRequest("b", "webapp", {"U": "{{a.url}}"})],
     "reference_cycle", "nodes"),
    ([NodeRequest("db", "postgres"), NodeRequest("web", "webapp", {"U": "{{db.url}}", "ME": "{{ web.port }}"})],
     "self_reference", "nodes[1].config"),
])
def test_invalid_environments_are_refused_and_nothing_is_written(state_db: None, nodes: list[NodeRequest],
                                                                 code: str, field: str) -> None:
    with pytest.raises(PlanError) as err, session_scope() as session:
        plan_environment(session, "t", "shop", nodes)
    assert (err.value.conflict.code, err.value.conflict.field, err.value.problem) == (code, field, Problem.INVALID)
    with session_scope() as session:
        assert session.scalars(select(AddressLease)).all() == []


def test_clone_plan_leases_addresses_and_writes_every_step(state_db: None) -> None:
    with session_scope() as session:
        env = plan_environment(session, "t", "shop", SHOP)
        env.state = EnvState.RUNNING
        for node in env.nodes:
            node.size_bytes = 1000
        session.add(Host(name=get_settings().host_name, reflink=False, free_bytes=10_000))
    with session_scope() as session:
        plan = check_clone(session, "t", "shop", "stage")
        assert plan.conflicts == [] and plan.bytes_needed == 4000 and not plan.reflink
        job = plan_clone(session, "t", "shop", "stage", {})
        steps = session.scalars(select(StepRun).where(StepRun.job_id == job.id)).all()
        assert sorted((s.node_name, s.seq, s.step) for s in steps) == sorted(
            (n, i, s) for n in ("db", "web") for i, s in enumerate(CLONE_STEPS))
        assert set(plan.addresses.values()) == {a for a in session.scalars(
            select(AddressLease.address).where(AddressLease.job_id == job.id))}


def test_clone_plan_lists_every_conflict(state_db: None) -> None:
    with session_scope() as session:
        plan_environment(session, "t", "shop", SHOP)  # still creating
        session.add(Host(name=get_settings().host_name, reflink=False, free_bytes=10))
    with session_scope() as session:
        for node in plan_environment(session, "t", "big", [NodeRequest(f"n{i}", "valkey") for i in range(4)]).nodes:
            node.size_bytes = 100
    with session_scope() as session:
        plan = check_clone(session, "t", "shop", "big")
        assert [c.code for c in plan.conflicts] == ["source_not_running", "name_taken", "pool_exhausted"]
        plan = check_clone(session, "t", "big", "other")
        assert [c.code for c in plan.conflicts] == ["source_not_running", "pool_exhausted", "disk_full"]
        with pytest.raises(PlanError) as err:
            check_clone(session, "t", "nope", "x")
        assert err.value.problem == Problem.NOT_FOUND
        with pytest.raises(PlanError) as err:
            check_clone(session, "other-tenant", "shop", "x")
        assert err.value.problem == Problem.NOT_FOUND
