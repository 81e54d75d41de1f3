"""`envclone up --hosts 2`: two hosts with their own agents, data roots and address pools -- as root
each in its own network and PID namespace on a bridge -- a clone onto the other host over HTTP, node
addresses reachable from this machine, and `envclone down` removing what `up` made."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys

import httpx
import pytest
import redis

from api.cli import hostnet
from tests.conftest import destroy_everything, make_data_root
from tests.helpers import processes_under, wait_for
from tests.integration.test_api_server import free_port
from tests.integration.test_up import envclone

pytestmark = pytest.mark.integration


def test_up_with_two_hosts_clones_across_them_and_down_removes_them() -> None:
    root = make_data_root("envclone-uphosts-")
    data = root / "var"
    api_port, flower_port, broker_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVCLONE_")}
    env.update({"ENVCLONE_DATA_DIR": str(data), "ENVCLONE_WATCHDOG_INTERVAL_S": "2"})
    log = open(root / "up.log", "w")
    up = subprocess.Popen([sys.executable, "-m", "api.cli", "up", "--hosts", "2", "--api-port", str(api_port),
                           "--flower-port", str(flower_port), "--broker-port", str(broker_port)],
                          env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
    api = f"http://127.0.0.1:{api_port}"
    isolated = hostnet.available() is None
    try:
        wait_for(lambda: httpx.get(f"{api}/readyz", timeout=2).status_code == 200, timeout=120, what="stack ready")
        token = (data / "token").read_text().strip()
        client = httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        hosts = wait_for(lambda: len(h := client.get("/v1/hosts").json()["items"]) == 2
                         and all(x["state"] == "up" for x in h) and h, timeout=90, what="two hosts up")
        assert [h["name"] for h in hosts] == ["host-1", "host-2"]
        announced = wait_for(lambda: "hosts    host-1" in (t := (root / "up.log").read_text()) and t, timeout=60,
                             what="the announcement")
        assert ("own network and PID namespace" in announced) == isolated

        # An operator drains host-1: placement skips it, its nodes stay; the CLI lists it so.
        drained = envclone("hosts", "drain", "host-1", env=env)
        assert drained.returncode == 0 and "host host-1 is draining" in drained.stdout, drained.stderr
        cli_env = {**env, "ENVCLONE_URL": api, "ENVCLONE_TOKEN": token, "COLUMNS": "160"}
        listed = envclone("hosts", "list", env=cli_env)
        assert listed.returncode == 0 and "draining" in listed.stdout and "host-2" in listed.stdout, listed.stderr
        assert client.post("/v1/environments", json={"name": "spread", "nodes": [
            {"name": f"kv{i}", "stack": "valkey"} for i in range(2)]}).status_code == 202
        assert {n["host"] for n in client.get("/v1/environments/spread").json()["nodes"]} == {"host-2"}
        pinned = client.post("/v1/environments", json={"name": "pinned", "nodes": [
            {"name": "kv", "stack": "valkey", "host": "host-1"}]})
        assert pinned.status_code == 409 and pinned.json()["error"]["field"] == "nodes[0].host", pinned.text
        missing = envclone("hosts", "drain", "host-9", env=env)
        assert missing.returncode == 1 and "no host named 'host-9'" in missing.stderr
        assert envclone("hosts", "undrain", "host-1", env=env).returncode == 0
        assert client.post("/v1/environments", json={"name": "src", "nodes": [
            {"name": "cache", "stack": "valkey", "host": "host-1"}]}).status_code == 202
        src = wait_for(lambda: (e := client.get("/v1/environments/src").json())["state"] in ("running", "failed")
                       and e, timeout=180, what="env")
        assert src["state"] == "running", src["error"]
        creds = client.get("/v1/environments/src/nodes/cache/credentials").json()
        redis.Redis.from_url(creds["url"]).set("k", "from host-1")  # a node address, reached from here

        job = client.post("/v1/environments/src/clones", json={"name": "dst", "target_host": "host-2"}).json()
        done = wait_for(lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["state"] in
                        ("succeeded", "failed", "cancelled") and j, timeout=240, what="the clone")
        assert done["state"] == "succeeded", done["error"]
        steps = {s["step"]: s["host"] for s in done["nodes"][0]["steps"]}
        assert steps == {"quiesce": "host-1", "snapshot": "host-1", "restart": "host-1", "provision": "host-2",
                         "assign_ips": "host-2"}
        dst = client.get("/v1/environments/dst").json()["nodes"][0]
        pool2 = next(h for h in (data / "hosts").iterdir() if h.name == "host-2")
        assert dst["host"] == "host-2" and pool2.exists()
        if isolated:
            assert ipaddress.ip_address(dst["address"]) in ipaddress.ip_network("10.231.2.0/24")
        copy = client.get("/v1/environments/dst/nodes/cache/credentials").json()
        assert redis.Redis.from_url(copy["url"]).get("k") == b"from host-1"
    finally:
        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C
        try:
            up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        down = envclone("down", env=env, timeout=180)
        print((root / "up.log").read_text()[-3000:])
    assert down.returncode == 0, down.stderr
    assert "removed the hosts" in down.stdout + down.stderr
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [line for line in listed.splitlines() if line.startswith("ec-h")]
    assert "ecbr" not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert processes_under(data) == []
    assert destroy_everything(root) == []
