"""The machine a worker runs on, as a row: what the API and plans read (free disk, reflink)
instead of probing a filesystem inside a request. Workers report it when they start and on every
watchdog round."""

from __future__ import annotations

import shutil

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.config import get_settings
from shared.db import session_scope
from shared.drivers import get_driver
from shared.models import Host, utcnow
from shared.states import HostState


def report_local_host() -> Host:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    reflink, free = get_driver().reflink, shutil.disk_usage(settings.data_dir).free
    with session_scope() as session:
        host = session.get(Host, settings.host_name) or Host(name=settings.host_name, state=HostState.UP)
        host.reflink, host.free_bytes, host.heartbeat_at = reflink, free, utcnow()
        session.add(host)
    return host


def local_host(session: Session) -> Host | None:
    return session.scalar(select(Host).where(Host.name == get_settings().host_name))
