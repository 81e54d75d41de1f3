"""The API as a real server process (gunicorn) with a real worker; and the same server facing a
broker that is down."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from api.auth import create_token
from tests.api_client import parse_sse
from tests.helpers import wait_for
from tests.stack import Backend
from tests.workflow_client import lease_count

pytestmark = pytest.mark.integration
BACKEND = {"pool": "127.107.0.0/16"}  # the module's shared back end (conftest's ``backend``)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def api_server(env: dict[str, str], processes: int = 1, threads: int = 8, log: Path | None = None) -> Iterator[str]:
    """gunicorn serving the API; its log (tracebacks included) goes to ``log``."""
    port = free_port()
    log_file = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-k", "gthread", "--threads", str(threads),
         "-w", str(processes), "api.wsgi:app"],
        env={**os.environ, **env}, stdout=log_file, stderr=log_file, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200, timeout=30, what="api server")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        if log:
            log_file.close()


def test_real_server_create_clone_and_stream(tmp_path) -> None:
    with Backend(pool="127.96.0.0/16") as backend, api_server(backend.env) as base:
        token = create_token("acme")
        h = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=h, timeout=30) as c:
            assert c.get("/readyz").status_code == 200
            doc = c.get("/openapi.json").json()
            assert "/v1/environments/{name}/clones" in doc["paths"]
            assert c.get("/docs/", follow_redirects=True).status_code == 200
            assert c.post("/v1/environments", json={"name": "solo", "nodes": [
                {"name": "cache", "stack": "valkey"}]}).status_code == 202
            wait_for(lambda: c.get("/v1/environments/solo").json()["state"] == "running", timeout=60, what="env")
            job = c.post("/v1/environments/solo/clones", json={"name": "solo-copy"})
            assert job.status_code == 202
            with c.stream("GET", f"/v1/jobs/{job.json()['id']}/events") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                events = parse_sse("".join(stream.iter_text()))
            assert events[-1] == {"id": None, "event": "end", "data": {"state": "succeeded"}}
            assert sum(1 for e in events if e["event"] == "step" and e["data"]["state"] == "succeeded") == 5
            for name in ("solo-copy", "solo"):
                assert c.delete(f"/v1/environments/{name}").status_code == 202
                wait_for(lambda n=name: c.get(f"/v1/environments/{n}").status_code == 404, timeout=60, what="delete")
        assert lease_count() == 0


def test_broker_down_gives_503_and_loses_nothing() -> None:
    with Backend(pool="127.97.0.0/16") as backend:
        dead = {**backend.env, "ENVCLONE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
        with api_server(dead) as base:
            h = {"Authorization": f"Bearer {create_token('acme')}"}
            with httpx.Client(base_url=base, headers=h, timeout=30) as c:
                ready = c.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["checks"]["database"] == "ok" and ready.json()["checks"]["broker"] != "ok"
                response = c.post("/v1/environments", json={"name": "solo", "nodes": [
                    {"name": "cache", "stack": "valkey"}]})
                assert response.status_code == 503
                assert response.json()["error"]["code"] == "broker_unavailable"
                assert c.get("/v1/environments").json()["total"] == 0
        assert lease_count() == 0


def test_a_chunked_body_is_held_to_the_size_limit(backend: Backend, tmp_path: Path) -> None:
    """Sent chunked (no Content-Length), a body over 1 MiB is a 413, one under it is read whole."""
    log = tmp_path / "api.log"
    with api_server(backend.env, log=log) as base, httpx.Client(base_url=base, timeout=60, headers={
            "Authorization": f"Bearer {create_token('acme')}", "Content-Type": "application/json"}) as c:

        def chunked(body: dict) -> Iterator[bytes]:
            data = json.dumps(body).encode()
            return (data[i:i + 65536] for i in range(0, len(data), 65536))

        big = {"name": "shop", "nodes": [{"name": "a", "stack": "webapp", "config": {"X": "y" * 2000}}] * 1000}
        response = c.post("/v1/environments", content=chunked(big))
        assert response.request.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in response.request.headers
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "request_entity_too_large"
        assert response.json()["error"]["field"] == "body"
        # Under the limit the whole body arrives: the error is about its content, not its end.
        small = {"name": "Shop", "nodes": [{"name": "a", "stack": "valkey", "config": {"X": "y" * 2000}}] * 300}
        response = c.post("/v1/environments", content=chunked(small))
        assert response.status_code == 422 and response.json()["error"]["field"] == "name", response.text
        assert c.get("/v1/environments").json()["total"] == 0 and lease_count() == 0
    assert "Traceback" not in log.read_text(errors="replace")
