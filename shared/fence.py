"""The network fence, enforced by the kernel: a node may open connections only to the nodes of its
own environment, plus the environment's declared egress. nftables, in a table of envclone's own
(``inet envclone``): the output hook sends each packet of a new connection to its owner's chain by
socket uid -- every environment has its own account, so the uid names the environment. Replies to
connections made *to* a node are established traffic and pass."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

TABLE = "envclone"
# Idempotent: the table, the map and the hook are (re)made and the hook's two rules rewritten.
BASE = f"""add table inet {TABLE}
add map inet {TABLE} fences {{ type uid : verdict; }}
add chain inet {TABLE} output {{ type filter hook output priority 0; policy accept; }}
flush chain inet {TABLE} output
add rule inet {TABLE} output ct state established,related accept
add rule inet {TABLE} output meta skuid vmap @fences
"""
ENFORCED = "enforced"


@dataclass(frozen=True)
class Egress:
    cidr: str
    ports: tuple[int, ...] = ()  # empty: every port


class FenceUnavailable(Exception):
    """The kernel fence cannot be set up here (no nft, not root); the message says why."""


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "envclone does not run as root"
    if shutil.which("nft") is None:
        return "nftables (nft) is not installed"
    return None


def _chain(uid: int) -> str:
    return f"env_{uid}"


def rules(uid: int, own: Iterable[str], egress: Iterable[Egress]) -> str:
    """The nft script that (re)writes one environment's chain and hooks it to its uid, atomically."""
    chain = _chain(uid)
    lines = [BASE.rstrip(), f"add chain inet {TABLE} {chain}", f"flush chain inet {TABLE} {chain}"]
    own = sorted({str(ipaddress.ip_address(a)) for a in own})
    v4 = [a for a in own if ipaddress.ip_address(a).version == 4]
    v6 = [a for a in own if ipaddress.ip_address(a).version == 6]
    if v4:
        lines.append(f"add rule inet {TABLE} {chain} ip daddr {{ {', '.join(v4)} }} accept")
    if v6:
        lines.append(f"add rule inet {TABLE} {chain} ip6 daddr {{ {', '.join(v6)} }} accept")
    for rule in egress:
        net = ipaddress.ip_network(rule.cidr, strict=False)
        family = "ip" if net.version == 4 else "ip6"
        ports = f" th dport {{ {', '.join(str(p) for p in sorted(set(rule.ports)))} }}" if rule.ports else ""
        lines.append(f"add rule inet {TABLE} {chain} {family} daddr {net}{ports} accept")
    lines += [f"add rule inet {TABLE} {chain} meta l4proto tcp reject with tcp reset",
              f"add rule inet {TABLE} {chain} reject",
              f"add element inet {TABLE} fences {{ {uid} : jump {chain} }}"]
    return "\n".join(lines) + "\n"


def _nft(script: str) -> None:
    done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise FenceUnavailable(f"nft refused the rules: {done.stderr.strip()[-300:]}")


def apply(uid: int, own: Iterable[str], egress: Iterable[Egress]) -> None:
    reason = unavailable_reason()
    if reason:
        raise FenceUnavailable(reason)
    _nft(rules(uid, own, egress))


def remove(uid: int) -> None:
    if unavailable_reason():
        return
    chain = _chain(uid)
    # Each command on its own: a missing element or chain is fine (already removed).
    for command in (f"delete element inet {TABLE} fences {{ {uid} }}", f"delete chain inet {TABLE} {chain}"):
        subprocess.run(["nft", command], capture_output=True, text=True, check=False)


def present() -> bool:
    """Whether envclone's table is in the kernel (it is gone after a reboot or an `nft flush ruleset`)."""
    if unavailable_reason():
        return False
    return subprocess.run(["nft", "list", "table", "inet", TABLE], capture_output=True, check=False).returncode == 0
