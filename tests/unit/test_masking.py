"""Masking rules: what a request may ask for, and the statements they become (the seed is always a
bound parameter, never in the statement text)."""

from __future__ import annotations

import pytest

from shared.clone import masking
from shared.errors import PlanError
from shared.stacks import mariadb, postgres

STACKS = {"db": "postgres", "my": "mariadb", "cache": "valkey"}


@pytest.mark.parametrize(("rule", "code", "field"), [
    ({"node": "nope", "table": "t", "column": "c", "with": "email"}, "unknown_node", "mask[0].node"),
    ({"node": "cache", "table": "t", "column": "c", "with": "email"}, "unsupported_mask", "mask[0].node"),
    ({"node": "db", "table": "t;x", "column": "c", "with": "email"}, "invalid_identifier", "mask[0].table"),
    ({"node": "db", "table": "a.b.c", "column": "c", "with": "email"}, "invalid_identifier", "mask[0].table"),
    ({"node": "db", "table": "t", "column": "c\"", "with": "email"}, "invalid_identifier", "mask[0].column"),
    ({"node": "my", "table": "t", "column": "c", "with": "shuffle"}, "unknown_mask", "mask[0].with"),
])
def test_bad_rules_are_refused(rule: dict, code: str, field: str) -> None:
    with pytest.raises(PlanError) as exc:
        masking.check([rule], STACKS)
    assert (exc.value.conflict.code, exc.value.conflict.field) == (code, field)


def test_good_rules_pass_and_report_no_constant_value() -> None:
    rules = [{"node": "db", "table": "public.users", "column": "email", "with": kind}
             for kind in (*masking.KINDS, "constant:Jane")] + [
        {"node": "my", "table": "users", "column": "name", "with": "name"}]
    masking.check(rules, STACKS)
    assert [r.node for r in masking.for_node(rules, "my")] == ["my"]
    assert masking.Rule.parse(rules[-2]).record(3) == {
        "node": "db", "table": "public.users", "column": "email", "with": "constant", "rows": 3, "state": "succeeded"}


@pytest.mark.parametrize("kind", [*masking.KINDS, "constant:x"])
def test_the_seed_is_a_parameter_never_in_the_statement(kind: str) -> None:
    seed = "s3cr3t-seed-value"
    pg, params = postgres.mask_statement("public.users", "email", kind, seed)
    text = pg.as_string(None)
    assert seed not in text and text.startswith('UPDATE "public"."users" SET "email" = ')
    assert params.get("seed") in (seed, None)
    my, my_params = mariadb.mask_statement("public.users", "email", kind, seed)
    assert seed not in my and my.startswith("UPDATE `public`.`users` SET `email` = ")
    assert my.count("%s") == len(my_params)
