"""Isolation, replayed as the attacks were made: two tenants (alice, bob) on one back end, nodes
under their own accounts, credentials on every stateful node, new credentials for every clone."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from sqlalchemy import select

from api import create_app
from api.auth import create_token
from shared.db import session_scope
from shared.drivers import get_driver
from shared.identity import account_name
from shared.models import EnvironmentEvent
from shared.planning import find_environment
from tests.api_client import Api
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

BACKEND = {"pool": "127.110.0.0/16"}
CACHE_APP = [{"name": "cache", "stack": "valkey"},
             {"name": "web", "stack": "webapp", "config": {"CACHE_URL": "{{cache.url}}"}}]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="separate accounts need root")


@pytest.fixture(scope="module")
def app(backend):  # noqa: ANN001, ANN201
    return create_app()


@pytest.fixture(scope="module")
def alice(app) -> Api:  # noqa: ANN001
    return Api(app.test_client(), create_token("alice"))


@pytest.fixture(scope="module")
def bob(app) -> Api:  # noqa: ANN001
    return Api(app.test_client(), create_token("bob"))


def make_env(api: Api, name: str, nodes: list[dict], egress: list[dict] | None = None) -> dict:
    response = api.post("/v1/environments", {"name": name, "nodes": nodes, "egress": egress or []})
    assert response.status_code == 202, response.json
    env = wait_for(lambda: (e := api.get(f"/v1/environments/{name}").json)["state"] in ("running", "failed") and e,
                   timeout=180, what=f"environment {name} made")
    assert env["state"] == "running", env["error"]
    return env


def delete_env(api: Api, name: str) -> None:
    assert api.delete(f"/v1/environments/{name}").status_code == 202
    wait_for(lambda: api.get(f"/v1/environments/{name}").status_code == 404, timeout=60, what=f"{name} deleted")


def rows(tenant: str, env: str) -> tuple[str, dict[str, tuple[str, dict]]]:
    """(environment id, {node name: (node id, credentials)})."""
    with session_scope() as session:
        found = find_environment(session, tenant, env)
        return found.id, {n.name: (n.id, dict(n.credentials)) for n in found.nodes}


def node_uid(node_id: str) -> int:
    pid = int((get_driver().pid_path(node_id)).read_text().split()[0])
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def as_account(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    user = pwd.getpwnam(name)
    return subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30)


def web(env: dict) -> str:
    return next(n["url"] for n in env["nodes"] if n["name"] == "web").rstrip("/")


def address(env: dict, node: str) -> str:
    return next(n["address"] for n in env["nodes"] if n["name"] == node)


@needs_root
def test_each_environment_runs_as_its_own_account_and_keeps_its_files_private(alice: Api, bob: Api) -> None:
    make_env(alice, "shop", CACHE_APP)
    make_env(bob, "shop", CACHE_APP)
    a_env, a_nodes = rows("alice", "shop")
    b_env, b_nodes = rows("bob", "shop")
    a_uid, b_uid = pwd.getpwnam(account_name(a_env)).pw_uid, pwd.getpwnam(account_name(b_env)).pw_uid
    assert 0 not in (a_uid, b_uid) and a_uid != b_uid
    for nodes, uid in ((a_nodes, a_uid), (b_nodes, b_uid)):
        for node_id, _ in nodes.values():  # the webapp too: no node runs as root
            assert node_uid(node_id) == uid
            volume = get_driver().volume(node_id)
            st = volume.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o700)
    secrets = get_driver().volume(b_nodes["cache"][0]) / "config/secrets.json"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    # A process under alice's account can neither read bob's secrets nor list his volume.
    for argv in (["cat", str(secrets)], ["ls", str(secrets.parent.parent)]):
        done = as_account(account_name(a_env), *argv)
        assert done.returncode != 0 and "Permission denied" in done.stderr, done
    assert as_account(account_name(a_env), "cat", str(get_driver().volume(a_nodes["cache"][0]) /
                                                       "config/secrets.json")).returncode == 0
    delete_env(alice, "shop")
    delete_env(bob, "shop")
    for env_id in (a_env, b_env):
        with pytest.raises(KeyError):
            pwd.getpwnam(account_name(env_id))


def test_a_tenant_cannot_reach_another_tenants_cache(alice: Api, bob: Api) -> None:
    bobs = make_env(bob, "shop", CACHE_APP)
    assert httpx.put(web(bobs) + "/cache", json={"value": "bobs-value"}, timeout=10).status_code == 200
    # Addresses are handed out in order: alice points her webapp at bob's cache by address.
    target = f"redis://{address(bobs, 'cache')}:6379/0"
    mine = make_env(alice, "shop", [{"name": "web", "stack": "webapp", "config": {"CACHE_URL": target}}])
    attack = httpx.put(web(mine) + "/cache", json={"value": "written-by-alice"}, timeout=10)
    # Refused by the fence where the kernel has one, else by the cache's password.
    assert attack.status_code == 503, attack.text
    assert ("ConnectionError" if alice.get("/v1/environments/shop").json["fence"] == "enforced"
            else "AuthenticationError") in attack.text, attack.text
    _, nodes = rows("bob", "shop")
    password = nodes["cache"][1]["password"]
    bobs_cache = redis.Redis(host=address(bobs, "cache"), password=password, socket_timeout=5)
    assert bobs_cache.get("webapp:value") == b"bobs-value"
    # Nor can anyone on the machine pause a source without its password.
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=address(bobs, "cache"), socket_timeout=5).execute_command("CLIENT", "PAUSE", "90000", "ALL")
    # Responses never carry a password; the credentials call does, once per call, recorded.
    assert password not in bob.get("/v1/environments/shop").get_data(as_text=True)
    creds = bob.get("/v1/environments/shop/nodes/cache/credentials")
    assert creds.status_code == 200 and creds.json["password"] == password and password in creds.json["url"]
    assert redis.Redis.from_url(creds.json["url"]).get("webapp:value") == b"bobs-value"
    assert alice.get("/v1/environments/shop/nodes/cache/credentials").status_code == 404  # alice's shop has none
    assert bob.get("/v1/environments/shop/nodes/web/credentials").json["error"]["code"] == "no_credentials"
    with session_scope() as session:
        events = list(session.scalars(select(EnvironmentEvent.message).where(
            EnvironmentEvent.kind == "credentials_read")))
    assert "credentials of node cache read by tenant bob" in events
    delete_env(alice, "shop")
    delete_env(bob, "shop")


def test_a_clone_has_new_credentials_refused_by_its_source_and_the_other_way(alice: Api) -> None:
    nodes = [{"name": "db", "stack": "postgres"}, *CACHE_APP[:1],
             {"name": "web", "stack": "webapp", "config": {"DATABASE_URL": "{{db.url}}", "CACHE_URL": "{{cache.url}}"}}]
    src = make_env(alice, "shop", nodes)
    assert httpx.post(web(src) + "/items", json={"name": "one"}, timeout=10).status_code == 201
    job = alice.post("/v1/environments/shop/clones", {"name": "stage", "rename_db_users": True}).json
    job = wait_for(lambda: (j := alice.get(f"/v1/jobs/{job['id']}").json)["state"] in ("succeeded", "failed") and j,
                   timeout=180, what="clone")
    assert job["state"] == "succeeded", job["error"]
    dst = alice.get("/v1/environments/stage").json
    _, src_rows = rows("alice", "shop")
    _, dst_rows = rows("alice", "stage")
    s_db, d_db = src_rows["db"][1], dst_rows["db"][1]
    assert d_db["username"] != s_db["username"] and d_db["password"] != s_db["password"]
    assert d_db["superuser_password"] != s_db["superuser_password"]

    def pg(addr: str, creds: dict, user_key: str = "username", pw_key: str = "password") -> str:
        with psycopg.connect(host=addr, port=5432, dbname="app", user=creds[user_key], password=creds[pw_key],
                             connect_timeout=5) as conn:
            return conn.execute("SELECT current_user").fetchone()[0]

    assert pg(address(dst, "db"), d_db) == d_db["username"]
    for addr, creds in ((address(dst, "db"), s_db), (address(src, "db"), d_db)):
        for keys in (("username", "password"), ("superuser", "superuser_password")):
            with pytest.raises(psycopg.OperationalError):
                pg(addr, creds, *keys)
    s_cache, d_cache = src_rows["cache"][1]["password"], dst_rows["cache"][1]["password"]
    assert s_cache != d_cache
    for addr, pw in ((address(dst, "cache"), s_cache), (address(src, "cache"), d_cache)):
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host=addr, password=pw, socket_timeout=5).ping()
    # The clone's webapp was rewired to the clone's nodes, with the clone's credentials.
    status = httpx.get(web(dst) + "/", timeout=10).json()
    assert status["database"] == f"{address(dst, 'db')}:5432" and status["items"] == 1
    kinds = {r["kind"] for r in job["rewrites"]}
    assert kinds == {"address", "credential"}
    assert all(r["old"] == r["new"] == "[redacted]" for r in job["rewrites"] if r["kind"] == "credential")
    assert s_db["password"] not in str(job) and d_db["password"] not in str(job)
    delete_env(alice, "stage")
    delete_env(alice, "shop")


def connects(account: str, host: str, port: int) -> bool:
    """Whether a process under ``account`` can open a TCP connection to host:port."""
    code = (f"import socket\ns = socket.create_connection(({host!r}, {port}), timeout=3)\n"
            "s.close()\n")
    return as_account(account, "/usr/bin/python3", "-c", code).returncode == 0


@needs_root
@pytest.mark.skipif(shutil.which("nft") is None, reason="nftables is not installed")
def test_the_kernel_fences_each_environment_in(alice: Api, bob: Api) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # something on the machine outside every environment
    allowed_port = listener.getsockname()[1]
    other = socket.create_server(("127.0.0.1", 0))
    try:
        bobs = make_env(bob, "shop", CACHE_APP)
        mine = make_env(alice, "shop", [*CACHE_APP[:1], {"name": "web", "stack": "webapp", "config": {
            "CACHE_URL": f"redis://{address(bobs, 'cache')}:6379/0"}}],
            egress=[{"cidr": "127.0.0.1/32", "ports": [allowed_port]}])
        assert mine["fence"] == bobs["fence"] == "enforced"
        a_env, _ = rows("alice", "shop")
        account = account_name(a_env)
        assert connects(account, address(mine, "cache"), 6379)  # its own node
        assert not connects(account, address(bobs, "cache"), 6379)  # another tenant's
        assert connects(account, "127.0.0.1", allowed_port)  # declared egress
        assert not connects(account, "127.0.0.1", other.getsockname()[1])  # anything else
        # The attack through the API: alice's webapp at bob's cache is cut off by the kernel.
        attack = httpx.put(web(mine) + "/cache", json={"value": "written-by-alice"}, timeout=20)
        assert attack.status_code == 503 and "ConnectionError" in attack.text, attack.text
        # A clone is fenced from its source and reaches its own nodes.
        job = alice.post("/v1/environments/shop/clones", {"name": "stage"}).json
        job = wait_for(lambda: (j := alice.get(f"/v1/jobs/{job['id']}").json)["state"] in ("succeeded", "failed")
                       and j, timeout=120, what="clone")
        assert job["state"] == "succeeded" and job["fence"] == "enforced", job
        stage = alice.get("/v1/environments/stage").json
        c_env, _ = rows("alice", "stage")
        assert not connects(account_name(c_env), address(mine, "cache"), 6379)
        assert connects(account_name(c_env), address(stage, "cache"), 6379)
        ours = {pwd.getpwnam(account_name(e)).pw_uid: account_name(e) for e in (a_env, c_env, rows("bob", "shop")[0])}
        uids = list(ours)
        chains = subprocess.run(["nft", "list", "table", "inet", "envclone"], capture_output=True, text=True).stdout
        assert all(f"chain env_{uid} " in chains for uid in uids)
        delete_env(alice, "stage")
        delete_env(alice, "shop")
        delete_env(bob, "shop")
        # Removed with the environments: no chain of theirs is left in the kernel (a uid given to a new
        # environment meanwhile -- tests run side by side -- has that environment's chain).
        chains = subprocess.run(["nft", "list", "table", "inet", "envclone"], capture_output=True, text=True).stdout
        for uid, name in ours.items():
            with pytest.raises(KeyError):
                pwd.getpwnam(name)
            if f"chain env_{uid} " in chains:
                assert pwd.getpwuid(uid).pw_name != name, chains
    finally:
        listener.close()
        other.close()
