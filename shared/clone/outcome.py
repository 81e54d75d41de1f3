"""When a job has ended and how: the report calls ``finish_job`` once every step has ended, the
watchdog calls it for a job it gives up on. A job *succeeds* only when every step of every node
succeeded and every source it stopped is back; a cancelled step makes it *cancelled*; anything else
makes it *failed*. A job that did not succeed leaves nothing behind: its partial clone (nodes,
volumes, snapshots, addresses) is removed, unless the request asked to keep it."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import hosts, identity, ipam
from shared.clone import masking, safety
from shared.clone.events import record_event
from shared.clone.sources import restart_source
from shared.db import session_scope
from shared.drivers import DriverError, get_driver
from shared.models import CloneJob, Environment, JobNode, Node, Snapshot, StepRun, utcnow
from shared.states import EnvState, JobState, NodeState, SnapshotState, Step, StepState

log = logging.getLogger("envclone.report")


def verdict(step_states: list[StepState], problems: list[str]) -> JobState:
    """The job's outcome from its steps' final states and what compensation could not fix."""
    if step_states and all(s == StepState.SUCCEEDED for s in step_states) and not problems:
        return JobState.SUCCEEDED
    if StepState.CANCELLED in step_states:
        return JobState.CANCELLED
    return JobState.FAILED


def ensure_sources_running(session: Session, job: CloneJob) -> list[str]:
    """Every source node this job stopped is brought back. Returns the problems it could not fix."""
    problems = []
    for jn in session.scalars(select(JobNode).where(JobNode.job_id == job.id).with_for_update()):
        try:
            restart_source(session, jn)
        except DriverError as exc:
            problems.append(f"{jn.name}: source could not be restarted: {exc}")
    return problems


# Removal is recorded in rows first; what lives on this worker's own host is removed at once, what
# lives elsewhere by that host's agent when its sweep runs (shared.sweep; the report asks for it).
def delete_snapshots(session: Session, job: CloneJob) -> None:
    driver = get_driver()
    for jn in session.scalars(select(JobNode).where(JobNode.job_id == job.id)):
        row = session.get(Snapshot, jn.snapshot_id)
        source = session.get(Node, jn.source_node_id)
        if hosts.is_local((row.host if row else None) or (source.host if source else None)):
            driver.delete_snapshot(jn.snapshot_id)
        if row is not None:
            row.state = SnapshotState.DELETED


def tear_down_clone(session: Session, job: CloneJob) -> None:
    """Remove the clone's nodes, volumes, snapshots and leases; keep the rows as a record."""
    driver = get_driver()
    everywhere_local = True
    for jn in session.scalars(select(JobNode).where(JobNode.job_id == job.id)):
        node = session.get(Node, jn.clone_node_id)
        if node is None or hosts.is_local(node.host):
            driver.destroy_node(jn.clone_node_id)
        else:
            everywhere_local = False
        ipam.release_node(session, jn.clone_node_id)
        if node is not None:
            node.state = NodeState.DESTROYED
    delete_snapshots(session, job)
    if job.target_environment_id and everywhere_local:
        identity.remove_account(job.target_environment_id)
    log.info("job=%s torn down the partial clone %s", job.id, job.target_name)


def job_hosts(job_id: str, session: Session | None = None) -> set[str]:
    """Every host holding a source or a clone node of the job (in the caller's session if given: on
    SQLite a second connection would wait for the caller's own write lock)."""
    query = select(Node.host).join(JobNode, (JobNode.source_node_id == Node.id) | (JobNode.clone_node_id == Node.id)
                                   ).where(JobNode.job_id == job_id)
    if session is not None:
        return set(session.scalars(query))
    with session_scope() as own:
        return set(own.scalars(query))


def finish_job(job_id: str, run: int | None = None) -> JobState:
    """Decide and record the outcome of a job whose steps have all ended. Idempotent."""
    with session_scope() as session:
        job = session.execute(select(CloneJob).where(CloneJob.id == job_id).with_for_update()).scalar_one()
        if job.state.done or (run is not None and run != job.run):
            return job.state
        steps = list(session.scalars(select(StepRun).where(StepRun.job_id == job_id)))
        target = session.get(Environment, job.target_environment_id)
        problems = ensure_sources_running(session, job)  # safety net: no source is left down
        state = verdict([s.state for s in steps], problems)
        job.leaks, job.actions = safety.collect(steps)  # whatever the outcome: what the clone held and ran
        job.masked = masking.collect(steps)
        if state == JobState.SUCCEEDED:
            if not job.options.get("retain_snapshots"):
                delete_snapshots(session, job)
            target.state = EnvState.RUNNING
            job.rewrites = [r for s in steps if s.step == Step.ASSIGN_IPS for r in s.detail.get("rewrites", [])]
        else:
            failed = [f"{s.node_name}: {s.step}: {s.error}" for s in steps if s.state == StepState.FAILED]
            job.error = "; ".join(failed + problems) or str(state)
            if not job.options.get("keep_on_failure"):
                tear_down_clone(session, job)
            target.state, target.error = EnvState.FAILED, job.error
        job.state, job.finished_at = state, utcnow()
        record_event(session, job, "job", state=state, error=job.error)
        log.info("job=%s state=%s error=%r", job_id, state, job.error)
        return state


def fail_open_steps(session: Session, job_id: str, reason: str, steps: list[Step] | None = None,
                    source_node_id: str | None = None) -> list[StepRun]:
    """Close every step of the job still open (or only ``steps`` of ``source_node_id``) as failed."""
    query = select(StepRun).where(StepRun.job_id == job_id,
                                  StepRun.state.not_in([s.value for s in StepState if s.done]))
    if steps is not None:
        query = query.where(StepRun.step.in_([s.value for s in steps]))
    if source_node_id is not None:
        query = query.where(StepRun.source_node_id == source_node_id)
    closed = list(session.scalars(query))
    for step in closed:
        step.state, step.error, step.finished_at = StepState.FAILED, reason, utcnow()
    return closed
