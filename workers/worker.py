"""The worker process role: `celery -A workers.worker worker|beat|flower`. Builds the Celery app
with every task module, and keeps the process hygiene a prefork pool needs."""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init, worker_ready

from shared.config import get_settings
from shared.db import dispose_engine
from shared.environments import rebuild_fences
from shared.hosts import report_local_host, start_heartbeat
from shared.sweep import sweep_host
from shared.transfer_service import serve_snapshots
from workers.celery_app import Role, make_celery

os.umask(0o077)  # snapshots, staging copies, logs: private unless made otherwise on purpose
app = make_celery(Role.WORKER)
log = logging.getLogger("envclone.worker")


@worker_process_init.connect
def _fresh_engine_after_fork(**_: object) -> None:
    dispose_engine()  # never share a database connection across fork


@worker_ready.connect
def _start_agent(**_: object) -> None:
    """An agent registers its host, heartbeats it, serves its snapshots to other agents, and makes
    its disk match the rows before it takes a step (leftovers of jobs failed while it was away)."""
    settings = get_settings()
    if not settings.agent:
        return
    host = report_local_host(started=True)
    start_heartbeat()
    log.info("host=%s reflink=%s free_bytes=%s pool=%s", host.name, host.reflink, host.free_bytes, host.address_pool)
    if settings.transfer_bind:
        server = serve_snapshots(settings)
        log.info("host=%s serves snapshots at %s", host.name, server.url)
    log.info("fences rebuilt for %d environment(s)", rebuild_fences())
    log.info("host=%s sweep at start: %s", host.name, sweep_host())
