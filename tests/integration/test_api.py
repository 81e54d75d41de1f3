"""The HTTP contract through Flask's test client, against a real back end (PostgreSQL, Redis, a
real worker, real nodes)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from api import create_app
from api.auth import create_token
from shared.db import session_scope
from shared.drivers import get_driver
from shared.models import JobEvent, StepRun
from tests.api_client import Api
from tests.helpers import wait_for
from tests.stack import Backend
from tests.workflow_client import SHOP as SHOP_NODES
from tests.workflow_client import lease_count, valkey_at

pytestmark = pytest.mark.integration

SHOP = {"name": "shop", "nodes": SHOP_NODES}
SOLO = {"name": "solo", "nodes": [{"name": "cache", "stack": "valkey"}]}


BACKEND = {"pool": "127.95.0.0/16"}


@pytest.fixture(scope="module")
def app(backend: Backend):
    return create_app()


@pytest.fixture(scope="module")
def api(app) -> Api:
    return Api(app.test_client(), create_token("acme"))


@pytest.fixture(scope="module")
def other(app) -> Api:
    return Api(app.test_client(), create_token("globex"))


@pytest.fixture
def clean(api: Api, backend: Backend) -> Iterator[Api]:
    yield api
    for env in api.get("/v1/environments").json["items"]:
        assert api.delete(f"/v1/environments/{env['name']}").status_code == 202
    wait_for(lambda: api.get("/v1/environments").json["total"] == 0, timeout=60, what="environments deleted")
    assert backend.volumes() == set() and backend.snapshots() == set()
    assert backend.processes() == [] and lease_count() == 0


@pytest.fixture
def both(clean: Api, other: Api) -> Iterator[tuple[Api, Api]]:
    """Tenants acme and globex. Afterwards every job of either has ended and globex's environments are
    deleted (then ``clean`` deletes acme's and checks that nothing is left)."""
    yield clean, other
    for tenant_api in (clean, other):
        wait_for(lambda t=tenant_api: all(j["state"] in ("succeeded", "failed", "cancelled")
                                          for j in t.get("/v1/jobs?limit=100").json["items"]),
                 timeout=180, what="every job ended")
    for env in other.get("/v1/environments").json["items"]:
        assert other.delete(f"/v1/environments/{env['name']}").status_code == 202
    wait_for(lambda: other.get("/v1/environments").json["total"] == 0, timeout=60, what="globex environments deleted")


@pytest.fixture
def quiet_server(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The app logs no error (no traceback) while the test runs."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


def assert_error(response, status: int, field: str, code: str | None = None) -> dict:
    """The one error shape, naming ``field``."""
    assert response.status_code == status, (response.status_code, response.data[:300])
    error = response.json["error"]
    assert set(error) >= {"code", "message", "field"} and error["message"]
    assert error["field"] == field, error
    if code is not None:
        assert error["code"] == code, error
    return error


def make_env(api: Api, body: dict) -> dict:
    response = api.post("/v1/environments", body)
    assert response.status_code == 202, response.json
    assert response.json["state"] == "creating"
    assert response.headers["Location"] == f"/v1/environments/{body['name']}"
    return wait_for(lambda: (e := api.get(f"/v1/environments/{body['name']}").json)["state"] == "running" and e,
                    timeout=120, what="environment running")


def wait_job(api: Api, job_id: str, timeout: float = 180) -> dict:
    return wait_for(lambda: (j := api.get(f"/v1/jobs/{job_id}").json)["state"] in
                    ("succeeded", "failed", "cancelled") and j, timeout=timeout, what=f"job {job_id}")


# ---- auth and bad input ---------------------------------------------------------------------------------
def test_auth_failures(app) -> None:
    client = app.test_client()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}):
        response = client.get("/v1/environments", headers=headers)
        assert response.status_code == 401
        assert response.json["error"]["code"] == "unauthorized"
        assert response.json["error"]["field"] == "Authorization"
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("body, field", [
    ({"name": "Shop", "nodes": [{"name": "a", "stack": "valkey"}]}, "name"),
    ({"name": "shop", "nodes": [{"name": "a", "stack": "mysql"}]}, "nodes[0].stack"),
    ({"name": "shop", "nodes": [{"name": "a", "stack": "valkey", "cmd": "rm -rf /"}]}, "nodes[0].cmd"),
    ({"name": "shop", "nodes": "many"}, "nodes"),
    ({"name": "shop", "nodes": []}, "nodes"),
    ({"name": "shop", "nodes": [{"name": "a", "stack": "webapp", "config": {"X": "1\nEVIL=2"}}]}, "nodes[0].config.X"),
    ({"name": "shop", "nodes": [{"name": "a", "stack": "webapp", "config": {"bad key": "1"}}]},
     "nodes[0].config.bad key"),
    ({"name": "shop", "nodes": [{"name": "a", "stack": "valkey"}, {"name": "a", "stack": "valkey"}]}, "nodes"),
    ({"name": "shop", "nodes": [{"name": "a", "stack": "webapp", "config": {"U": "{{zz.url}}"}}]}, "nodes[0].config"),
    ({"name": "shop", "nodes": [{"name": f"n{i}", "stack": "valkey"} for i in range(65)]}, "nodes"),
])
def test_bad_input_is_422_naming_the_field(clean: Api, body: dict, field: str) -> None:
    response = clean.post("/v1/environments", body)
    assert response.status_code == 422, response.json
    assert response.json["error"]["field"] == field
    assert response.json["error"]["message"]
    assert clean.get("/v1/environments").json["total"] == 0  # nothing was made


