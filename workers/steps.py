"""The clone's Celery tasks, one per step plus the start and the report. Each parses its arguments
and calls one function of shared.clone; Celery carries out the retries that shared.clone decides."""

from __future__ import annotations

from celery import Task, shared_task

from shared.clone import control, outcome
from shared.clone.events import record_event
from shared.clone.faults import hang_after
from shared.clone.gate import worker_id
from shared.clone.runner import run_step
from shared.config import get_settings
from shared.db import retry_db, session_scope
from shared.hosts import is_local
from shared.models import CloneJob
from shared.states import FaultPoint, Step
from workers.broker_guard import await_broker, send_progress
from workers.celery_app import TASK_OPTS
from workers.dispatcher import mark_dispatched
from workers.workflow import clone_canvas, dispatch_sweeps


def _step(task: Task, step: Step, job_id: str, source_node_id: str, run: int) -> None:
    try:
        again = run_step(job_id, source_node_id, step, run, lambda **fields: send_progress(task, **fields))
    finally:
        await_broker(task.app, get_settings().broker_wait_s)  # Celery publishes the next step now
    if again is not None:
        raise task.retry(countdown=again.delay_s, exc=again.reason)


@shared_task(name="envclone.quiesce", **TASK_OPTS)
def quiesce(self: Task, job_id: str, source_node_id: str, run: int = 1) -> None:
    _step(self, Step.QUIESCE, job_id, source_node_id, run)


@shared_task(name="envclone.snapshot", **TASK_OPTS)
def snapshot(self: Task, job_id: str, source_node_id: str, run: int = 1) -> None:
    _step(self, Step.SNAPSHOT, job_id, source_node_id, run)


@shared_task(name="envclone.restart", **TASK_OPTS)
def restart(self: Task, job_id: str, source_node_id: str, run: int = 1) -> None:
    _step(self, Step.RESTART, job_id, source_node_id, run)


@shared_task(name="envclone.provision", **TASK_OPTS)
def provision(self: Task, job_id: str, source_node_id: str, run: int = 1) -> None:
    _step(self, Step.PROVISION, job_id, source_node_id, run)


@shared_task(name="envclone.assign_ips", **TASK_OPTS)
def assign_ips(self: Task, job_id: str, source_node_id: str, run: int = 1) -> None:
    _step(self, Step.ASSIGN_IPS, job_id, source_node_id, run)


@shared_task(name="envclone.start_clone", **TASK_OPTS)
def start_clone(self: Task, job_id: str) -> None:
    """The one message a clone request publishes: prepare the job's current run, then publish its
    per-node canvas (at most once per run)."""
    mark_dispatched(CloneJob, job_id)  # the outbox: it reached a worker
    with session_scope() as session:
        job = session.get(CloneJob, job_id)
        run = job.run if job is not None else 0
    if run and control.materialize(job_id) and control.begin_run(job_id, run):
        clone_canvas(self.app, job_id, run).apply_async()


@retry_db
def _report_started(job_id: str, run: int) -> dict:
    with session_scope() as session:
        job = session.get(CloneJob, job_id)
        if job is None:
            return {}
        # An older run's report stands down silently: its event would read as progress, and the
        # watchdog, which measures stalls from the last event, would give a stuck run more time.
        if not job.state.done and job.run == run:
            record_event(session, job, "report", state="running", worker=worker_id())
        return dict(job.options)


@shared_task(name="envclone.report", **TASK_OPTS)
def report(self: Task, job_id: str, run: int = 1) -> str:
    options = _report_started(job_id, run)
    state = retry_db(outcome.finish_job)(job_id, run)
    # The other hosts of the job make their disks match (snapshots done with, a failed clone's nodes).
    dispatch_sweeps(self.app, {h for h in outcome.job_hosts(job_id) if not is_local(h)})
    hang_after(FaultPoint.REPORT, "*", self.request.retries + 1, options)
    return state
