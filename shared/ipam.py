"""The address pool: leases live in the database, one row per address (the primary key makes a
double lease impossible, across processes and machines). Lowest free address first, so a dry-run
plan names the addresses a clone submitted right after really gets."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.models import AddressLease


class PoolExhausted(Exception):
    def __init__(self, cidr: str, wanted: int, free: int) -> None:
        super().__init__(f"address pool {cidr} exhausted: {wanted} needed, {free} free")
        self.cidr, self.wanted, self.free = cidr, wanted, free


def _hosts(cidr: str) -> Iterator[str]:
    network = ipaddress.ip_network(cidr, strict=False)
    for host in network.hosts():
        yield str(host)


def listening_addresses() -> set[str]:
    """IPv4 addresses some socket on this machine listens on: never lease one a live process holds."""
    found: set[str] = set()
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if fields[3] != "0A":  # LISTEN
            continue
        hex_addr = fields[1].split(":")[0]
        found.add(str(ipaddress.IPv4Address(bytes.fromhex(hex_addr)[::-1])))
    return found


def _candidates(session: Session, cidr: str) -> Iterator[str]:
    taken = set(session.scalars(select(AddressLease.address)))
    busy = listening_addresses()
    for host in _hosts(cidr):
        if host not in taken and host not in busy:
            yield host


def free_count(session: Session, cidr: str) -> int:
    return sum(1 for _ in _candidates(session, cidr))


def plan(session: Session, cidr: str, count: int) -> list[str]:
    """The addresses ``lease`` would hand out now, touching nothing."""
    out: list[str] = []
    for host in _candidates(session, cidr):
        if len(out) == count:
            break
        out.append(host)
    if len(out) < count:
        raise PoolExhausted(cidr, count, len(out))
    return out


def lease(session: Session, cidr: str, count: int, *, job_id: str | None = None) -> list[str]:
    """Lease ``count`` addresses inside the caller's transaction. A concurrent winner of the same
    address makes our insert fail on the key; we step to the next candidate."""
    got: list[str] = []
    for host in _candidates(session, cidr):
        if len(got) == count:
            break
        try:
            with session.begin_nested():
                session.add(AddressLease(address=host, job_id=job_id))
        except IntegrityError:
            continue
        got.append(host)
    if len(got) < count:
        raise PoolExhausted(cidr, count, len(got))
    return got


def bind(session: Session, address: str, node_id: str) -> None:
    """Record which node holds a leased address."""
    lease_row = session.get(AddressLease, address)
    if lease_row is None:
        raise LookupError(f"address {address} is not leased")
    lease_row.node_id = node_id


def release_node(session: Session, node_id: str) -> None:
    session.execute(delete(AddressLease).where(AddressLease.node_id == node_id))


def release_addresses(session: Session, addresses: list[str]) -> None:
    session.execute(delete(AddressLease).where(AddressLease.address.in_(addresses)))
