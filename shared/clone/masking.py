"""Masking of personal data: a clone request's ``mask`` rules replace a column's values with fakes
on the clone, before it is reachable -- in the same private, address-less start of the server that
the on_clone SQL actions use (``shared.clone.safety``), one transaction per node:

    {"node": "db", "table": "users", "column": "email", "with": "email"}

``with``: ``email``, ``name``, ``phone``, ``hash`` (fakes derived from the value), ``redact`` (a
fixed mask), ``null``, ``constant:<value>``. A fake is computed in SQL from a digest of
``seed || value``: the same value gives the same fake throughout one clone (joins on masked
columns survive), and another clone gets other fakes unless it is given the same ``mask_seed``.
NULL stays NULL for the derived kinds and ``redact``.

Fail closed: an unknown table or column (or a fake the column cannot hold) fails the node's step;
the clone is then torn down and was never reachable. Like every step a masking may run twice (a
step redelivered after a lost worker): the second run masks the fakes again, consistently -- joins
still match and nothing of the source's values comes back."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import Conflict, PlanError, Problem

KINDS = ("email", "name", "phone", "null", "hash", "redact")
CONSTANT = "constant:"
REDACTED = "********"
# An SQL identifier we quote ourselves; a table may name its schema (``schema.table``).
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
MASKING_STACKS = ("postgres", "mariadb")


def valid_with(value: str) -> bool:
    return value in KINDS or (value.startswith(CONSTANT) and "\x00" not in value)


def valid_table(value: str) -> bool:
    parts = value.split(".")
    return 1 <= len(parts) <= 2 and all(IDENTIFIER.match(p) for p in parts)


@dataclass(frozen=True)
class Rule:
    node: str
    table: str
    column: str
    kind: str  # the request's ``with``

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Rule:
        return cls(str(raw["node"]), str(raw["table"]), str(raw["column"]), str(raw["with"]))

    @property
    def constant(self) -> str | None:
        return self.kind[len(CONSTANT):] if self.kind.startswith(CONSTANT) else None

    @property
    def reported_with(self) -> str:
        """What the job shows: a constant's value is data, so only its kind."""
        return "constant" if self.constant is not None else self.kind

    def stored(self) -> dict[str, str]:
        return {"node": self.node, "table": self.table, "column": self.column, "with": self.kind}

    def record(self, rows: int | None = None, error: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.node, "table": self.table, "column": self.column,
                               "with": self.reported_with}
        if error is not None:
            return {**out, "rows": 0, "state": "failed", "error": error}
        return {**out, "rows": rows or 0, "state": "succeeded"}


def check(raw: Iterable[Mapping[str, Any]], stacks: Mapping[str, str], field: str = "mask") -> None:
    """PlanError (invalid) unless every rule names a postgres or mariadb node of ``stacks`` (node
    name -> stack name), identifiers for table and column, and a known ``with``."""
    for i, item in enumerate(raw):
        rule = Rule.parse(item)
        if rule.node not in stacks:
            raise PlanError(Conflict("unknown_node", f"mask names unknown node {rule.node!r}",
                                     f"{field}[{i}].node"), Problem.INVALID)
        if stacks[rule.node] not in MASKING_STACKS:
            raise PlanError(Conflict("unsupported_mask", f"a {stacks[rule.node]} node cannot be masked (only "
                                     f"{' and '.join(MASKING_STACKS)} nodes)", f"{field}[{i}].node"), Problem.INVALID)
        if not valid_table(rule.table):
            raise PlanError(Conflict("invalid_identifier", "table must be an identifier (or schema.table)",
                                     f"{field}[{i}].table"), Problem.INVALID)
        if not IDENTIFIER.match(rule.column):
            raise PlanError(Conflict("invalid_identifier", "column must be an identifier", f"{field}[{i}].column"),
                            Problem.INVALID)
        if not valid_with(rule.kind):
            raise PlanError(Conflict("unknown_mask", f"with must be one of {', '.join(KINDS)} or constant:<value>",
                                     f"{field}[{i}].with"), Problem.INVALID)


def for_node(raw: Iterable[Mapping[str, Any]], node: str) -> list[Rule]:
    return [r for r in map(Rule.parse, raw) if r.node == node]


def payload(rules: list[Rule], seed: str) -> dict[str, Any]:
    """The server action a stack runs (kind ``mask``): the rules and the clone's seed."""
    return {"seed": seed, "rules": [r.stored() for r in rules]}


def collect(steps: Iterable[Any]) -> list[dict[str, Any]]:
    """Every node's masked rules, from the assign_ips steps' records."""
    from shared.states import Step

    masked: list[dict[str, Any]] = []
    for step in sorted(steps, key=lambda s: s.node_name):
        if step.step == Step.ASSIGN_IPS:
            masked += step.detail.get("masked", [])
    return masked
