"""The watchdog task, run by celery beat every few seconds: one round of every rule that must hold
when workers die, the broker blinks or a step hangs (shared.clone.supervision for jobs,
shared.environments for nodes), the outbox, and the host's heartbeat."""

from __future__ import annotations

import redis
from celery import Task, shared_task

from shared import fence
from shared.clone import supervision
from shared.config import get_settings
from shared.environments import rebuild_fences, reconcile_nodes
from shared.hosts import report_local_host
from workers.dispatcher import send_pending
from workers.workflow import dispatch_clone, dispatch_create_environment, dispatch_delete_environment


def run_once(task: Task) -> dict[str, int]:
    app = task.app
    sources = supervision.restart_overdue_sources()
    resumed, reaped = supervision.resume_or_give_up_stalled_jobs(lambda job_id: dispatch_clone(app, job_id))
    nodes = reconcile_nodes()
    sent = send_pending(lambda j: dispatch_clone(app, j), lambda e: dispatch_create_environment(app, e),
                        lambda e: dispatch_delete_environment(app, e))
    report_local_host()
    if not fence.unavailable_reason() and not fence.present():
        rebuild_fences()  # the ruleset was flushed (or the machine restarted) under us
    return {"sources_restarted": sources, "jobs_resumed": resumed, "jobs_reaped": reaped,
            "nodes_restarted": nodes, "dispatched": sent}


@shared_task(name="envclone.watchdog", bind=True, ignore_result=True)
def watchdog(self: Task) -> dict[str, int] | None:
    # One watchdog at a time, whatever the number of workers and however long a round takes.
    client = redis.Redis.from_url(get_settings().broker_url)
    lock = client.lock("envclone:watchdog", timeout=300, blocking=False)
    if not lock.acquire(blocking=False):
        return None
    try:
        return run_once(self)
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass
