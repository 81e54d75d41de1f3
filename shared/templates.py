"""Node config templates: ``{{db.url}}``, ``{{db.address}}``, ``{{db.port}}`` name another node of the
same environment. Resolved on the workers once the referenced node exists."""

from __future__ import annotations

import re
from collections.abc import Callable

REF = re.compile(r"\{\{\s*([a-z][a-z0-9-]*)\.(url|address|port|host)\s*\}\}")


def references(config: dict[str, str]) -> set[str]:
    return {m.group(1) for value in config.values() for m in REF.finditer(value)}


def resolve(config: dict[str, str], lookup: Callable[[str, str], str]) -> dict[str, str]:
    return {key: REF.sub(lambda m: lookup(m.group(1), m.group(2)), value) for key, value in config.items()}


def creation_levels(deps: dict[str, set[str]]) -> list[list[str]]:
    """Group node names so each level only depends on earlier levels. ValueError on a cycle."""
    levels: list[list[str]] = []
    done: set[str] = set()
    remaining = dict(deps)
    while remaining:
        ready = sorted(n for n, d in remaining.items() if d <= done)
        if not ready:
            raise ValueError(f"config references form a cycle among: {', '.join(sorted(remaining))}")
        levels.append(ready)
        done.update(ready)
        for n in ready:
            del remaining[n]
    return levels
