"""The watchdog, run by celery beat every few seconds. It keeps the promises that must hold even
when workers die, the broker blinks or a step hangs:

* a source node quiesced longer than ENVCLONE_MAX_DOWNTIME_S is restarted, its step marked failed;
* a job with no progress for ENVCLONE_JOB_STALL_S is re-dispatched (its steps are idempotent and
  tasks of the older dispatch stand down); after ENVCLONE_MAX_RESUMES it is reaped: failed, with the
  report's compensation;
* a node the database says runs but whose process died is restarted, and the event recorded;
* the outbox: what was committed but never reached the broker is sent."""

from __future__ import annotations

import logging
from datetime import timedelta

import redis
from celery import Task
from sqlalchemy import func, select

from shared import locks
from shared.config import get_settings
from shared.db import session_scope
from shared.drivers import DriverError, get_driver
from shared.models import (
    ENV_RUNNING,
    JOB_DONE_STATES,
    STEP_DONE_STATES,
    STEP_FAILED,
    CloneJob,
    Environment,
    EnvironmentEvent,
    JobEvent,
    JobNode,
    Node,
    StepRun,
    utcnow,
)
from shared.progress import record_event
from workers.celery_app import celery_app
from workers.dispatcher import send_pending
from workers.report import finish_job
from workers.workflow import dispatch_clone, dispatch_create_environment, dispatch_delete_environment

log = logging.getLogger("envclone.watchdog")


def restart_overdue_sources() -> int:
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.max_downtime_s)
    driver, fixed = get_driver(), 0
    with session_scope() as session:
        overdue = session.execute(
            select(JobNode, CloneJob).join(CloneJob, CloneJob.id == JobNode.job_id)
            .where(JobNode.quiesced_at < cutoff, JobNode.restarted_at.is_(None),
                   CloneJob.state.not_in(JOB_DONE_STATES))).all()
        for jn, job in overdue:
            try:
                driver.restart(jn.source_node_id, settings.health_timeout_s)
            except DriverError as exc:
                log.error("job=%s node=%s watchdog could not restart the source: %s", job.id, jn.name, exc)
                continue
            jn.restarted_at = utcnow()
            jn.downtime_ms = int((jn.restarted_at - jn.quiesced_at).total_seconds() * 1000)
            locks.release(session, jn.source_node_id, job.id)
            reason = f"watchdog: source was down longer than {settings.max_downtime_s:.0f}s; restarted"
            for step in session.scalars(select(StepRun).where(
                    StepRun.job_id == job.id, StepRun.source_node_id == jn.source_node_id,
                    StepRun.step.in_(["quiesce", "snapshot"]), StepRun.state.not_in(STEP_DONE_STATES))):
                step.state, step.error, step.finished_at = STEP_FAILED, reason, utcnow()
                record_event(session, job, "step", node=jn.name, step=step.step, state=STEP_FAILED, error=reason)
            log.warning("job=%s node=%s %s", job.id, jn.name, reason)
            fixed += 1
    return fixed


def resume_or_reap_stalled_jobs() -> tuple[int, int]:
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.resolved_job_stall_s)
    resumed = reaped = 0
    with session_scope() as session:
        last = (select(JobEvent.job_id, func.max(JobEvent.at).label("at")).group_by(JobEvent.job_id).subquery())
        stalled = list(session.execute(
            select(CloneJob.id).outerjoin(last, last.c.job_id == CloneJob.id)
            .where(CloneJob.state.not_in(JOB_DONE_STATES), CloneJob.dispatched_at.is_not(None),
                   func.coalesce(last.c.at, CloneJob.created_at) < cutoff)).scalars())
    for job_id in stalled:
        with session_scope() as session:
            job = session.execute(select(CloneJob).where(CloneJob.id == job_id).with_for_update()).scalar_one()
            resumes = session.scalar(select(func.count()).where(JobEvent.job_id == job_id, JobEvent.kind == "resumed"))
            if resumes < settings.max_resumes:
                job.run += 1  # tasks of the older dispatch now stand down
                record_event(session, job, "resumed", reason=f"no progress for {settings.resolved_job_stall_s:.0f}s")
                action = "resume"
            else:
                reason = f"reaped: no progress for {settings.resolved_job_stall_s:.0f}s after {resumes} resumes"
                for step in session.scalars(select(StepRun).where(StepRun.job_id == job_id,
                                                                  StepRun.state.not_in(STEP_DONE_STATES))):
                    step.state, step.error, step.finished_at = STEP_FAILED, reason, utcnow()
                action = "reap"
        if action == "resume":
            dispatch_clone(job_id)
            resumed += 1
        else:
            finish_job(job_id)
            reaped += 1
        log.warning("job=%s stalled: %s", job_id, action)
    return resumed, reaped


def reconcile_nodes() -> int:
    """Restart nodes that should run but do not (not those a job is holding down on purpose)."""
    settings = get_settings()
    driver, fixed = get_driver(), 0
    with session_scope() as session:
        held = locks.held(session)
        down_on_purpose = set(session.scalars(select(JobNode.source_node_id).where(
            JobNode.quiesced_at.is_not(None), JobNode.restarted_at.is_(None))))
        rows = session.execute(select(Node, Environment).join(Environment, Environment.id == Node.environment_id)
                               .where(Node.state == "running", Environment.state == ENV_RUNNING)).all()
        for node, env in rows:
            if node.id in held or node.id in down_on_purpose or driver.health(node.id).running:
                continue
            try:
                driver.restart(node.id, settings.health_timeout_s)
                message = f"node {node.name} was not running; restarted"
            except DriverError as exc:
                message = f"node {node.name} was not running; restart failed: {exc}"
            session.add(EnvironmentEvent(environment_id=env.id, kind="node_restarted", message=message))
            log.warning("env=%s node=%s %s", env.name, node.name, message)
            fixed += 1
    return fixed


def run_once() -> dict[str, int]:
    sources = restart_overdue_sources()
    resumed, reaped = resume_or_reap_stalled_jobs()
    nodes = reconcile_nodes()
    sent = send_pending(dispatch_clone, dispatch_create_environment, dispatch_delete_environment)
    return {"sources_restarted": sources, "jobs_resumed": resumed, "jobs_reaped": reaped,
            "nodes_restarted": nodes, "dispatched": sent}


@celery_app.task(name="envclone.watchdog", bind=True, ignore_result=True)
def watchdog(self: Task) -> dict[str, int] | None:
    # One watchdog at a time, whatever the number of workers and however long a round takes.
    client = redis.Redis.from_url(get_settings().broker_url)
    lock = client.lock("envclone:watchdog", timeout=300, blocking=False)
    if not lock.acquire(blocking=False):
        return None
    try:
        return run_once()
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass
