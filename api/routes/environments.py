"""/v1/environments: create, list, show, delete; and POST .../clones (with dry run)."""

from __future__ import annotations

import hashlib
import json

from flask import Response, jsonify, url_for
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import serialize
from api.auth import authenticate, tenant
from api.dispatch import send
from api.errors import ApiError
from api.planner import dry_run_plan
from api.schemas import (
    CloneIn,
    CredentialsOut,
    EnvironmentIn,
    EnvironmentList,
    EnvironmentOut,
    EnvPath,
    ErrorOut,
    IdempotencyHeader,
    JobOut,
    ListQuery,
    NodePath,
    PlanOut,
)
from shared import ipam
from shared.admission import admit_clone
from shared.config import get_settings
from shared.db import autocommit, session_scope
from shared.models import CloneJob, Environment, EnvironmentEvent
from shared.planning import NodeRequest, active_job, find_environment, plan_environment
from shared.stacks import CATALOG
from shared.states import EnvState
from workers.workflow import dispatch_clone, dispatch_create_environment, dispatch_delete_environment

bp = APIBlueprint("environments", __name__, url_prefix="/v1", abp_tags=[Tag(name="environments")],
                  abp_security=[{"bearer": []}],
                  abp_responses={401: ErrorOut, 422: ErrorOut})
bp.before_request(authenticate)


def _get_env(session: Session, name: str) -> Environment:
    env = find_environment(session, tenant(), name)
    if env is None:
        raise ApiError(404, "not_found", f"environment {name!r} does not exist", "name")
    return env


def _env_out(session: Session, env: Environment) -> dict:
    source = session.get(Environment, env.source_environment_id) if env.source_environment_id else None
    return serialize.to_json(EnvironmentOut.model_validate(serialize.environment(env, source.name if source else None)))


@bp.post("/environments", responses={202: EnvironmentOut, 409: ErrorOut, 503: ErrorOut})
def create_environment(body: EnvironmentIn) -> Response:
    """Create an environment; its nodes are provisioned and started by the workers."""
    if len(body.nodes) > get_settings().max_nodes:
        raise ApiError(422, "too_many_nodes", f"at most {get_settings().max_nodes} nodes", "nodes")
    requests = [NodeRequest(n.name, n.stack.value, dict(n.config), n.host) for n in body.nodes]
    try:
        with session_scope() as session:
            env = plan_environment(session, tenant(), body.name, requests,
                                   [{"cidr": str(e.cidr), "ports": e.ports} for e in body.egress],
                                   [a.stored() for a in body.on_clone])
            out, env_id = _env_out(session, env), env.id
    except IntegrityError:
        raise ApiError(409, "name_taken", f"environment {body.name!r} already exists", "name") from None

    def undo() -> None:
        with session_scope() as session:
            row = session.get(Environment, env_id)
            for node in row.nodes:
                ipam.release_node(session, node.id)
            session.delete(row)

    send(lambda celery: dispatch_create_environment(celery, env_id), undo)
    response = jsonify(out)
    response.status_code = 202
    response.headers["Location"] = url_for(".get_environment", name=body.name)
    return response


@bp.get("/environments", responses={200: EnvironmentList})
def list_environments(query: ListQuery) -> Response:
    with session_scope() as session:
        base = select(Environment).where(Environment.tenant == tenant())
        total = session.scalar(select(func.count()).select_from(base.subquery()))
        rows = session.scalars(base.order_by(Environment.name).limit(query.limit).offset(query.offset))
        return jsonify({"items": [_env_out(session, e) for e in rows], "total": total})


@bp.get("/environments/<name>", responses={200: EnvironmentOut, 404: ErrorOut})
def get_environment(path: EnvPath) -> Response:
    with session_scope() as session:
        return jsonify(_env_out(session, _get_env(session, path.name)))


@bp.get("/environments/<name>/nodes/<node>/credentials", responses={200: CredentialsOut, 404: ErrorOut})
def node_credentials(path: NodePath) -> Response:
    """The one call that hands out a node's credentials (its full URL included); every call is
    recorded as an event of the environment."""
    with session_scope() as session:
        env = _get_env(session, path.name)
        node = next((n for n in env.nodes if n.name == path.node), None)
        if node is None:
            raise ApiError(404, "not_found", f"node {path.node!r} does not exist in {path.name!r}", "node")
        if not node.credentials:
            raise ApiError(404, "no_credentials", f"a {node.stack} node has no credentials", "node")
        session.add(EnvironmentEvent(environment_id=env.id, kind="credentials_read",
                                     message=f"credentials of node {node.name} read by tenant {tenant()}"))
        stack = CATALOG[node.stack]
        return jsonify({"username": node.credentials.get("username"), "password": node.credentials["password"],
                        "url": stack.url(node.address, node.port, node.credentials, secret=True)})


