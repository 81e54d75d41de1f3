"""The report: the chord's callback. It reads the database (never group results), decides the
job's outcome, and cleans up: snapshots on success, the whole partial clone on failure."""

from __future__ import annotations

import logging

from celery import Task
from sqlalchemy import select

from shared.db import session_scope
from shared.models import (
    ENV_FAILED,
    ENV_RUNNING,
    JOB_CANCELLED,
    JOB_DONE_STATES,
    JOB_FAILED,
    JOB_SUCCEEDED,
    STEP_CANCELLED,
    STEP_FAILED,
    STEP_SUCCEEDED,
    CloneJob,
    Environment,
    StepRun,
    utcnow,
)
from shared.progress import record_event
from workers.celery_app import celery_app
from workers.compensation import delete_snapshots, ensure_sources_running, tear_down_clone
from workers.step_runner import inject_hang, worker_id
from workers.steps import TASK_OPTS

log = logging.getLogger("envclone.report")


def finish_job(job_id: str, run: int | None = None) -> str:
    """Decide and record the outcome of a job whose steps have all ended. Idempotent."""
    with session_scope() as session:
        job = session.execute(select(CloneJob).where(CloneJob.id == job_id).with_for_update()).scalar_one()
        if job.state in JOB_DONE_STATES or (run is not None and run != job.run):
            return job.state
        steps = list(session.scalars(select(StepRun).where(StepRun.job_id == job_id)))
        target = session.get(Environment, job.target_environment_id)
        problems = ensure_sources_running(session, job)  # safety net: no source is left down
        if all(s.state == STEP_SUCCEEDED for s in steps) and not problems:
            state = JOB_SUCCEEDED
            if not job.options.get("retain_snapshots"):
                delete_snapshots(session, job)
            target.state = ENV_RUNNING
            job.rewrites = [r for s in steps if s.step == "assign_ips" for r in s.detail.get("rewrites", [])]
        else:
            cancelled = any(s.state == STEP_CANCELLED for s in steps)
            state = JOB_CANCELLED if cancelled else JOB_FAILED
            failed = [f"{s.node_name}: {s.step}: {s.error}" for s in steps if s.state == STEP_FAILED]
            job.error = "; ".join(failed + problems) or ("cancelled" if cancelled else "failed")
            if not job.options.get("keep_on_failure"):
                tear_down_clone(session, job)
            target.state, target.error = ENV_FAILED, job.error
        job.state, job.finished_at = state, utcnow()
        record_event(session, job, "job", state=state, error=job.error)
        log.info("job=%s state=%s error=%r", job_id, state, job.error)
        return state


@celery_app.task(name="envclone.report", **TASK_OPTS)
def report(self: Task, job_id: str, run: int = 1) -> str:
    with session_scope() as session:
        job = session.get(CloneJob, job_id)
        options, attempt = (dict(job.options), self.request.retries + 1) if job else ({}, 1)
        if job is not None and job.state not in JOB_DONE_STATES:
            record_event(session, job, "report", state="running", worker=worker_id())
    state = finish_job(job_id, run)
    inject_hang("report", "*", attempt, options)
    return state