# U+2028/U+2029/U+0085 and the other characters str.splitlines() breaks on, C0/C1 controls too.
LINE_BREAKERS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r", "\n", "\x00", "\x9f"]


@pytest.mark.parametrize("char", LINE_BREAKERS, ids=[f"U+{ord(c):04X}" for c in LINE_BREAKERS])
def test_config_values_cannot_inject_lines(clean: Api, quiet_server: None, char: str) -> None:
    body = {"name": "shop", "nodes": [{"name": "web", "stack": "webapp", "config": {
        "CACHE_URL": "redis://127.0.0.1:1/0", "ZZ": f"x{char}DATABASE_URL=postgresql://evil@10.6.6.6/db"}}]}
    assert_error(clean.post("/v1/environments", body), 422, "nodes[0].config.ZZ")
    assert clean.get("/v1/environments").json["total"] == 0 and lease_count() == 0


def test_a_node_referencing_itself_is_refused(clean: Api, quiet_server: None) -> None:
    body = {"name": "shop", "nodes": [{"name": "db", "stack": "postgres"},
                                      {"name": "web", "stack": "webapp", "config": {"SELF": "{{web.url}}"}}]}
    assert_error(clean.post("/v1/environments", body), 422, "nodes[1].config", "self_reference")
    assert clean.get("/v1/environments").json["total"] == 0 and lease_count() == 0


@pytest.mark.parametrize("body", ["[" * 5000, '{"a":' * 5000, "[" * 200_000, '{"name": ' + "[" * 5000],
                         ids=["lists", "objects", "very-deep", "inside-object"])
def test_deeply_nested_json_is_refused(clean: Api, quiet_server: None, body: str) -> None:
    response = clean.client.post("/v1/environments", data=body, headers={
        **clean.headers(), "Content-Type": "application/json"})
    assert response.status_code in (400, 422)
    assert_error(response, response.status_code, "body")
    assert clean.get("/v1/environments").json["total"] == 0 and lease_count() == 0


