"""The worker process role: `celery -A workers.worker worker|beat|flower`. Builds the Celery app
with every task module, and keeps the process hygiene a prefork pool needs."""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init, worker_ready

from shared.db import dispose_engine
from shared.environments import rebuild_fences
from shared.hosts import report_local_host
from workers.celery_app import Role, make_celery

os.umask(0o077)  # snapshots, staging copies, logs: private unless made otherwise on purpose
app = make_celery(Role.WORKER)
log = logging.getLogger("envclone.worker")


@worker_process_init.connect
def _fresh_engine_after_fork(**_: object) -> None:
    dispose_engine()  # never share a database connection across fork


@worker_ready.connect
def _report_host(**_: object) -> None:
    host = report_local_host()
    log.info("host=%s reflink=%s free_bytes=%s", host.name, host.reflink, host.free_bytes)
    log.info("fences rebuilt for %d environment(s)", rebuild_fences())
