"""Job events and the job's overall percent. Workers write them; the API, SSE, CLI and dashboard
read them. Percent is derived from step states and bytes copied, and never goes backwards."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import JOB_DONE_STATES, STEP_DONE_STATES, CloneJob, JobEvent, JobNode, StepRun


def record_event(session: Session, job: CloneJob, kind: str, **data: Any) -> None:
    """Append an event carrying the job's state and (freshly computed) percent at that moment.

    The job row is locked first: events of one job are written one transaction at a time, each
    seeing the steps the previous one committed, so event ids and percents rise together."""
    session.flush()  # the step rows just changed count towards the percent
    session.execute(select(CloneJob).where(CloneJob.id == job.id).with_for_update()
                    .execution_options(populate_existing=True)).scalar_one()
    percent = update_percent(session, job)
    session.add(JobEvent(job_id=job.id, kind=kind, data={**data, "job_state": job.state, "percent": percent,
                                                          "run": job.run}))


def update_percent(session: Session, job: CloneJob) -> int:
    steps = list(session.scalars(select(StepRun).where(StepRun.job_id == job.id)))
    nodes = {n.source_node_id: n for n in session.scalars(select(JobNode).where(JobNode.job_id == job.id))}
    total = len(steps) + 1  # + the report
    done = 0.0
    for step in steps:
        if step.state in STEP_DONE_STATES:
            done += 1
        elif step.step == "provision" and step.state == "running":
            node = nodes.get(step.source_node_id)
            if node is not None and node.bytes_total:
                done += min(1.0, node.bytes_copied / node.bytes_total)
    if job.state in JOB_DONE_STATES:
        value = 100
    else:
        value = min(99, int(100 * done / total))
    job.percent = max(job.percent or 0, value)
    return job.percent