def test_last_event_id_takes_ascii_digits_only(clean: Api, quiet_server: None) -> None:
    make_env(clean, SOLO)
    job_id = clean.post("/v1/environments/solo/clones", {"name": "solo-copy"}).json["id"]
    path = f"/v1/jobs/{job_id}/events"
    for bad in ("\u00b2", "1\u00b2", "\u00b9", "-1", "1.0", " 1", "1" * 19, "0x1"):
        assert_error(clean.get(path, headers={"Last-Event-ID": bad}), 422, "Last-Event-ID")
    for bad in ("%C2%B2", "%D9%A1", "%EF%BC%91", "-1", "1" * 19, "abc"):  # superscript 2, Arabic-Indic 1, fullwidth 1
        assert_error(clean.get(f"{path}?last_event_id={bad}"), 422, "last_event_id")
    events = clean.events(job_id, last_event_id=0)  # plain ASCII digits still work
    assert events[-1]["event"] == "end" and events[-1]["data"]["state"] == "succeeded"
    assert clean.events(job_id, last_event_id=events[-2]["id"])[0]["event"] == "end"


def test_oversized_and_malformed_bodies(clean: Api) -> None:
    big = {"name": "shop", "nodes": [{"name": "a", "stack": "webapp", "config": {"X": "y" * 2000}}] * 600}
    response = clean.post("/v1/environments", big)
    assert response.status_code == 413 and response.json["error"]["code"] == "request_entity_too_large"
    response = clean.client.post("/v1/environments", data="{not json", headers={
        **clean.headers(), "Content-Type": "application/json"})
    assert response.status_code == 422 and response.json["error"]["field"]
    response = clean.post("/v1/environments/shop/clones", {"name": "x", "faults": [{"step": "bogus"}]})
    assert response.status_code == 422 and response.json["error"]["field"] == "faults[0].step"
    assert clean.get("/v1/jobs/not-a-job").status_code == 422
    assert clean.get("/v1/jobs/" + "0" * 32).status_code == 404


