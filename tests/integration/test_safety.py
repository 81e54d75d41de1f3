"""Clone safety against real processes: a trace of the source planted in a file no stack declares
is found before the clone first starts (on_leak fail: nothing of the clone remains; warn: it is
listed); on_clone actions run on the clone and never on the source; the app's webhook reaches the
sink from the clone and "production" only from the source; a failing action fails the job, and the
clone's database never accepts a connection meanwhile."""

from __future__ import annotations

import json
import os
import pwd
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import select

from api import create_app
from api.auth import create_token
from api.cli.hooks import HookReceiver
from shared.db import session_scope
from shared.drivers import get_driver
from shared.identity import account_name
from shared.models import AddressLease, CloneJob, Node
from tests.api_client import Api, clone_job, delete_env, wait_running
from tests.stack import Backend, publisher
from tests.workflow_client import TENANT, environment, lease_count, plan_only, valkey, wait_job
from workers.workflow import dispatch_clone

pytestmark = pytest.mark.integration

BACKEND = {"pool": "127.112.0.0/16"}
SESSION_KEYS = ("session:alice", "session:bob")


class Probe(threading.Thread):
    """Tries a TCP connection to address:port every 20 ms until stopped; counts what got through."""

    def __init__(self, address: str, port: int) -> None:
        super().__init__(daemon=True)
        self.address, self.port = address, port
        self.attempts = self.connected = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                with socket.create_connection((self.address, self.port), timeout=0.2):
                    self.connected += 1
            except OSError:
                pass
            self.attempts += 1
            self.halt.wait(0.02)  # poll

    def stop(self) -> None:
        self.halt.set()
        self.join()


@pytest.fixture(scope="module")
def production() -> Iterator[HookReceiver]:
    receiver = HookReceiver()  # stands for production's webhook endpoint
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def sink() -> Iterator[HookReceiver]:
    receiver = HookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def api(backend: Backend) -> Api:
    return Api(create_app().test_client(), create_token(TENANT))








def web(env: dict) -> str:
    return next(n["url"] for n in env["nodes"] if n["name"] == "web").rstrip("/")


def node_row(env: str, node: str) -> Node:
    found = environment(env)
    assert found is not None
    return next(n for n in found.nodes if n.name == node)


def item_names(env: str) -> list[str]:
    db = node_row(env, "db")
    with psycopg.connect(host=db.address, port=db.port, dbname="app", user=db.credentials["username"],
                         password=db.credentials["password"], connect_timeout=5) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM items ORDER BY id")]


@pytest.fixture(scope="module")
def shop(api: Api, backend: Backend, production: HookReceiver, sink: HookReceiver) -> Iterator[dict]:
    """The source: db, cache and a webapp whose webhook is production's; every clone of it scrubs the
    items, drops the sessions and points the webhook at the sink."""
    body = {
        "name": "shop",
        "nodes": [{"name": "db", "stack": "postgres"}, {"name": "cache", "stack": "valkey"},
                  {"name": "web", "stack": "webapp", "config": {
                      "DATABASE_URL": "{{db.url}}", "CACHE_URL": "{{cache.url}}", "WEBHOOK_URL": production.url}}],
        # The fence lets the nodes (and so their clones) reach both receivers: on_clone is what redirects.
        "egress": [{"cidr": "127.0.0.1/32", "ports": [production.port, sink.port]}],
        "on_clone": [{"node": "db", "sql": ["UPDATE items SET name = 'scrubbed-' || id"]},
                     {"node": "cache", "delete_keys": ["session:*"]},
                     {"node": "web", "config": {"WEBHOOK_URL": sink.url}}],
    }
    response = api.post("/v1/environments", body)
    assert response.status_code == 202, response.json
    env = wait_running(api, "shop")
    assert env["on_clone"] == body["on_clone"]
    for name in ("alice@example.com", "bob@example.com"):
        made = httpx.post(web(env) + "/items", json={"name": name}, timeout=10)
        assert made.status_code == 201 and made.json()["webhook"] == "sent", made.text
    cache = valkey(environment("shop"))
    for key in (*SESSION_KEYS, "tmp:1", "keep:1"):
        cache.set(key, "v")
    assert production.names() == ["alice@example.com", "bob@example.com"] and sink.calls == []
    yield env
    for other in api.get("/v1/environments").json["items"]:
        delete_env(api, other["name"])
    assert backend.volumes() == set() and backend.snapshots() == set()
    assert backend.processes() == [] and lease_count() == 0


def assert_nothing_left(backend: Backend, job_id: str) -> None:
    """No volume, lease, snapshot, process or account of the clone remains."""
    with session_scope() as session:
        job = session.get(CloneJob, job_id)
        clone_ids = {jn.clone_node_id for jn in job.nodes}
        addresses = {n.address for n in session.scalars(select(Node).where(Node.id.in_(clone_ids)))}
        leases = list(session.scalars(select(AddressLease).where(AddressLease.node_id.in_(clone_ids))))
        snapshots = {jn.snapshot_id for jn in job.nodes}
        target_id = job.target_environment_id
    assert not [v for v in backend.volumes() if any(i in v for i in clone_ids)]
    assert leases == [] and not (backend.snapshots() & snapshots)
    assert not [cmd for _, cmd in backend.processes() if any(a in cmd for a in addresses)
                or any(i in cmd for i in clone_ids)]
    if os.geteuid() == 0:
        with pytest.raises(KeyError):
            pwd.getpwnam(account_name(target_id))


