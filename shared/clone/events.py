"""Job events and the job's overall percent. Workers write them; the API, SSE and the CLI read them.
Percent is derived from step states and bytes copied, and never goes backwards within a run."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import CloneJob, JobEvent, JobNode, StepRun
from shared.states import JobState, Step, StepState


def percent(steps: Iterable[tuple[str, Step, StepState]], copied: Mapping[str, float], job_state: JobState) -> int:
    """``steps``: (source node id, step, state) of every step; ``copied``: the fraction of bytes
    provisioned per source node. The report counts as one more step: 100 only once the job ended."""
    if JobState(job_state).done:
        return 100
    steps = list(steps)
    done = 0.0
    for node_id, step, state in steps:
        if StepState(state).done:
            done += 1
        elif step == Step.PROVISION and state == StepState.RUNNING:
            done += min(1.0, copied.get(node_id, 0.0))
    return min(99, int(100 * done / (len(steps) + 1)))


def update_percent(session: Session, job: CloneJob) -> int:
    steps = [(s.source_node_id, s.step, s.state)
             for s in session.scalars(select(StepRun).where(StepRun.job_id == job.id))]
    copied = {n.source_node_id: n.bytes_copied / n.bytes_total
              for n in session.scalars(select(JobNode).where(JobNode.job_id == job.id)) if n.bytes_total}
    job.percent = max(job.percent or 0, percent(steps, copied, job.state))
    return job.percent


def record_event(session: Session, job: CloneJob, kind: str, **data: Any) -> None:
    """Append an event carrying the job's state and (freshly computed) percent at that moment.

    The job row is locked first: events of one job are written one transaction at a time, each
    seeing the steps the previous one committed, so event ids and percents rise together."""
    session.flush()  # the step rows just changed count towards the percent
    session.execute(select(CloneJob).where(CloneJob.id == job.id).with_for_update()
                    .execution_options(populate_existing=True)).scalar_one()
    value = update_percent(session, job)
    session.add(JobEvent(job_id=job.id, kind=kind, data={**data, "job_state": job.state, "percent": value,
                                                          "run": job.run}))
