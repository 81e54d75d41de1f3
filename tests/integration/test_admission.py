"""A clone request is admitted, not planned: the API writes the job and its target environment
(one statement) and publishes the start task; the worker that takes it writes the nodes, leases
and steps. What only that exact allocation can find fails the job with the conflict's code and
leaves nothing leased. Real PostgreSQL, Redis and worker, through Flask's test client."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, event, func, select

from api import create_app
from api.auth import create_token
from shared import ipam
from shared.db import get_engine, session_scope
from shared.models import AddressLease, JobNode, Node, StepRun
from tests.api_client import Api
from tests.helpers import wait_for
from tests.stack import Backend
from tests.workflow_client import create_environment, delete_environment, lease_count

pytestmark = pytest.mark.integration

POOL = "127.91.0.0/29"  # six addresses: small enough to run dry on purpose
BACKEND = {"pool": POOL}


def _rows(model: type, **where: str) -> int:
    with session_scope() as session:
        query = select(func.count()).select_from(model)
        for key, value in where.items():
            query = query.where(getattr(model, key) == value)
        return session.scalar(query)


def _job(api: Api, job_id: str) -> dict:
    return wait_for(lambda: (j := api.get(f"/v1/jobs/{job_id}").json)["state"] in
                    ("succeeded", "failed", "cancelled") and j, timeout=180, what=f"job {job_id}")


def test_request_writes_the_job_and_the_worker_the_rest(backend: Backend) -> None:
    create_environment("adm", [{"name": "cache", "stack": "valkey"}])
    api = Api(create_app().test_client(), create_token("acme"))
    backend.stop_worker()  # the request alone: nothing takes the start task yet
    statements: list[str] = []

    def seen(_conn, _cursor, statement: str, *_args) -> None:
        statements.append(statement)

    event.listen(get_engine(), "before_cursor_execute", seen)
    try:
        response = api.post("/v1/environments/adm/clones", {"name": "adm-copy"})
    finally:
        event.remove(get_engine(), "before_cursor_execute", seen)
    assert response.status_code == 202, response.json
    job = response.json
    assert job["state"] == "queued" and job["nodes"] == []
    # The token and the source (its nodes and their hosts with it) read, the token's last use noted,
    # and both rows, the job and its target environment, written by one statement: four round trips.
    # No lease, node or step yet.
    assert [s.split(None, 1)[0] for s in statements] == ["SELECT", "UPDATE", "SELECT", "WITH"]
    assert "INSERT INTO environments" in statements[-1] and "INSERT INTO clone_jobs" in statements[-1]
    assert _rows(Node) == 1 and _rows(JobNode) == 0 and _rows(StepRun) == 0 and lease_count() == 1

    backend.start_worker()
    done = _job(api, job["id"])
    assert done["state"] == "succeeded", done
    assert [n["name"] for n in done["nodes"]] == ["cache"]
    assert [s["state"] for s in done["nodes"][0]["steps"]] == ["succeeded"] * 5
    assert lease_count() == 2
    delete_environment("adm-copy")
    delete_environment("adm")


def test_a_pool_run_dry_since_admission_fails_the_job_and_leaks_nothing(backend: Backend) -> None:
    create_environment("dry", [{"name": "cache", "stack": "valkey"}])
    api = Api(create_app().test_client(), create_token("acme"))
    backend.stop_worker()
    job_id = api.post("/v1/environments/dry/clones", {"name": "dry-copy"}).json["id"]
    with session_scope() as session:  # someone takes every address left before a worker starts it
        taken = ipam.lease(session, POOL, ipam.free_count(session, POOL))
    backend.start_worker()
    failed = _job(api, job_id)
    assert failed["state"] == "failed" and failed["error"].startswith("pool_exhausted: "), failed
    assert failed["nodes"] == []
    target = api.get("/v1/environments/dry-copy").json
    assert target["state"] == "failed" and target["nodes"] == [] and target["error"] == failed["error"]
    assert _rows(AddressLease, job_id=job_id) == 0 and _rows(JobNode, job_id=job_id) == 0

    # Addresses free again: a retry plans the job then and completes it.
    with session_scope() as session:
        session.execute(delete(AddressLease).where(AddressLease.address.in_(taken)))
    assert api.post(f"/v1/jobs/{job_id}/retry").status_code == 202
    retried = _job(api, job_id)
    assert retried["state"] == "succeeded", retried
    assert api.get("/v1/environments/dry-copy").json["state"] == "running"
    delete_environment("dry-copy")
    delete_environment("dry")
    assert lease_count() == 0
