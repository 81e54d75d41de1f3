"""The watchdog task, run by celery beat every few seconds on a general worker: one round of every
rule that must hold when workers die, the broker blinks, a step hangs or a host goes silent
(shared.clone.supervision for jobs, shared.hosts for hosts), the outbox, and a round on every live
host's own agent (workers.hosts: what acts on nodes runs there)."""

from __future__ import annotations

import redis
from celery import Task, shared_task
from sqlalchemy import select

from shared import hosts
from shared.clone import outcome, supervision
from shared.config import get_settings
from shared.db import session_scope
from shared.models import Host
from shared.states import HostState
from workers.dispatcher import send_pending
from workers.workflow import dispatch_clone, dispatch_create_environment, dispatch_delete_environment, dispatch_sweeps


def _live_hosts() -> set[str]:
    with session_scope() as session:
        return set(session.scalars(select(Host.name).where(Host.state != HostState.DOWN)))


def run_once(task: Task) -> dict[str, int]:
    app = task.app
    settings = get_settings()
    ended: list[str] = []
    resumed = reaped = sent = 0
    with supervision.rounds():
        with supervision.next_round_if_locked("marking silent hosts down"):
            hosts.mark_silent_hosts_down()
        with session_scope() as session:
            down = set(session.scalars(select(Host.name).where(Host.state == HostState.DOWN)))
        ended = supervision.fail_jobs_on_down_hosts(down)
        resumed, reaped = supervision.resume_or_give_up_stalled_jobs(lambda job_id: dispatch_clone(app, job_id))
        live = _live_hosts()
        for job_id in ended:
            dispatch_sweeps(app, outcome.job_hosts(job_id) & live)
        sent = send_pending(lambda j: dispatch_clone(app, j), lambda e: dispatch_create_environment(app, e),
                            lambda e: dispatch_delete_environment(app, e))
    for name in sorted(live):  # expires: a round an agent could not take in time is not worth running late
        app.signature("envclone.host_round").set(queue=hosts.queue(name), expires=settings.watchdog_interval_s,
                                                 argsrepr=f"host={name} step=round").apply_async()
    return {"hosts_down": len(down), "jobs_failed_host_down": len(ended), "jobs_resumed": resumed,
            "jobs_reaped": reaped, "dispatched": sent}


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
