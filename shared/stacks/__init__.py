"""The operator-owned stack catalog. API callers choose a stack by name, never a command."""

from shared.stacks.base import NodeContext, Stack
from shared.stacks.mariadb import MariaDBStack
from shared.stacks.postgres import PostgresStack
from shared.stacks.valkey import ValkeyStack
from shared.stacks.webapp import WebappStack

CATALOG: dict[str, Stack] = {s.name: s for s in (PostgresStack(), MariaDBStack(), ValkeyStack(), WebappStack())}


def get_stack(name: str) -> Stack:
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown stack {name!r}; known: {', '.join(sorted(CATALOG))}") from None


__all__ = ["CATALOG", "NodeContext", "Stack", "get_stack"]
