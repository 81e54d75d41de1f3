"""on_clone actions: what an environment declares (and a clone request may add) to run on every
clone of it before the clone is reachable -- neutralizing a copy of production:

    {"node": "db", "sql": ["UPDATE ..."]}                      postgres: one transaction, as the superuser
    {"node": "cache", "delete_keys": ["session:*"]}             valkey: SCAN + DEL of each pattern
    {"node": "web", "config": {"WEBHOOK_URL": "http://..."}}    webapp: set or override keys in its .env

They run inside each clone node's assign_ips, while the node is stopped, in this order (see
``shared.clone.safety``): config actions, the leak scan, then sql / delete_keys on a private start of
the server that listens on no address, then the node's first start. Nothing can connect to a clone
node before its actions are done, so no dependent has to wait for them. Like every step they run at
least once: a step redelivered after a lost worker runs them again (write SQL that may run twice)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shared import templates
from shared.errors import Conflict, PlanError, Problem
from shared.stacks import CATALOG

KINDS = ("sql", "delete_keys", "config")
FILE_KINDS = frozenset({"config"})  # run on the stopped node's files, before the leak scan


@dataclass(frozen=True)
class Action:
    node: str
    kind: str
    payload: Any  # sql, delete_keys: list[str]; config: dict[str, str]

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Action:
        kinds = [k for k in KINDS if k in raw]
        if len(kinds) != 1:
            raise ValueError(f"an on_clone action has exactly one of {', '.join(KINDS)}")
        return cls(str(raw["node"]), kinds[0], raw[kinds[0]])

    def resolved(self, lookup: Callable[[str, str], str]) -> Action:
        """Templates in config values ({{db.url}}) name the clone's own nodes."""
        if self.kind != "config":
            return self
        return Action(self.node, self.kind, templates.resolve(dict(self.payload), lookup))

    def record(self, result: Mapping[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
        """What the job reports: counts and key names, never a SQL text or a config value."""
        state = "failed" if error is not None else "succeeded"
        return {"node": self.node, "kind": self.kind, "state": state, **(result or {}),
                **({"error": error} if error is not None else {})}


def check(raw: Iterable[Mapping[str, Any]], stacks: Mapping[str, str], field: str) -> None:
    """PlanError (invalid) unless every action names a node of ``stacks`` (node name -> stack name)
    whose stack runs that kind of action, and its templates name nodes that exist."""
    for i, item in enumerate(raw):
        try:
            action = Action.parse(item)
        except ValueError as exc:
            raise PlanError(Conflict("invalid_action", str(exc), f"{field}[{i}]"), Problem.INVALID) from None
        if action.node not in stacks:
            raise PlanError(Conflict("unknown_node", f"on_clone names unknown node {action.node!r}",
                                     f"{field}[{i}].node"), Problem.INVALID)
        stack = CATALOG[stacks[action.node]]
        runs = stack.file_actions | stack.server_actions
        if action.kind not in runs:
            raise PlanError(Conflict("unsupported_action", f"a {stack.name} node runs no {action.kind!r} action"
                                     f" (it runs: {', '.join(sorted(runs)) or 'none'})", f"{field}[{i}]"),
                            Problem.INVALID)
        if action.kind == "config":
            unknown = templates.references(action.payload) - set(stacks)
            if unknown:
                raise PlanError(Conflict("unknown_reference", f"config references unknown node(s) "
                                         f"{', '.join(sorted(unknown))}", f"{field}[{i}].config"), Problem.INVALID)


def for_node(raw: Iterable[Mapping[str, Any]], node: str) -> list[Action]:
    """A node's actions, in the order declared (the environment's first, then the request's)."""
    return [a for a in map(Action.parse, raw) if a.node == node]