@bp.delete("/environments/<name>", responses={202: EnvironmentOut, 404: ErrorOut, 409: ErrorOut})
def delete_environment(path: EnvPath) -> Response:
    """Stop and destroy the environment's nodes and free their addresses. 409 while a job uses it."""
    with session_scope() as session:
        env = _get_env(session, path.name)
        busy = active_job(session, env.id)
        if busy is not None:
            raise ApiError(409, "busy", f"job {busy.id} is using environment {path.name!r}", "name")
        previous_state = env.state
        env.state, env.dispatched_at = EnvState.DELETING, None
        out, env_id = _env_out(session, env), env.id

    def undo() -> None:
        with session_scope() as session:
            session.get(Environment, env_id).state = previous_state

    send(lambda celery: dispatch_delete_environment(celery, env_id), undo)
    response = jsonify(out)
    response.status_code = 202
    return response


def _request_hash(source: str, body: CloneIn) -> str:
    canonical = json.dumps({"source": source, **body.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _job_by_key(session: Session, key: str) -> CloneJob | None:
    return session.scalar(select(CloneJob).where(CloneJob.tenant == tenant(), CloneJob.idempotency_key == key))


def _job_response(job: CloneJob, status: int, target: Environment | None = None) -> Response:
    response = jsonify(serialize.to_json(JobOut.model_validate(serialize.job(job, target))))
    response.status_code = status
    response.headers["Location"] = url_for("jobs.get_job", job_id=job.id)
    return response


@bp.post("/environments/<name>/clones",
         responses={200: PlanOut, 202: JobOut, 404: ErrorOut, 409: ErrorOut, 503: ErrorOut})
def clone_environment(path: EnvPath, body: CloneIn, header: IdempotencyHeader) -> Response:
    """Clone an environment. `dry_run: true` answers 200 with the plan and touches nothing.
    An `Idempotency-Key` makes a retried request return the same job instead of a second clone."""
    settings = get_settings()
    if body.faults and not settings.fault_injection:
        raise ApiError(422, "fault_injection_disabled", "fault injection is not enabled on this server", "faults")
    if body.dry_run:
        with session_scope() as session:
            plan = dry_run_plan(session, tenant(), path.name, body.name, body.consistency,
                                [a.stored() for a in body.on_clone], body.on_leak, [m.stored() for m in body.mask],
                                body.target_host, dict(body.placement))
            return jsonify(serialize.to_json(PlanOut.model_validate(plan)))
    key = header.idempotency_key
    digest = _request_hash(path.name, body) if key else None  # only a retried request is compared
    if key:
        with session_scope() as session:
            existing = _job_by_key(session, key)
            if existing is not None:
                if existing.request_hash != digest:
                    raise ApiError(409, "idempotency_key_reused",
                                   "this Idempotency-Key was used with a different request", "Idempotency-Key")
                return _job_response(existing, 202)
    options = body.model_dump(mode="json", include={"keep_on_failure", "retain_snapshots", "rename_db_users",
                                                    "consistency", "on_leak", "target_host", "placement"},
                              exclude_defaults=False)
    if body.on_clone:
        options["on_clone"] = [a.stored() for a in body.on_clone]
    if body.mask:
        options["mask"] = [m.stored() for m in body.mask]
        if body.mask_seed:
            options["mask_seed"] = body.mask_seed  # else admit_clone draws one per job
    if body.faults:
        options["faults"] = [f.model_dump() for f in body.faults]
    try:
        with autocommit() as conn:  # on PostgreSQL: two reads and one write, no BEGIN or COMMIT
            job, target = admit_clone(conn, tenant(), path.name, body.name, options, idempotency=(key, digest))
            job_id = job.id
            response = _job_response(job, 202, target)  # what it is once sent: queued
    except IntegrityError:
        # A concurrent request with the same key (or target name) won the race.
        with session_scope() as session:
            existing = _job_by_key(session, key) if key else None
            if existing is not None and existing.request_hash == digest:
                return _job_response(existing, 202)
        raise ApiError(409, "conflict", "a concurrent request conflicts with this one", "name") from None

    def undo() -> None:  # an admitted job has no nodes or leases yet: its two rows are all there is
        with session_scope() as session:
            job = session.get(CloneJob, job_id)
            session.execute(delete(Environment).where(Environment.id == job.target_environment_id))
            session.delete(job)

    send(lambda celery: dispatch_clone(celery, job_id), undo)
    return response
