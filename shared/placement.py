"""Which host a node goes to. New environments spread their nodes over the ``up`` hosts with the
most free disk unless a node pins one; a clone keeps each node on its source's host when that host
has room (a local copy or a reflink, nothing crosses the network), unless the request moves it
(``target_host`` for every node, ``placement`` per node). Down and draining hosts get nothing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from sqlalchemy import Connection, Row, select
from sqlalchemy.orm import Session

from shared.config import get_settings
from shared.errors import Conflict, PlanError, Problem
from shared.models import Host, Node
from shared.states import HostState

# Table columns, not an entity's (Core's execution path), and built once: every clone request reads them.
_HOSTS = Host.__table__.c
HOST_COLUMNS = (_HOSTS.name, _HOSTS.state, _HOSTS.reflink, _HOSTS.free_bytes, _HOSTS.address_pool)
_HOST_ROWS = select(*HOST_COLUMNS)


class HostRow(NamedTuple):
    """What placement reads of a host (the columns of ``HOST_COLUMNS``)."""

    name: str
    state: HostState
    reflink: bool
    free_bytes: int
    address_pool: str | None


class Hosts:
    """The host rows of one plan, with the disk this plan has already promised on each.
    ``read``: rows the caller already has (a clone request reads its source nodes' hosts with them);
    every host is read only when the plan needs more than those."""

    def __init__(self, session: Session | Connection, read: Iterable[HostRow] = ()) -> None:
        self._session = session
        self._read = {h.name: h for h in read}
        self._all: dict[str, Row | HostRow] | None = None
        self.promised: dict[str, int] = {}
        self.placed: dict[str, int] = {}

    @property
    def rows(self) -> dict[str, Row | HostRow]:
        if self._all is None:
            self._all = {h.name: h for h in self._session.execute(_HOST_ROWS)}
        return self._all

    def row(self, name: str) -> Row | HostRow | None:
        # The rows read with the source first: a later read of every host may hold a newer free_bytes,
        # as any agent report would (disk is checked exactly when the worker materializes the clone).
        return self._read.get(name) or self.rows.get(name)

    @property
    def known(self) -> bool:
        return bool(self._read) or bool(self.rows)

    def up(self) -> list[Row | HostRow]:
        return [h for h in self.rows.values() if h.state == HostState.UP]

    def free(self, name: str) -> int:
        host = self.row(name)
        return (host.free_bytes if host else 0) - self.promised.get(name, 0)

    def room_for(self, name: str, size: int) -> bool:
        host = self.row(name)
        return host is not None and host.state == HostState.UP and self.free(name) >= size

    def take(self, name: str, size: int) -> str:
        self.promised[name] = self.promised.get(name, 0) + size
        self.placed[name] = self.placed.get(name, 0) + 1
        return name

    def check(self, name: str, field: str) -> str:
        """A host a request names must exist and be up."""
        host = self.row(name)
        if host is None:
            raise PlanError(Conflict("unknown_host", f"no host named {name!r}; known: "
                                     f"{', '.join(sorted(self.rows)) or 'none'}", field), Problem.INVALID)
        if host.state != HostState.UP:
            raise PlanError(Conflict("host_unavailable", f"host {name!r} is {host.state}", field))
        return name

    def emptiest(self, size: int, field: str) -> str:
        """The up host with the most free disk, fewest nodes of this plan first (so one request
        spreads), that has room."""
        fits = [h for h in self.up() if self.free(h.name) >= size]
        if not fits:
            raise PlanError(Conflict("no_host", "no host is up with room for the node" if self.up()
                                     else "no host is up", field))
        return min(fits, key=lambda h: (self.placed.get(h.name, 0), -self.free(h.name), h.name)).name

    def copy_bytes(self, name: str, size: int) -> int:
        """Disk a copy of ``size`` bytes costs on ``name``: a snapshot and a volume, unless reflink."""
        host = self.row(name)
        return 0 if host is not None and host.reflink else 2 * size


def place_new(session: Session, pins: Sequence[str | None]) -> list[str]:
    """A host per new node (``pins[i]``: the host the request names for node i, if any)."""
    hosts = Hosts(session)
    if not hosts.known:  # no agent has reported yet: the one host this machine is
        return [pin or get_settings().host_name for pin in pins]
    return [hosts.take(hosts.check(pin, f"nodes[{i}].host") if pin else hosts.emptiest(0, f"nodes[{i}].host"), 0)
            for i, pin in enumerate(pins)]


def place_clone(session: Session | Connection, sources: Sequence[Node], target_host: str | None,
                pins: dict[str, str], read: Iterable[HostRow] = ()) -> tuple[dict[str, str], Hosts]:
    """A host per clone node, keyed by node name (``read``: as for ``Hosts``)."""
    hosts = Hosts(session, read)
    unknown = set(pins) - {n.name for n in sources}
    if unknown:
        raise PlanError(Conflict("unknown_node", f"placement names no node of the source: "
                                 f"{', '.join(sorted(unknown))}", "placement"), Problem.INVALID)
    if not hosts.known:
        return {n.name: pins.get(n.name) or target_host or n.host for n in sources}, hosts
    if target_host:
        hosts.check(target_host, "target_host")
    out: dict[str, str] = {}
    for node in sources:
        field = f"placement.{node.name}"
        if node.name in pins:
            name = hosts.check(pins[node.name], field)
        elif target_host:
            name = target_host
        elif hosts.room_for(node.host, hosts.copy_bytes(node.host, node.size_bytes)):
            name = node.host
        elif any(hosts.free(h.name) >= 2 * node.size_bytes for h in hosts.up()):
            name = hosts.emptiest(2 * node.size_bytes, field)
        elif node.host in {h.name for h in hosts.up()}:
            name = node.host  # nowhere has room: the plan says disk_full for the source's own host
        else:
            name = hosts.emptiest(0, field)
        out[node.name] = hosts.take(name, hosts.copy_bytes(name, node.size_bytes))
    return out, hosts


def pool_of(hosts: Hosts, name: str) -> str:
    """The address pool of a host: its nodes get addresses from it (its agent reports it)."""
    host = hosts.row(name)
    return (host.address_pool if host is not None else None) or get_settings().address_pool
