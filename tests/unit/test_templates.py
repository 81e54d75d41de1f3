"""Node config templates and the order nodes are created in."""

from __future__ import annotations

import pytest

from shared.templates import creation_levels, references, resolve


def test_references_and_resolve() -> None:
    config = {"DATABASE_URL": "{{db.url}}", "HOST": "{{ cache.address }}:{{cache.port}}", "PLAIN": "x{{y"}
    assert references(config) == {"db", "cache"}
    values = {("db", "url"): "postgresql://h/app", ("cache", "address"): "10.0.0.1", ("cache", "port"): "6379"}
    assert resolve(config, lambda n, a: values[(n, a)]) == {
        "DATABASE_URL": "postgresql://h/app", "HOST": "10.0.0.1:6379", "PLAIN": "x{{y"}


def test_creation_levels_put_dependencies_first() -> None:
    deps = {"web": {"db", "cache"}, "db": set(), "cache": set(), "worker": {"web"}}
    assert creation_levels(deps) == [["cache", "db"], ["web"], ["worker"]]
    assert creation_levels({}) == []


def test_a_cycle_is_refused() -> None:
    with pytest.raises(ValueError, match="cycle among: a, b"):
        creation_levels({"a": {"b"}, "b": {"a"}, "c": set()})
