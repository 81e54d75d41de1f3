"""on_clone actions: which stack runs which, how requests are checked, what a job reports of them;
the dry run's leak prediction; the safety report."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.planner import predicted_leaks
from shared.clone import neutralize, safety
from shared.errors import PlanError
from shared.models import Node, StepRun
from shared.stacks import CATALOG, NodeContext

NODES = {"db": "postgres", "cache": "valkey", "web": "webapp"}


@pytest.mark.parametrize(("action", "code"), [
    ({"node": "db", "sql": ["UPDATE t SET x = 1"]}, None),
    ({"node": "cache", "delete_keys": ["session:*"]}, None),
    ({"node": "web", "config": {"WEBHOOK_URL": "http://127.0.0.1:9/", "DB": "{{db.url}}"}}, None),
    ({"node": "web", "sql": ["SELECT 1"]}, "unsupported_action"),
    ({"node": "cache", "config": {"A": "b"}}, "unsupported_action"),
    ({"node": "ghost", "sql": ["SELECT 1"]}, "unknown_node"),
    ({"node": "web", "config": {"A": "{{ghost.address}}"}}, "unknown_reference"),
    ({"node": "db", "sql": ["SELECT 1"], "delete_keys": ["x"]}, "invalid_action"),
])
def test_check(action: dict, code: str | None) -> None:
    if code is None:
        neutralize.check([action], NODES, "on_clone")
        return
    with pytest.raises(PlanError) as err:
        neutralize.check([{"node": "db", "sql": ["SELECT 1"]}, action], NODES, "on_clone")
    assert err.value.conflict.code == code and err.value.conflict.field.startswith("on_clone[1]")


def test_a_node_gets_its_actions_in_order_and_templates_name_the_clone() -> None:
    raw = [{"node": "web", "config": {"A": "{{db.address}}"}}, {"node": "db", "sql": ["S1"]},
           {"node": "web", "config": {"B": "2"}}]
    web = neutralize.for_node(raw, "web")
    assert [a.payload for a in web] == [{"A": "{{db.address}}"}, {"B": "2"}]
    assert web[0].resolved(lambda node, attr: f"<{node}.{attr}>").payload == {"A": "<db.address>"}
    assert neutralize.for_node(raw, "db")[0].resolved(lambda *_: "x").payload == ["S1"]


def test_records_carry_counts_and_key_names_never_values() -> None:
    config = neutralize.Action("web", "config", {"TOKEN": "hush"})
    assert config.record({"keys": ["TOKEN"]}) == {"node": "web", "kind": "config", "state": "succeeded",
                                                  "keys": ["TOKEN"]}
    sql = neutralize.Action("db", "sql", ["UPDATE secret_table SET x = 'hush'"])
    failed = sql.record(error="relation missing")
    assert failed["state"] == "failed" and "hush" not in repr(failed)


def test_webapp_config_action_overrides_and_adds_keys(tmp_path: Path) -> None:
    ctx = NodeContext(tmp_path, "127.0.0.1", 8080, None)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / ".env").write_text("# keep me\nA=1\nWEBHOOK_URL=http://prod/\nWEBHOOK_URL=http://prod2/\n")
    done = CATALOG["webapp"].file_action(ctx, "config", {"WEBHOOK_URL": "http://127.0.0.1:9/sink", "NEW": "x"})
    assert done == {"keys": ["NEW", "WEBHOOK_URL"]}
    assert (tmp_path / "config" / ".env").read_text() == "# keep me\nA=1\nNEW=x\nWEBHOOK_URL=http://127.0.0.1:9/sink\n"


def _node(name: str, stack: str, address: str, port: int, config: dict | None = None,
          credentials: dict | None = None) -> Node:
    return Node(name=name, stack=stack, address=address, port=port, config=config or {}, credentials=credentials or {})


def test_dry_run_predicts_literal_source_references_from_declared_configs() -> None:
    nodes = [_node("db", "postgres", "127.80.0.1", 5432, {"IGNORED": "127.80.0.2"},
                   {"username": "app", "password": "db-password-1"}),
             _node("web", "webapp", "127.80.0.2", 8080, {"DB": "{{db.url}}", "REPLICA": "127.80.0.1",
                                                          "PW": "db-password-1"})]
    on_clone = [{"node": "web", "config": {"HOOK": "http://127.80.0.1:5432/", "OK": "{{db.url}}"}},
                {"node": "db", "sql": ["UPDATE t SET host = '127.80.0.1'"]}]
    assert predicted_leaks(nodes, on_clone, "warn") == [
        # postgres writes its config to no file: nothing to predict there
        {"node": "web", "key": "PW", "kind": "secret", "origin": "config", "outcome": "rewritten"},
        {"node": "web", "key": "REPLICA", "kind": "address", "origin": "config", "outcome": "rewritten"},
        {"node": "web", "key": "HOOK", "kind": "host_port", "origin": "on_clone", "outcome": "warn"},
    ]


def _step(node: str, detail: dict) -> StepRun:
    return StepRun(node_name=node, step="assign_ips", detail=detail)


def test_safety_report_from_the_steps_records() -> None:
    steps = [
        _step("db", {"credentials_rotated": True, "rewrites": [], "leaks": [], "scan": {"files": 5, "complete": True},
                     "actions": [{"node": "db", "kind": "sql", "state": "succeeded"}]}),
        _step("web", {"credentials_rotated": False, "rewrites": [{}, {}],
                      "leaks": [{"node": "web", "file": "f", "line": 1, "kind": "address"}],
                      "scan": {"files": 3, "complete": False},
                      "actions": [{"node": "web", "kind": "config", "state": "failed"}]}),
        StepRun(node_name="web", step="restart", detail={"rewrites": [{}]}),
    ]
    leaks, actions = safety.collect(steps)
    assert [a["node"] for a in actions] == ["db", "web"] and len(leaks) == 1
    assert safety.report(steps, "enforced", None, leaks, actions) == {
        "fence": "enforced", "credentials_rotated": 1, "rewrites": 2, "leaks": 1, "on_leak": "fail",
        "actions": 1, "actions_failed": 1, "masked_rules": 0, "masked_failed": 0, "masked_rows": 0,
        "scanned_nodes": 2, "scanned_files": 8, "scan_complete": False}