def test_on_clone_actions_run_on_the_clone_only_and_its_webhook_reaches_the_sink(
        api: Api, shop: dict, production: HookReceiver, sink: HookReceiver, backend: Backend) -> None:
    job = clone_job(api, "shop", {"name": "stage", "on_clone": [{"node": "cache", "delete_keys": ["tmp:*"]}]})
    assert job["state"] == "succeeded", job["error"]
    stage = api.get("/v1/environments/stage").json
    assert stage["on_clone"] == shop["on_clone"]  # a clone of the clone is neutralized alike
    # The actions, per node in the order declared (the environment's, then the request's); counts only.
    assert [(a["node"], a["kind"], a["state"]) for a in job["actions"]] == [
        ("cache", "delete_keys", "succeeded"), ("cache", "delete_keys", "succeeded"),
        ("db", "sql", "succeeded"), ("web", "config", "succeeded")]
    assert [a.get("deleted") for a in job["actions"][:2]] == [2, 1]
    assert job["actions"][2]["rows"] == 2 and job["actions"][3]["keys"] == ["WEBHOOK_URL"]
    assert sink.url not in json.dumps(job) and "scrubbed" not in json.dumps(job)
    # SQL: the clone's rows changed, the source's did not.
    assert item_names("stage") == ["scrubbed-1", "scrubbed-2"]
    assert item_names("shop") == ["alice@example.com", "bob@example.com"]
    # Keys: deleted in the clone only.
    clone_cache, source_cache = valkey(environment("stage")), valkey(environment("shop"))
    assert clone_cache.keys("*") == [b"keep:1"]
    assert all(source_cache.get(k) == b"v" for k in (*SESSION_KEYS, "tmp:1", "keep:1"))
    # The webhook: the clone calls the sink, production hears only the source.
    made = httpx.post(web(stage) + "/items", json={"name": "from-the-clone"}, timeout=10)
    assert made.status_code == 201 and made.json()["webhook"] == "sent", made.text
    made = httpx.post(web(shop) + "/items", json={"name": "from-the-source"}, timeout=10)
    assert made.status_code == 201 and made.json()["webhook"] == "sent", made.text
    assert sink.names() == ["from-the-clone"]
    assert production.names() == ["alice@example.com", "bob@example.com", "from-the-source"]
    # The safety report.
    safety = job["safety"]
    assert safety["fence"] == job["fence"] and job["fence"] is not None
    assert safety["credentials_rotated"] == 2  # db and cache; the webapp has no credentials of its own
    assert safety["rewrites"] == len(job["rewrites"]) >= 4
    assert (safety["leaks"], job["leaks"], safety["on_leak"]) == (0, [], "fail")
    assert (safety["actions"], safety["actions_failed"]) == (4, 0)
    assert safety["scanned_nodes"] == 3 and safety["scanned_files"] > 3 and safety["scan_complete"]
    clone_id = job["id"]
    delete_env(api, "stage")
    assert_nothing_left(backend, clone_id)


def plant(shop_env: str, text: str) -> Any:
    """Write config/extra.conf -- a file no stack declares -- into the source webapp's volume."""
    volume = get_driver().volume(node_row(shop_env, "web").id)
    path = volume / "config" / "extra.conf"
    path.write_text(text)
    st = volume.stat()
    os.chown(path, st.st_uid, st.st_gid)
    return path


def test_a_planted_trace_of_the_source_fails_the_clone_or_is_listed_with_warn(
        api: Api, shop: dict, backend: Backend) -> None:
    db, cache = node_row("shop", "db"), node_row("shop", "cache")
    password = cache.credentials["password"]
    planted = plant("shop", f"# copied from production by hand\nreplica_host = {db.address}\n"
                            f"replica = {db.address}:{db.port}\ncache_auth = {password}\n")
    expected = [{"node": "web", "file": "config/extra.conf", "line": 2, "kind": "address"},
                {"node": "web", "file": "config/extra.conf", "line": 3, "kind": "host_port"},
                {"node": "web", "file": "config/extra.conf", "line": 4, "kind": "secret"}]
    try:
        failed = clone_job(api, "shop", {"name": "leaky"})  # on_leak: fail is the default
        assert failed["state"] == "failed"
        assert "web: assign_ips: UnsafeClone: the clone holds 3 trace(s) of its source" in failed["error"]
        assert "config/extra.conf:2 address" in failed["error"]
        assert failed["leaks"] == expected
        assert failed["safety"]["leaks"] == 3 and failed["safety"]["on_leak"] == "fail"
        assert password not in json.dumps(failed)
        web_steps = next(n for n in failed["nodes"] if n["name"] == "web")["steps"]
        assert web_steps[-1]["state"] == "failed"
        assert api.get("/v1/environments/leaky").json["state"] == "failed"
        assert_nothing_left(backend, failed["id"])

        warned = clone_job(api, "shop", {"name": "leaky-warn", "on_leak": "warn"})
        assert warned["state"] == "succeeded", warned["error"]
        assert warned["leaks"] == expected and password not in json.dumps(warned)
        assert (warned["safety"]["leaks"], warned["safety"]["on_leak"]) == (3, "warn")
        assert warned["options"]["on_leak"] == "warn"
        assert api.get("/v1/environments/leaky-warn").json["state"] == "running"
    finally:
        planted.unlink()
    delete_env(api, "leaky")
    delete_env(api, "leaky-warn")
    assert_nothing_left(backend, warned["id"])


