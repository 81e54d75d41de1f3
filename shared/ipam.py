"""The address pool: leases live in the database, one row per address (the primary key makes a
double lease impossible, across processes and machines). Lowest free address first, so a dry-run
plan names the addresses a clone submitted right after really gets.

Concurrent leasers would all try the same lowest address and PostgreSQL would make each wait for
the other's commit. So on PostgreSQL a leaser first takes a
transaction-scoped advisory lock on the address and skips any address another in-flight
transaction holds -- the effect of SELECT ... FOR UPDATE SKIP LOCKED without a pool table."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.models import AddressLease, utcnow


class PoolExhausted(Exception):
    def __init__(self, cidr: str, wanted: int, free: int) -> None:
        super().__init__(f"address pool {cidr} exhausted: {wanted} needed, {free} free")
        self.cidr, self.wanted, self.free = cidr, wanted, free


def _hosts(cidr: str) -> Iterator[str]:
    network = ipaddress.ip_network(cidr, strict=False)
    for host in network.hosts():
        yield str(host)


_listening_cache: tuple[float, set[str]] = (float("-inf"), set())


def listening_addresses(max_age_s: float = 0.0) -> set[str]:
    """IPv4 addresses some socket on this machine listens on: never lease one a live process holds.
    The kernel writes every socket (TIME_WAIT ones too) into /proc/net/tcp, so on a busy API the
    read costs milliseconds: ``max_age_s`` lets a caller reuse a scan that recent. A process that
    began listening since then is still caught when the clone node starts (address in use)."""
    global _listening_cache
    read_at, cached = _listening_cache
    if time.monotonic() - read_at <= max_age_s:
        return set(cached)
    found = _scan_listening()
    _listening_cache = (time.monotonic(), found)
    return set(found)


def _scan_listening() -> set[str]:
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


def leased(session: Session) -> set[str]:
    return set(session.scalars(select(AddressLease.address)))


def _candidates(session: Session, cidr: str, busy: set[str] | None = None) -> Iterator[str]:
    """Free addresses of ``cidr``, lowest first. ``busy``: when given, the caller's one reading of
    the leases and listening addresses (a lease taken since is caught by the insert)."""
    busy = (listening_addresses() | leased(session)) if busy is None else busy
    for host in _hosts(cidr):
        if host not in busy:
            yield host


def free_count(session: Session, cidr: str) -> int:
    return sum(1 for _ in _candidates(session, cidr))


def plan(session: Session, cidr: str, count: int, *, busy: set[str] | None = None) -> list[str]:
    """The addresses ``lease`` would hand out now, touching nothing. ``busy``: listening addresses
    the caller already read (one scan of /proc per request, not one per call)."""
    out: list[str] = []
    for host in _candidates(session, cidr, busy):
        if len(out) == count:
            break
        out.append(host)
    if len(out) < count:
        raise PoolExhausted(cidr, count, len(out))
    return out


_LOCK_SPACE = 0x1EA5E  # advisory lock class for addresses (two-int form: class, address)


def _claim(session: Session, address: str) -> bool:
    """On PostgreSQL: False if another open transaction is leasing ``address`` right now (its lock
    is held until it commits or rolls back). Elsewhere writers are serialized already."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    # The lock takes signed 32-bit ints; an IPv6 collision only makes us skip to the next address.
    key = int(ipaddress.ip_address(address)) % 2**32 - 2**31
    return bool(session.scalar(select(func.pg_try_advisory_xact_lock(_LOCK_SPACE, key))))


def try_lease(session: Session, address: str, *, job_id: str | None = None, node_id: str | None = None) -> bool:
    """Lease one given address in the caller's transaction; False if it is taken or being taken."""
    if not _claim(session, address):
        return False
    # A lease committed since the pool was read makes the insert do nothing (no savepoint needed).
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": pg_insert, "sqlite": sqlite_insert}.get(dialect)
    if insert is None:
        try:
            with session.begin_nested():
                session.add(AddressLease(address=address, job_id=job_id, node_id=node_id))
        except IntegrityError:
            return False
        return True
    row = session.connection().execute(
        insert(AddressLease).values(address=address, job_id=job_id, node_id=node_id, leased_at=utcnow())
        .on_conflict_do_nothing().returning(AddressLease.address)).first()
    return row is not None


def lease(session: Session, cidr: str, count: int, *, job_id: str | None = None,
          busy: set[str] | None = None, node_ids: list[str] | None = None) -> list[str]:
    """Lease ``count`` addresses inside the caller's transaction, lowest free first, stepping past
    any a concurrent request holds. ``node_ids``: bind the i-th address to the i-th node at once."""
    got: list[str] = []
    for host in _candidates(session, cidr, busy):
        if len(got) == count:
            break
        if try_lease(session, host, job_id=job_id, node_id=node_ids[len(got)] if node_ids else None):
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