# ---- the main path: create, dry run, clone with idempotency, SSE ------------------------------------------
def test_create_dry_run_clone_and_follow_events(clean: Api, backend: Backend) -> None:
    src = make_env(clean, SHOP)
    assert {n["name"]: n["stack"] for n in src["nodes"]} == {"db": "postgres", "cache": "valkey", "web": "webapp"}
    assert all(n["url"] and n["address"] in n["url"] for n in src["nodes"])
    assert clean.post("/v1/environments", SHOP).status_code == 409

    plan = clean.post("/v1/environments/shop/clones", {"name": "shop-stage", "dry_run": True})
    assert plan.status_code == 200, plan.json
    plan = plan.json
    assert plan["ok"] is True and plan["conflicts"] == []
    assert [n["name"] for n in plan["nodes"]] == ["cache", "db", "web"]
    assert all(n["steps"] == ["quiesce", "snapshot", "restart", "provision", "assign_ips"] for n in plan["nodes"])
    assert plan["disk_bytes_free"] > 0 and plan["estimated_duration_ms"] > 0
    assert next(n for n in plan["nodes"] if n["name"] == "db")["bytes"] > 1_000_000
    assert clean.get("/v1/environments").json["total"] == 1  # the dry run made nothing

    body = {"name": "shop-stage"}
    first = clean.post("/v1/environments/shop/clones", body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202, first.json
    job_id = first.json["id"]
    assert first.headers["Location"] == f"/v1/jobs/{job_id}"
    again = clean.post("/v1/environments/shop/clones", body, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 202 and again.json["id"] == job_id
    clash = clean.post("/v1/environments/shop/clones", {"name": "other"}, headers={"Idempotency-Key": "k-1"})
    assert clash.status_code == 409 and clash.json["error"]["code"] == "idempotency_key_reused"

    events = clean.events(job_id)
    assert events[-1]["event"] == "end" and events[-1]["data"]["state"] == "succeeded"
    transitions = {(e["data"]["node"], e["data"]["step"], e["data"]["state"]) for e in events if e["event"] == "step"}
    for node in ("db", "cache", "web"):
        for step in ("quiesce", "snapshot", "restart", "provision", "assign_ips"):
            assert (node, step, "running") in transitions and (node, step, "succeeded") in transitions
    percents = [e["data"]["percent"] for e in events if "percent" in e["data"]]
    assert percents == sorted(percents) and percents[-1] == 100
    # Resumable: everything after a given id, nothing before.
    middle = events[len(events) // 2]["id"]
    resumed = clean.events(job_id, last_event_id=middle)
    assert resumed[0]["id"] == middle + 1 and [e["id"] for e in resumed[:-1]] == [
        e["id"] for e in events[:-1] if e["id"] > middle]

    job = clean.get(f"/v1/jobs/{job_id}").json
    assert job["state"] == "succeeded" and job["percent"] == 100 and job["source"] == "shop"
    assert {n["name"] for n in job["nodes"]} == {"db", "cache", "web"}
    for node in job["nodes"]:
        assert [s["step"] for s in node["steps"]] == ["quiesce", "snapshot", "restart", "provision", "assign_ips"]
        assert all(s["state"] == "succeeded" and s["attempts"] == 1 and s["started_at"] for s in node["steps"])
        assert node["bytes_copied"] == node["bytes_total"] > 0
        assert node["downtime_ms"] is None  # online by default: copied while serving, never held
    assert {(r["node"], r["file"]) for r in job["rewrites"]} == {("web", "config/.env")}
    # The dry run named the addresses the clone then got.
    clone = clean.get("/v1/environments/shop-stage").json
    assert clone["state"] == "running" and clone["source"] == "shop"
    assert {n["name"]: n["address"] for n in clone["nodes"]} == {n["name"]: n["address"] for n in plan["nodes"]}

    listed = clean.get("/v1/jobs?environment=shop&state=succeeded").json
    assert listed["total"] == 1 and listed["items"][0]["id"] == job_id
    assert clean.get("/v1/jobs?state=failed").json["total"] == 0


def test_dry_run_lists_conflicts(clean: Api) -> None:
    make_env(clean, SOLO)
    plan = clean.post("/v1/environments/solo/clones", {"name": "solo", "dry_run": True}).json
    assert plan["ok"] is False and [c["code"] for c in plan["conflicts"]] == ["name_taken"]
    assert clean.post("/v1/environments/nope/clones", {"name": "x", "dry_run": True}).status_code == 404


def test_hosts_in_the_api(clean: Api) -> None:
    """One host here (the worker's); every node, plan node and step names it, and a request that
    names a host or node that does not exist is a 422 naming its field, with nothing written."""
    hosts = clean.get("/v1/hosts").json["items"]
    assert [(h["name"], h["state"]) for h in hosts] == [("local", "up")] and hosts[0]["free_bytes"] > 0
    make_env(clean, SOLO)
    assert {n["host"] for n in clean.get("/v1/environments/solo").json["nodes"]} == {"local"}
    plan = clean.post("/v1/environments/solo/clones", {"name": "solo-plan", "dry_run": True}).json
    assert [(n["source_host"], n["host"], n["bytes_across_hosts"]) for n in plan["nodes"]] == [("local", "local", 0)]
    for body, field in (({"target_host": "host-9"}, "target_host"), ({"placement": {"zz": "local"}}, "placement"),
                        ({"target_host": "Not A Host"}, "target_host")):
        bad = clean.post("/v1/environments/solo/clones", {"name": "solo-bad", **body})
        assert bad.status_code == 422 and bad.json["error"]["field"] == field, bad.json
    assert clean.get("/v1/environments/solo-bad").status_code == 404
    assert clean.post("/v1/environments", {"name": "pinned", "nodes": [
        {"name": "kv", "stack": "valkey", "host": "host-9"}]}).status_code == 422


def test_tenant_isolation(clean: Api, other: Api) -> None:
    make_env(clean, SOLO)
    job_id = clean.post("/v1/environments/solo/clones", {"name": "solo-copy"}).json["id"]
    assert other.get("/v1/environments/solo").status_code == 404
    assert other.get("/v1/environments").json == {"items": [], "total": 0}
    assert other.post("/v1/environments/solo/clones", {"name": "mine"}).status_code == 404
    assert other.delete("/v1/environments/solo").status_code == 404
    assert other.get(f"/v1/jobs/{job_id}").status_code == 404
    assert other.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
    assert other.get(f"/v1/jobs/{job_id}/events").status_code == 404
    assert other.get("/v1/jobs").json["total"] == 0
    # The same name in another tenant is a different environment.
    mine = {"name": "solo", "nodes": [{"name": "c", "stack": "valkey"}]}
    assert other.post("/v1/environments", mine).status_code == 202
    assert wait_job(clean, job_id)["state"] == "succeeded"
    wait_for(lambda: other.get("/v1/environments/solo").json["state"] == "running", timeout=60, what="other env")
    assert other.delete("/v1/environments/solo").status_code == 202
    wait_for(lambda: other.get("/v1/environments/solo").status_code == 404, timeout=60, what="other env deleted")


def test_delete_refused_while_a_job_uses_the_environment(clean: Api) -> None:
    make_env(clean, SOLO)
    job_id = clean.post("/v1/environments/solo/clones", {
        "name": "solo-copy", "faults": [{"step": "provision", "times": 4}]}).json["id"]
    busy = clean.delete("/v1/environments/solo")
    assert busy.status_code == 409 and busy.json["error"]["code"] == "busy"
    assert clean.delete("/v1/environments/solo-copy").status_code == 409
    assert wait_job(clean, job_id)["state"] == "succeeded"


@pytest.mark.parametrize("when", ["at_once", "mid_creation"])
def test_delete_while_creating_leaves_nothing_behind(clean: Api, backend: Backend, when: str) -> None:
    log_from = len(backend.worker_log())
    assert clean.post("/v1/environments", SHOP).status_code == 202
    if when == "mid_creation":  # the first level (db, cache) is up; web is being made
        wait_for(lambda: any(n["state"] == "running" for n in clean.get("/v1/environments/shop").json["nodes"]),
                 timeout=60, what="a first node running")
    assert clean.delete("/v1/environments/shop").status_code == 202
    wait_for(lambda: clean.get("/v1/environments/shop").status_code == 404, timeout=60, what="environment gone")
    wait_for(backend.idle, timeout=120, what="creation tasks to end")
    assert backend.processes() == [] and backend.volumes() == set() and lease_count() == 0
    log = backend.worker_log()[log_from:]
    assert "envclone.create_level" in log and "envclone.delete_environment" in log
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]


def _step_state(job_id: str, node: str, step: str) -> str:
    with session_scope() as session:
        return session.query(StepRun).filter_by(job_id=job_id, node_name=node, step=step).one().state


def test_cancel_mid_way_restarts_sources_and_tears_down(clean: Api, backend: Backend) -> None:
    src = make_env(clean, SHOP)
    volumes_before = backend.volumes()
    job_id = clean.post("/v1/environments/shop/clones", {
        "name": "shop-stage", "faults": [{"step": "provision", "node": "db", "times": 50}]}).json["id"]
    wait_for(lambda: _step_state(job_id, "db", "provision") == "retrying", timeout=60, what="provision retrying")
    response = clean.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202 and response.json["state"] == "cancelling"
    job = wait_job(clean, job_id, timeout=120)
    assert job["state"] == "cancelled"
    assert clean.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    steps = {(n["name"], s["step"]): s["state"] for n in job["nodes"] for s in n["steps"]}
    assert steps[("db", "provision")] == "cancelled" and steps[("db", "restart")] == "succeeded"
    driver = get_driver()
    assert all(driver.health(n["name"] and _node_id(src, n["name"])).healthy for n in src["nodes"])
    assert backend.volumes() == volumes_before and backend.snapshots() == set()
    assert clean.get("/v1/environments/shop-stage").json["state"] == "failed"


def _node_id(env: dict, name: str) -> str:
    from shared.planning import find_environment

    with session_scope() as session:
        return next(n.id for n in find_environment(session, "acme", env["name"]).nodes if n.name == name)


def test_retry_after_teardown_redoes_the_snapshot(clean: Api) -> None:

    source = valkey_at(make_env(clean, SOLO)["nodes"][0]["address"])
    source.set("k", "v")
    job_id = clean.post("/v1/environments/solo/clones", {
        "name": "solo-copy", "faults": [{"step": "provision", "kind": "permanent"}]}).json["id"]
    assert wait_job(clean, job_id)["state"] == "failed"
    source.set("k2", "v2")  # after the first snapshot: only the redone one holds it
    assert clean.post(f"/v1/jobs/{job_id}/retry").status_code == 202
    job = wait_job(clean, job_id)
    assert job["state"] == "succeeded" and job["run"] == 2, job
    attempts = {s["step"]: s["attempts"] for s in job["nodes"][0]["steps"]}
    assert attempts == {"quiesce": 2, "snapshot": 2, "restart": 2, "provision": 2, "assign_ips": 1}
    clone_address = clean.get("/v1/environments/solo-copy").json["nodes"][0]["address"]
    assert valkey_at(clone_address).mget("k", "k2") == [b"v", b"v2"]
    assert clean.post(f"/v1/jobs/{job_id}/retry").status_code == 409


def test_retry_takes_a_new_address_when_its_old_one_was_leased_meanwhile(clean: Api) -> None:

    valkey_at(make_env(clean, SOLO)["nodes"][0]["address"]).set("k", "v")
    failed_id = clean.post("/v1/environments/solo/clones", {
        "name": "solo-copy", "faults": [{"step": "provision", "kind": "permanent"}]}).json["id"]
    assert wait_job(clean, failed_id)["state"] == "failed"
    first_address = clean.get("/v1/environments/solo-copy").json["nodes"][0]["address"]
    # The teardown freed that address; the next clone leases the lowest free one: the same.
    other_id = clean.post("/v1/environments/solo/clones", {"name": "solo-other"}).json["id"]
    assert wait_job(clean, other_id)["state"] == "succeeded"
    other_address = clean.get("/v1/environments/solo-other").json["nodes"][0]["address"]
    assert other_address == first_address
    assert clean.post(f"/v1/jobs/{failed_id}/retry").status_code == 202
    assert wait_job(clean, failed_id)["state"] == "succeeded"
    retried_address = clean.get("/v1/environments/solo-copy").json["nodes"][0]["address"]
    assert retried_address != other_address
    assert lease_count() == 3  # source, solo-other, solo-copy: one lease each
    assert valkey_at(retried_address).get("k") == b"v"
    assert valkey_at(other_address).get("k") == b"v"


def test_retry_with_kept_clone_resumes_at_the_failed_step(clean: Api) -> None:

    valkey_at(make_env(clean, SOLO)["nodes"][0]["address"]).set("k", "v")
    job_id = clean.post("/v1/environments/solo/clones", {
        "name": "solo-copy", "keep_on_failure": True,
        "faults": [{"step": "assign_ips", "kind": "permanent"}]}).json["id"]
    assert wait_job(clean, job_id)["state"] == "failed"
    assert clean.post(f"/v1/jobs/{job_id}/retry").status_code == 202
    job = wait_job(clean, job_id)
    assert job["state"] == "succeeded", job
    attempts = {s["step"]: s["attempts"] for s in job["nodes"][0]["steps"]}
    assert attempts == {"quiesce": 1, "snapshot": 1, "restart": 1, "provision": 1, "assign_ips": 2}
    assert clean.get("/v1/environments/solo-copy").json["state"] == "running"
    clone_address = clean.get("/v1/environments/solo-copy").json["nodes"][0]["address"]
    assert valkey_at(clone_address).get("k") == b"v"


# ---- tenants do not share idempotency keys, nor each other's jobs -----------------------------------------
def test_same_idempotency_key_in_two_tenants_makes_a_job_for_each(both: tuple[Api, Api]) -> None:
    acme, globex = both
    sources = [make_env(t, SOLO) for t in (acme, globex)]  # the same name in each tenant
    body, key = {"name": "solo-copy"}, {"Idempotency-Key": "shared-key"}
    first = acme.post("/v1/environments/solo/clones", body, headers=key)
    second = globex.post("/v1/environments/solo/clones", body, headers=key)
    assert first.status_code == 202, first.json
    assert second.status_code == 202, second.json
    acme_job, globex_job = first.json["id"], second.json["id"]
    assert acme_job != globex_job, "globex was handed acme's job for the same Idempotency-Key"
    assert second.headers["Location"] == f"/v1/jobs/{globex_job}"
    # Each job is its own tenant's alone.
    assert globex.get(f"/v1/jobs/{acme_job}").status_code == 404
    assert acme.get(f"/v1/jobs/{globex_job}").status_code == 404
    acme_jobs = {j["id"] for j in acme.get("/v1/jobs?limit=100").json["items"]}
    globex_jobs = {j["id"] for j in globex.get("/v1/jobs?limit=100").json["items"]}
    assert acme_job in acme_jobs and globex_job not in acme_jobs
    assert globex_job in globex_jobs and acme_job not in globex_jobs
    # Replaying the key in either tenant answers that tenant's job, not the other's.
    assert acme.post("/v1/environments/solo/clones", body, headers=key).json["id"] == acme_job
    assert globex.post("/v1/environments/solo/clones", body, headers=key).json["id"] == globex_job

    addresses = {s["nodes"][0]["address"] for s in sources}
    for tenant_api, job_id in ((acme, acme_job), (globex, globex_job)):
        job = wait_job(tenant_api, job_id)
        assert job["state"] == "succeeded", job
        assert (job["source"], job["target"], job["run"]) == ("solo", "solo-copy", 1)
        clone = tenant_api.get("/v1/environments/solo-copy").json
        assert clone["state"] == "running" and clone["source"] == "solo"
        assert [n["name"] for n in clone["nodes"]] == ["cache"]
        addresses.add(clone["nodes"][0]["address"])
    assert len(addresses) == 4  # two sources, two clones: four nodes of their own


def _event_ids(job_id: str) -> list[int]:
    with session_scope() as session:
        return list(session.scalars(select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def test_another_tenant_cannot_retry_or_cancel_a_job(both: tuple[Api, Api]) -> None:
    acme, globex = both
    make_env(acme, SOLO)
    job_id = acme.post("/v1/environments/solo/clones", {
        "name": "solo-copy", "faults": [{"step": "provision", "kind": "permanent"}]}).json["id"]
    failed = wait_job(acme, job_id)
    assert failed["state"] == "failed" and failed["run"] == 1, failed
    target = acme.get("/v1/environments/solo-copy").json
    assert target["state"] == "failed"
    events = _event_ids(job_id)

    for action in ("retry", "cancel"):
        response = globex.post(f"/v1/jobs/{job_id}/{action}")
        assert response.status_code == 404, (action, response.status_code, response.json)
        assert response.json["error"]["code"] == "not_found"
    # Nothing changed: the job, its target, its events.
    assert acme.get(f"/v1/jobs/{job_id}").json == failed
    assert acme.get("/v1/environments/solo-copy").json == target
    assert _event_ids(job_id) == events

    # No run was started either: the owner's retry is the second run, and the only one.
    assert acme.post(f"/v1/jobs/{job_id}/retry").status_code == 202
    assert globex.post(f"/v1/jobs/{job_id}/cancel").status_code == 404  # nor can it cancel a live run
    job = wait_job(acme, job_id)
    assert job["state"] == "succeeded" and job["run"] == 2, job
    attempts = {s["step"]: s["attempts"] for s in job["nodes"][0]["steps"]}
    assert attempts == {"quiesce": 2, "snapshot": 2, "restart": 2, "provision": 2, "assign_ips": 1}
