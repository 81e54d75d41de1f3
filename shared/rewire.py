"""Rewriting connection strings: every occurrence of a source node's address in a clone's config
becomes the clone's counterpart, so a clone never talks to production."""

from __future__ import annotations

import re
from collections import Counter


def address_pattern(addresses: list[str]) -> re.Pattern[str]:
    # Longest first so 127.80.0.10 is never matched as 127.80.0.1 followed by "0"; the look-arounds
    # stop a match inside a longer dotted number on either side.
    alternatives = "|".join(re.escape(a) for a in sorted(addresses, key=len, reverse=True))
    return re.compile(rf"(?<![\w.])({alternatives})(?![\w]|\.\d)")


def rewrite_text(text: str, address_map: dict[str, str]) -> tuple[str, Counter[str]]:
    """Replace addresses in one pass (no chains: a new address is never rewritten again)."""
    if not address_map:
        return text, Counter()
    counts: Counter[str] = Counter()

    def swap(match: re.Match[str]) -> str:
        counts[match.group(1)] += 1
        return address_map[match.group(1)]

    return address_pattern(list(address_map)).sub(swap, text), counts


def replace_secrets(text: str, secret_map: dict[str, str]) -> tuple[str, Counter[str]]:
    """Replace each old secret by its new value, longest first (``user:password@`` of a renamed user
    before the bare password inside it)."""
    counts: Counter[str] = Counter()
    for old in sorted(secret_map, key=len, reverse=True):
        n = text.count(old)
        if n:
            text = text.replace(old, secret_map[old])
            counts[old] += n
    return text, counts
