"""/v1/jobs: show, list, cancel, retry, and a Server-Sent Events stream of a job's progress."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

from flask import Response, current_app, jsonify, request, stream_with_context, url_for
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy import Row, func, select
from sqlalchemy.orm import Session

from api import serialize, streams
from api.auth import authenticate, tenant
from api.dispatch import send
from api.errors import ApiError
from api.schemas import ErrorOut, EventsHeader, EventsQuery, JobList, JobOut, JobPath, JobQuery
from api.stream_hub import Hub, read_events
from api.streams import Slot, StreamLimiter
from shared.clone.control import request_cancel, request_retry
from shared.db import session_scope
from shared.models import CloneJob, utcnow
from shared.states import JobState
from workers.workflow import dispatch_clone

bp = APIBlueprint("jobs", __name__, url_prefix="/v1", abp_tags=[Tag(name="jobs")], abp_security=[{"bearer": []}],
                  abp_responses={401: ErrorOut, 422: ErrorOut})
bp.before_request(authenticate)

SSE_KEEPALIVE_S = 15.0
SSE_CHECK_S = 1.0  # how often a waiting stream looks at its client, its slot and its clock


def _get_job(session: Session, job_id: str) -> CloneJob:
    job = session.get(CloneJob, job_id)
    if job is None or job.tenant != tenant():
        raise ApiError(404, "not_found", f"job {job_id} does not exist", "job_id")
    return job


def _job_json(job: CloneJob) -> dict:
    return serialize.to_json(JobOut.model_validate(serialize.job(job)))


def _accepted(job: CloneJob) -> Response:
    response = jsonify(_job_json(job))
    response.status_code = 202
    response.headers["Location"] = url_for(".get_job", job_id=job.id)
    return response


@bp.get("/jobs/<job_id>", responses={200: JobOut, 404: ErrorOut})
def get_job(path: JobPath) -> Response:
    with session_scope() as session:
        return jsonify(_job_json(_get_job(session, path.job_id)))


@bp.get("/jobs", responses={200: JobList})
def list_jobs(query: JobQuery) -> Response:
    with session_scope() as session:
        base = select(CloneJob).where(CloneJob.tenant == tenant())
        if query.state:
            base = base.where(CloneJob.state == query.state)
        if query.environment:
            base = base.where((CloneJob.source_name == query.environment) | (CloneJob.target_name == query.environment))
        total = session.scalar(select(func.count()).select_from(base.subquery()))
        rows = session.scalars(base.order_by(CloneJob.created_at.desc(), CloneJob.id).limit(query.limit)
                               .offset(query.offset))
        return jsonify({"items": [_job_json(j) for j in rows], "total": total})


@bp.post("/jobs/<job_id>/cancel", responses={202: JobOut, 404: ErrorOut, 409: ErrorOut})
def cancel_job(path: JobPath) -> Response:
    """Stop at the next step boundary: quiesced sources are restarted, the partial clone torn down."""
    with session_scope() as session:
        job = _get_job(session, path.job_id)
        request_cancel(session, job)
        return _accepted(job)


@bp.post("/jobs/<job_id>/retry", responses={202: JobOut, 404: ErrorOut, 409: ErrorOut, 503: ErrorOut})
def retry_job(path: JobPath) -> Response:
    """Resume a failed job from its failed steps, reusing what succeeded and still exists."""
    with session_scope() as session:
        job = _get_job(session, path.job_id)
        request_retry(session, job)

    def undo() -> None:
        with session_scope() as session:
            row = session.get(CloneJob, path.job_id)
            row.state, row.error, row.finished_at = JobState.FAILED, "retry could not be dispatched", utcnow()

    send(lambda celery: dispatch_clone(celery, path.job_id), undo)
    with session_scope() as session:
        return _accepted(session.get(CloneJob, path.job_id))


def _sse(event: Row[Any]) -> str:
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(event.data, default=str)}\n\n"


@bp.get("/jobs/<job_id>/events", responses={404: ErrorOut, 429: ErrorOut, 503: ErrorOut})
def job_events(path: JobPath, query: EventsQuery, header: EventsHeader) -> Response:
    """Server-Sent Events: one per step transition and progress update; ends with `end` when the job
    ends. Resumable: send `Last-Event-ID` (or `?last_event_id=`). A stream lasts at most
    ENVCLONE_MAX_STREAM_S, then ends with `resume` (data: `last_event_id`): reconnect with it. A
    tenant has at most ENVCLONE_MAX_STREAMS_PER_TENANT streams open; beyond, 429 with Retry-After."""
    with session_scope() as session:
        _get_job(session, path.job_id)
    start = int(header.last_event_id or query.last_event_id or 0)  # validated: ASCII digits
    limiter: StreamLimiter = current_app.extensions["streams"]
    slot = limiter.acquire(tenant())
    client = request.environ.get("gunicorn.socket")

    def stream() -> Iterator[str]:
        try:
            yield ": open\n\n"  # the headers go out now, not with the first event
            yield from _events(current_app.extensions["stream_hub"], path.job_id, start, limiter.max_stream_s,
                               slot, client)
        finally:
            slot.release()

    response = Response(stream_with_context(stream()), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.call_on_close(slot.release)  # also when the stream never started
    return response


def _events(hub: Hub, job_id: str, last: int, max_s: float, slot: Slot,
            client: socket.socket | None) -> Iterator[str]:
    opened = beat = time.monotonic()
    follower, upto = hub.follow(job_id, last)
    try:
        for event in read_events(job_id, last, upto):  # the past straight from the database, then the hub
            yield _sse(event)
        while True:
            left = max_s - (time.monotonic() - opened)
            if left <= 0:
                slot.release()  # before the client can reconnect
                yield f"event: resume\ndata: {json.dumps({'last_event_id': follower.last})}\n\n"
                return
            slot.keep()
            events, state = hub.next(follower, timeout=min(SSE_CHECK_S, left))
            for event in events:
                yield _sse(event)
            if events:
                beat = time.monotonic()
                continue
            if state is not None and JobState(state).done:
                yield f"event: end\ndata: {json.dumps({'state': state})}\n\n"
                return
            if time.monotonic() - beat > SSE_KEEPALIVE_S:
                beat = time.monotonic()
                yield ": keepalive\n\n"
            if streams.peer_closed(client):
                return
    finally:
        hub.unfollow(follower)
