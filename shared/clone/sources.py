"""What "a source is restarted" means. A job holds a source node from the moment it records the
quiesce (``quiesced_at``, written before the node is touched) until it records the restart
(``restarted_at``). Bringing the source back, recording its downtime and letting the next job at
the node go happen here and nowhere else: the restart step, a step that fails inside the window,
the report's compensation and the watchdog all call ``restart_source``."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared import hosts, locks
from shared.config import get_settings
from shared.db import wait_for_locks_from_here
from shared.drivers import DriverError, get_driver
from shared.models import JobNode, Node, utcnow


def held_down(jn: JobNode) -> bool:
    """This job quiesced the source and has not brought it back yet."""
    return jn.quiesced_at is not None and jn.restarted_at is None


class SourceElsewhere(DriverError):
    """The source lives on another host: only that host's agent may bring it back (its restart step
    or its sweep does)."""


def restart_source(session: Session, jn: JobNode) -> bool:
    """Bring the source back if this job holds it down (DriverError if it will not come back, or
    SourceElsewhere if another host's agent must), record the downtime, release the node lock.
    ``jn`` is row-locked by the caller. Returns whether this call brought the source back. Once the
    job has restarted the source it never starts it again: another job may be holding it down for
    its own snapshot by then."""
    brought_back = False
    if held_down(jn):
        host = session.get(Node, jn.source_node_id).host
        if not hosts.is_local(host):
            raise SourceElsewhere(f"the source is on host {host}; its agent restores it")
        get_driver().restart(jn.source_node_id, get_settings().health_timeout_s)
        wait_for_locks_from_here(session)
        jn.restarted_at = utcnow()
        jn.downtime_ms = int((jn.restarted_at - jn.quiesced_at).total_seconds() * 1000)
        brought_back = True
    locks.release(session, jn.source_node_id, jn.job_id)
    return brought_back
