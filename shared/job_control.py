"""Cancel and retry of clone jobs: the row changes the API makes before (re)dispatching.

Retry resumes each node from its first step that did not succeed, stepping back where what that
step needs is gone: a snapshot needs a freshly quiesced source, provisioning needs the snapshot,
assigning addresses needs the clone's volume."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared import ipam
from shared.config import get_settings
from shared.drivers import get_driver
from shared.models import (
    CLONE_STEPS,
    ENV_CREATING,
    JOB_CANCELLING,
    JOB_DONE_STATES,
    JOB_FAILED,
    JOB_QUEUED,
    STEP_PENDING,
    STEP_SUCCEEDED,
    AddressLease,
    CloneJob,
    Environment,
    Node,
    StepRun,
)
from shared.planning import Conflict, PlanError
from shared.progress import record_event

QUIESCE, SNAPSHOT, RESTART, PROVISION, ASSIGN = range(len(CLONE_STEPS))


def request_cancel(session: Session, job: CloneJob) -> None:
    if job.state in JOB_DONE_STATES:
        raise PlanError(Conflict("job_finished", f"job {job.id} already {job.state}", "job_id"))
    job.cancel_requested = True
    job.state = JOB_CANCELLING
    record_event(session, job, "job", state=JOB_CANCELLING)


def _resume_index(steps: list[StepRun], snapshot_ok: bool, clone_ok: bool) -> int:
    r = next((i for i, s in enumerate(steps) if s.state != STEP_SUCCEEDED), len(steps))
    if r > PROVISION and not clone_ok:
        r = PROVISION
    if r == PROVISION and not snapshot_ok:
        r = QUIESCE
    if r == SNAPSHOT:
        r = QUIESCE  # the source was restarted after the failure: quiesce it again
    return r


def _relet_address(session: Session, node: Node) -> None:
    """Lease the clone node's address again, or a new one if someone took it meanwhile."""
    held = session.get(AddressLease, node.address)
    if held is not None and held.node_id == node.id:
        return
    if (held is None and node.address not in ipam.listening_addresses()
            and ipam.try_lease(session, node.address, node_id=node.id)):
        return
    node.address = ipam.lease(session, get_settings().address_pool, 1)[0]
    ipam.bind(session, node.address, node.id)


def prepare_retry(session: Session, job: CloneJob) -> None:
    if job.state != JOB_FAILED:
        raise PlanError(Conflict("not_failed", f"only a failed job can be retried; job {job.id} is {job.state}",
                                 "job_id"))
    target = session.get(Environment, job.target_environment_id) if job.target_environment_id else None
    if target is None:
        raise PlanError(Conflict("target_deleted", f"environment {job.target_name!r} was deleted", "job_id"))
    driver = get_driver()
    snapshots, volumes = driver.snapshot_ids(), driver.node_ids()
    for jn in job.nodes:
        steps = sorted((s for s in job.steps if s.source_node_id == jn.source_node_id),
                       key=lambda s: CLONE_STEPS.index(s.step))
        resume = _resume_index(steps, jn.snapshot_id in snapshots, jn.clone_node_id in volumes)
        for step in steps[resume:]:
            step.state, step.error, step.started_at, step.finished_at = STEP_PENDING, None, None, None
        if resume <= QUIESCE:
            driver.delete_snapshot(jn.snapshot_id)
            jn.quiesced_at = jn.restarted_at = jn.downtime_ms = None
        if resume <= PROVISION:
            driver.destroy_node(jn.clone_node_id)
            jn.bytes_copied = jn.bytes_total = 0
        clone = session.get(Node, jn.clone_node_id)
        if resume < len(steps):
            clone.state = "pending"
        _relet_address(session, clone)
    job.state, job.error, job.finished_at, job.cancel_requested = JOB_QUEUED, None, None, False
    job.dispatched_at = None  # the outbox: set again once the broker has it
    job.run += 1
    job.percent = 0  # a new run: percent is monotonic within a run
    target.state, target.error = ENV_CREATING, None
    record_event(session, job, "job", state=JOB_QUEUED, retried=True)
