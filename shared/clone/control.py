"""Cancel and retry: the row changes an API request makes (no filesystem work: that is the
worker's, in ``begin_run``), and preparing a run of a job before its canvas is published.

Retry resumes each node from its first step that did not succeed, stepping back where what that
step needs is gone: a snapshot needs a freshly quiesced source, provisioning needs the snapshot,
assigning addresses needs the clone's volume."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared import hosts, ipam, placement, planning
from shared.clone.events import record_event
from shared.db import retry_db, session_scope
from shared.drivers import get_driver
from shared.errors import Conflict, PlanError
from shared.models import AddressLease, CloneJob, Environment, JobNode, Node, Snapshot, StepRun, new_id, utcnow
from shared.stacks import CATALOG
from shared.states import CLONE_STEPS, EnvState, JobState, NodeState, SnapshotState, Step, StepState


def request_cancel(session: Session, job: CloneJob) -> None:
    if job.state.done:
        raise PlanError(Conflict("job_finished", f"job {job.id} already {job.state}", "job_id"))
    job.cancel_requested = True
    job.state = JobState.CANCELLING
    record_event(session, job, "job", state=JobState.CANCELLING)


def request_retry(session: Session, job: CloneJob) -> None:
    """Queue a new run of a failed job; the worker that starts the run decides where each node resumes."""
    if job.state != JobState.FAILED:
        raise PlanError(Conflict("not_failed", f"only a failed job can be retried; job {job.id} is {job.state}",
                                 "job_id"))
    target = session.get(Environment, job.target_environment_id) if job.target_environment_id else None
    if target is None:
        raise PlanError(Conflict("target_deleted", f"environment {job.target_name!r} was deleted", "job_id"))
    job.state, job.error, job.finished_at, job.cancel_requested = JobState.QUEUED, None, None, False
    job.dispatched_at = None  # the outbox: set again once the broker has it
    job.run += 1
    job.percent = 0  # a new run: percent is monotonic within a run
    target.state, target.error = EnvState.CREATING, None
    record_event(session, job, "job", state=JobState.QUEUED, retried=True)


def resume_index(states: list[StepState], snapshot_ok: bool, clone_ok: bool) -> int:
    """Where a node's steps (in CLONE_STEPS order) start again on a retry."""
    r = next((i for i, s in enumerate(states) if s != StepState.SUCCEEDED), len(states))
    if r > Step.PROVISION.seq and not clone_ok:
        r = Step.PROVISION.seq
    if r == Step.PROVISION.seq and not snapshot_ok:
        r = Step.QUIESCE.seq
    if r == Step.SNAPSHOT.seq:
        r = Step.QUIESCE.seq  # the source was restarted after the failure: quiesce it again
    return r


def _relet_address(session: Session, node: Node) -> None:
    """Lease the clone node's address again, or a new one if someone took it meanwhile."""
    held = session.get(AddressLease, node.address)
    if held is not None and held.node_id == node.id:
        return
    if (held is None and node.address not in ipam.listening_addresses()
            and ipam.try_lease(session, node.address, node_id=node.id)):
        return
    node.address = ipam.lease(session, placement.pool_of(placement.Hosts(session), node.host), 1)[0]
    ipam.bind(session, node.address, node.id)


def _resume(session: Session, job: CloneJob) -> None:
    """Reset each node's steps from where it resumes, removing what the resumed steps remake. What
    lives on this worker's own host is looked at and removed here; on another host the rows say what
    exists, a stale snapshot gets a new id (its host's sweep removes the old one) and provisioning
    replaces a stale clone volume itself."""
    driver = get_driver()
    order = {s: i for i, s in enumerate(CLONE_STEPS)}
    for jn in session.scalars(select(JobNode).where(JobNode.job_id == job.id)):
        clone, source = session.get(Node, jn.clone_node_id), session.get(Node, jn.source_node_id)
        snap = session.get(Snapshot, jn.snapshot_id)
        snap_local = hosts.is_local((snap.host if snap else None) or source.host)
        clone_local = hosts.is_local(clone.host)
        steps = sorted(session.scalars(select(StepRun).where(StepRun.job_id == job.id,
                                                             StepRun.source_node_id == jn.source_node_id)),
                       key=lambda s: order[s.step])
        snapshot_ok = (jn.snapshot_id in driver.snapshot_ids() if snap_local
                       else snap is not None and snap.state == SnapshotState.READY)
        clone_ok = jn.clone_node_id in driver.node_ids() if clone_local else clone.state.has_process
        resume = resume_index([s.state for s in steps], snapshot_ok, clone_ok)
        for step in steps[resume:]:
            step.state, step.error, step.started_at, step.finished_at = StepState.PENDING, None, None, None
            step.detail = {k: v for k, v in step.detail.items() if k != "waiting_since"}  # waits anew
        if resume <= Step.QUIESCE.seq:
            if snap_local:
                driver.delete_snapshot(jn.snapshot_id)
            else:
                if snap is not None:
                    snap.state = SnapshotState.DELETED
                jn.snapshot_id = new_id()
            jn.quiesced_at = jn.restarted_at = jn.downtime_ms = None
        if resume <= Step.PROVISION.seq:
            if clone_local:
                driver.destroy_node(jn.clone_node_id)
            jn.bytes_copied = jn.bytes_total = 0
        if resume < len(steps):
            clone.state = NodeState.PENDING
        _relet_address(session, clone)
        stack = CATALOG[clone.stack]
        clone.url = stack.url(clone.address, clone.port, clone.credentials, secret=False)


def _fail_unplanned(job_id: str, conflict: Conflict) -> None:
    with session_scope() as session:
        job = session.execute(select(CloneJob).where(CloneJob.id == job_id).with_for_update()).scalar_one()
        if job.state.done:
            return
        job.state, job.error, job.finished_at = JobState.FAILED, f"{conflict.code}: {conflict.message}", utcnow()
        target = session.get(Environment, job.target_environment_id)
        if target is not None:
            target.state, target.error = EnvState.FAILED, job.error
        record_event(session, job, "job", state=JobState.FAILED, error=job.error)


@retry_db
def materialize(job_id: str) -> bool:
    """Complete a job the API only admitted (``planning.materialize_clone``), once: a duplicate
    start finds its rows. False if the job is gone or over, or no longer fits (it is then failed
    with the conflict's code, nothing of it made)."""
    try:
        with session_scope() as session:
            job = session.execute(select(CloneJob).where(CloneJob.id == job_id).with_for_update()).scalar_one_or_none()
            if job is None or job.state.done:
                return False
            if session.scalar(select(JobNode.job_id).where(JobNode.job_id == job_id).limit(1)) is None:
                planning.materialize_clone(session, job)
            return True
    except PlanError as exc:
        _fail_unplanned(job_id, exc.conflict)
        return False


@retry_db
def begin_run(job_id: str, run: int) -> bool:
    """Claim the publishing of run ``run``'s canvas (False: it is stale, or already published).
    A run that follows a failure first resets its steps (filesystem work: only ever on a worker)."""
    with session_scope() as session:
        job = session.execute(select(CloneJob).where(CloneJob.id == job_id).with_for_update()).scalar_one_or_none()
        if job is None or job.run != run or job.canvas_run >= run:
            return False
        if job.state == JobState.QUEUED and job.run > 1:
            _resume(session, job)
        session.execute(update(CloneJob).where(CloneJob.id == job_id).values(canvas_run=run))
        return True
