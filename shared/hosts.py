"""Hosts: the machines that hold nodes. Each runs an agent (a Celery worker on its own queues,
``envclone.host.<name>``), the only process that touches that host's nodes; general workers
orchestrate. An agent reports its host's row when it starts and heartbeats it from its main process
(so a host busy with long steps is not taken for dead); the watchdog marks a silent host ``down``."""

from __future__ import annotations

import logging
import shutil
import threading
from datetime import timedelta

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from shared.config import get_settings
from shared.db import session_scope
from shared.drivers import get_driver
from shared.models import Host, Node, utcnow
from shared.states import HostState, NodeState

log = logging.getLogger("envclone.hosts")


def queue(host: str) -> str:
    """The queue only ``host``'s agent consumes."""
    return f"envclone.host.{host}"


def window_queue(host: str) -> str:
    """Steps that run while a source is held (snapshot, restart): consumed first by the agent."""
    return f"envclone.host.{host}.window"


def is_local(host: str | None) -> bool:
    """Whether this process is ``host``'s agent, so may act on its nodes itself."""
    settings = get_settings()
    return settings.agent and host == settings.host_name


def report_local_host(started: bool = False) -> Host:
    """(Re)write this agent's host row: disk, reflink, pool, where it serves snapshots; a host that
    was down is up again (a draining one stays draining: that is the operator's call)."""
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    reflink, free = get_driver().reflink, shutil.disk_usage(settings.data_dir).free
    with session_scope() as session:
        host = session.get(Host, settings.host_name) or Host(name=settings.host_name, state=HostState.UP)
        host.reflink, host.free_bytes, host.heartbeat_at = reflink, free, utcnow()
        host.address_pool, host.transfer_url = settings.address_pool, settings.resolved_transfer_url or None
        if host.state == HostState.DOWN:
            host.state = HostState.UP
            log.warning("host=%s is back up", host.name)
        if started:
            host.started_at = utcnow()
        session.add(host)
    return host


def heartbeat() -> None:
    """A host marked down while its agent lived (a stalled machine) comes back up: its jobs were
    failed meanwhile, and the agent's next sweep removes what they left here."""
    with session_scope() as session:
        session.execute(update(Host).where(Host.name == get_settings().host_name).values(
            heartbeat_at=utcnow(),
            state=case((Host.state == HostState.DOWN, HostState.UP), else_=Host.state)))


def start_heartbeat() -> threading.Event:
    """Heartbeat from a thread of the agent's main process until the returned event is set."""
    stop = threading.Event()
    every = get_settings().resolved_heartbeat_s

    def beat() -> None:
        while not stop.wait(every):  # the interval is the point here, not a synchronisation
            try:
                heartbeat()
            except Exception as exc:  # the database may blink; the next beat tries again
                log.warning("heartbeat failed: %s", exc)

    threading.Thread(target=beat, name="envclone-heartbeat", daemon=True).start()
    return stop


def mark_silent_hosts_down() -> list[str]:
    """Hosts whose agent has not been heard from for ENVCLONE_HOST_DOWN_S are down."""
    cutoff = utcnow() - timedelta(seconds=get_settings().host_down_s)
    with session_scope() as session:
        silent = list(session.scalars(select(Host).where(Host.heartbeat_at < cutoff, Host.state == HostState.UP)
                                      .with_for_update()))
        for host in silent:
            host.state = HostState.DOWN
            log.error("host=%s is down: no heartbeat since %s", host.name, host.heartbeat_at)
        return [h.name for h in silent]


def local_host(session: Session) -> Host | None:
    return session.get(Host, get_settings().host_name)


def node_counts(session: Session) -> dict[str, int]:
    live = [s.value for s in NodeState if s.has_process or s == NodeState.PENDING]
    return dict(session.execute(select(Node.host, func.count()).where(Node.state.in_(live)).group_by(Node.host)).all())


def set_state(name: str, state: HostState) -> Host:
    """An operator drains a host (placement skips it; its nodes stay) or undrains it."""
    with session_scope() as session:
        host = session.get(Host, name)
        if host is None:
            raise LookupError(f"no host named {name!r}")
        if state == HostState.UP and host.state == HostState.DOWN:
            raise ValueError(f"host {name} is down: it comes back up when its agent does")
        host.state = state
        session.flush()
        session.expunge(host)
        return host
