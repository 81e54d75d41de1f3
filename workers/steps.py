"""The clone steps, one Celery task each, per source node: quiesce -> snapshot -> restart ->
provision -> assign_ips. Every body is idempotent: names derive from job and node ids, and each
looks for what an earlier run already made."""

from __future__ import annotations

import time
from typing import Any

from celery import Task
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from shared import locks
from shared.config import get_settings
from shared.db import session_scope
from shared.drivers import PermanentDriverError, get_driver
from shared.models import CloneJob, JobNode, Node, Snapshot, utcnow
from shared.progress import record_event
from workers.broker_guard import send_progress
from workers.celery_app import celery_app
from workers.step_runner import StepContext, job_node, run_step

# Database outages are retried at the task level for a long while (bounded), whatever the step.
TASK_OPTS: dict[str, Any] = {
    "bind": True,
    "autoretry_for": (OperationalError,),
    "retry_backoff": True,
    "retry_backoff_max": 30,
    "max_retries": 10_000,  # bounded in practice by retry_max (per body run) and lock_wait_s
    "acks_late": True,
}


def _source(ctx: StepContext) -> tuple[JobNode, Node]:
    with session_scope() as session:
        jn = job_node(session, ctx.job_id, ctx.source_node_id)
        src = session.get(Node, ctx.source_node_id)
        session.expunge_all()
    return jn, src


def restore_source(ctx: StepContext) -> dict[str, Any]:
    """Bring the source back if this job stopped it, record the downtime, let the next job at the
    node go. Safe to repeat."""
    jn, _ = _source(ctx)
    if jn.quiesced_at is not None and jn.restarted_at is None:  # once: later, another job may hold it
        get_driver().restart(ctx.source_node_id, get_settings().health_timeout_s)
    with session_scope() as session:
        jn = job_node(session, ctx.job_id, ctx.source_node_id)
        if jn.quiesced_at is not None and jn.restarted_at is None:
            jn.restarted_at = utcnow()
            jn.downtime_ms = int((jn.restarted_at - jn.quiesced_at).total_seconds() * 1000)
        locks.release(session, ctx.source_node_id, ctx.job_id)
        if jn.quiesced_at is None:
            return {"source": "was not stopped by this job"}
        return {"downtime_ms": jn.downtime_ms}


def _restore_after_failure(ctx: StepContext, _exc: BaseException) -> None:
    restore_source(ctx)


def _lock_ttl() -> float:
    s = get_settings()
    return s.task_time_limit_s + 2 * s.max_downtime_s


def _quiesce(ctx: StepContext) -> dict[str, Any]:
    with session_scope() as session:
        locks.acquire(session, ctx.source_node_id, ctx.job_id, _lock_ttl())  # NodeBusy: wait our turn
    jn, _ = _source(ctx)
    driver = get_driver()
    precopied = 0
    if jn.quiesced_at is None:
        precopied = driver.prepare_snapshot(ctx.source_node_id, jn.snapshot_id)  # slow work, still serving
        with session_scope() as session:
            # Durable before the stop: from here on the source must be restarted, whatever happens.
            job_node(session, ctx.job_id, ctx.source_node_id).quiesced_at = utcnow()
    driver.quiesce(ctx.source_node_id)
    return {"precopied_bytes": precopied}


def _snapshot(ctx: StepContext) -> dict[str, Any]:
    jn, _ = _source(ctx)
    info = get_driver().snapshot(ctx.source_node_id, jn.snapshot_id)
    if _source(ctx)[0].restarted_at is not None:
        # The watchdog restarted the source while we copied: the snapshot may be torn.
        get_driver().delete_snapshot(jn.snapshot_id)
        raise PermanentDriverError("the source was restarted during the snapshot (downtime limit)")
    with session_scope() as session:
        row = session.get(Snapshot, jn.snapshot_id) or Snapshot(id=jn.snapshot_id, job_id=ctx.job_id,
                                                                source_node_id=ctx.source_node_id)
        row.state, row.method, row.size_bytes, row.window_ms = "ready", info.method, info.size_bytes, info.window_ms
        session.add(row)
    return {"method": info.method, "size_bytes": info.size_bytes, "window_ms": info.window_ms}


def _provision(ctx: StepContext) -> dict[str, Any]:
    jn, _ = _source(ctx)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.5 and done < total:
            return
        last[0] = now
        with session_scope() as session:
            row = job_node(session, ctx.job_id, ctx.source_node_id)
            row.bytes_copied, row.bytes_total = done, total
            record_event(session, session.get(CloneJob, ctx.job_id), "progress", node=ctx.node_name,
                         bytes_copied=done, bytes_total=total)
        send_progress(ctx.task, current=done, total=total, node=ctx.node_name)

    copied = get_driver().provision(jn.snapshot_id, jn.clone_node_id, progress)
    with session_scope() as session:
        session.get(Node, jn.clone_node_id).state = "provisioned"
    return {"bytes": copied}


def _assign_ips(ctx: StepContext) -> dict[str, Any]:
    jn, _ = _source(ctx)
    driver = get_driver()
    with session_scope() as session:
        clone = session.get(Node, jn.clone_node_id)
        pairs = session.execute(
            select(Node.address, JobNode.clone_node_id).join(JobNode, JobNode.source_node_id == Node.id)
            .where(JobNode.job_id == ctx.job_id)).all()
        clone_addr = {n.id: n.address for n in session.scalars(
            select(Node).where(Node.id.in_([c for _, c in pairs])))}
        address_map = {src_addr: clone_addr[clone_id] for src_addr, clone_id in pairs}
        address, port = clone.address, clone.port
    driver.assign_address(jn.clone_node_id, address, port)
    rewrites = driver.rewrite_config(jn.clone_node_id, address_map)
    driver.restart(jn.clone_node_id, get_settings().health_timeout_s)
    with session_scope() as session:
        session.get(Node, jn.clone_node_id).state = "running"
    return {"address": address, "rewrites": [
        {"node": ctx.node_name, "file": r.file, "old": r.old, "new": r.new, "count": r.count} for r in rewrites]}


@celery_app.task(name="envclone.quiesce", **TASK_OPTS)
def quiesce(self: Task, job_id: str, source_node_id: str, run: int = 1) -> None:
    run_step(self, job_id, source_node_id, "quiesce", run, _quiesce, on_failure=_restore_after_failure)


@celery_app.task(name="envclone.snapshot", **TASK_OPTS)
def snapshot(self: Task, job_id: str, source_node_id: str, run: int = 1) -> None:
    # A snapshot that fails for good restarts the source before giving up.
    run_step(self, job_id, source_node_id, "snapshot", run, _snapshot, on_failure=_restore_after_failure)


@celery_app.task(name="envclone.restart", **TASK_OPTS)
def restart(self: Task, job_id: str, source_node_id: str, run: int = 1) -> None:
    run_step(self, job_id, source_node_id, "restart", run, restore_source, always_run=True)


@celery_app.task(name="envclone.provision", **TASK_OPTS)
def provision(self: Task, job_id: str, source_node_id: str, run: int = 1) -> None:
    run_step(self, job_id, source_node_id, "provision", run, _provision)


@celery_app.task(name="envclone.assign_ips", **TASK_OPTS)
def assign_ips(self: Task, job_id: str, source_node_id: str, run: int = 1) -> None:
    run_step(self, job_id, source_node_id, "assign_ips", run, _assign_ips)