def test_a_failing_action_fails_the_job_and_the_clone_database_never_listens(
        api: Api, shop: dict, backend: Backend) -> None:
    job_id, address, port = plan_only("shop", "broken",
                         {"on_clone": [{"node": "db", "sql": ["UPDATE no_such_table SET x = 1"]}]})
    probe = Probe(address, port)
    probe.start()  # before the job is dispatched: it watches the clone's database address throughout
    try:
        dispatch_clone(publisher(), job_id)
        done = wait_job(job_id)
    finally:
        probe.stop()
    assert done.state == "failed"
    assert 'on_clone sql on postgres failed: relation "no_such_table" does not exist' in done.error
    assert [(a["node"], a["kind"], a["state"]) for a in done.actions if a["node"] == "db"] == [
        ("db", "sql", "succeeded"), ("db", "sql", "failed")]
    assert probe.attempts > 20 and probe.connected == 0, (probe.attempts, probe.connected)
    assert_nothing_left(backend, job_id)
    delete_env(api, "broken")


def test_dry_run_predicts_a_literal_source_address_in_an_on_clone_config(api: Api, shop: dict) -> None:
    db = node_row("shop", "db")
    on_clone = [{"node": "web", "config": {"REPLICA_URL": f"postgresql://{db.address}:{db.port}/app",
                                           "OWN_DB": "{{db.url}}"}}]
    plan = api.post("/v1/environments/shop/clones", {"name": "x", "dry_run": True, "on_clone": on_clone}).json
    assert plan["predicted_leaks"] == [{"node": "web", "key": "REPLICA_URL", "kind": "host_port",
                                        "origin": "on_clone", "outcome": "fail"}]
    assert not plan["ok"] and [c["code"] for c in plan["conflicts"]] == ["leak_predicted"]
    plan = api.post("/v1/environments/shop/clones",
                    {"name": "x", "dry_run": True, "on_clone": on_clone, "on_leak": "warn"}).json
    assert plan["ok"] and plan["predicted_leaks"][0]["outcome"] == "warn"
    # The shop's own configs name the source through templates only: nothing predicted from them.
    assert api.post("/v1/environments/shop/clones", {"name": "x", "dry_run": True}).json["predicted_leaks"] == []


@pytest.mark.parametrize(("action", "code"), [
    ({"node": "cache", "sql": ["SELECT 1"]}, "unsupported_action"),
    ({"node": "db", "delete_keys": ["*"]}, "unsupported_action"),
    ({"node": "nope", "config": {"A": "b"}}, "unknown_node"),
    ({"node": "web", "config": {"A": "{{nope.url}}"}}, "unknown_reference"),
    ({"node": "web", "config": {"A": "b"}, "sql": ["SELECT 1"]}, "invalid"),
    ({"node": "web"}, "invalid"),
    ({"node": "web", "config": {"A": "line\nbreak"}}, "invalid"),
])
def test_on_clone_actions_are_checked_against_the_nodes(api: Api, action: dict, code: str) -> None:
    nodes = [{"name": "db", "stack": "postgres"}, {"name": "cache", "stack": "valkey"},
             {"name": "web", "stack": "webapp"}]
    response = api.post("/v1/environments", {"name": "checked", "nodes": nodes, "on_clone": [action]})
    assert response.status_code == 422 and response.json["error"]["code"] == code, response.json
    assert api.get("/v1/environments/checked").status_code == 404


def test_a_clone_request_is_checked_too(api: Api, shop: dict) -> None:
    bad = api.post("/v1/environments/shop/clones", {"name": "x", "on_clone": [{"node": "web", "sql": ["SELECT 1"]}]})
    assert bad.status_code == 422 and bad.json["error"]["code"] == "unsupported_action"
    assert bad.json["error"]["field"] == "on_clone[0]"
    bad = api.post("/v1/environments/shop/clones", {"name": "x", "on_leak": "ignore"})
    assert bad.status_code == 422 and bad.json["error"]["field"] == "on_leak"
    assert api.get("/v1/environments/x").status_code == 404

