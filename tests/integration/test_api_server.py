"""The API as a real server process (gunicorn) with a real worker; and the same server facing a
broker that is down."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from api.auth import create_token
from tests.api_client import parse_sse
from tests.helpers import wait_for
from tests.stack import Backend
from tests.workflow_client import lease_count

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def api_server(env: dict[str, str], processes: int = 1, threads: int = 8) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-k", "gthread", "--threads", str(threads),
         "-w", str(processes), "api.wsgi:app"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200, timeout=30, what="api server")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


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


def read_sse(stream: httpx.Response, after: int = 0, stop: Callable[[dict[str, Any]], bool] = lambda e: False,
             timeout: float = 120) -> list[dict[str, Any]]:
    """Events of an open SSE response as they arrive, until the server closes it or ``stop(event)``.
    Fails at once on an id not above the one before (``after`` at first): a repeat or a step back."""
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    block: list[str] = []
    for line in stream.iter_lines():
        assert time.monotonic() < deadline, f"the stream did not end within {timeout}s; read so far: {events}"
        if line:
            block.append(line)
            continue
        new, block = parse_sse("\n".join(block)), []
        for event in new:
            if event["id"] is not None:
                assert event["id"] > after, f"event {event} came after id {after}: repeated or out of order"
                after = event["id"]
        events += new
        if any(stop(e) for e in new):
            break
    return events


def test_sse_reconnect_mid_job_with_last_event_id_misses_and_repeats_nothing() -> None:
    done = ("succeeded", "failed", "cancelled")
    with Backend(pool="127.107.0.0/16") as backend, api_server(backend.env) as base:
        h = {"Authorization": f"Bearer {create_token('acme')}"}
        with httpx.Client(base_url=base, headers=h, timeout=30) as c:
            assert c.post("/v1/environments", json={"name": "solo", "nodes": [
                {"name": "cache", "stack": "valkey"}]}).status_code == 202
            wait_for(lambda: c.get("/v1/environments/solo").json()["state"] == "running", timeout=60, what="env")
            # provision stalls 3 s after its work: the job is surely running when the first stream is dropped.
            job = c.post("/v1/environments/solo/clones", json={
                "name": "solo-copy", "faults": [{"step": "provision", "kind": "hang", "seconds": 3}]})
            assert job.status_code == 202, job.json()
            url = f"/v1/jobs/{job.json()['id']}/events"

            def provisioning(e: dict[str, Any]) -> bool:
                return e["event"] == "step" and (e["data"]["step"], e["data"]["state"]) == ("provision", "running")

            with c.stream("GET", url) as stream:
                assert stream.status_code == 200
                first = read_sse(stream, stop=provisioning)
            # Disconnected (the response is closed) while the job is still going.
            assert c.get(f"/v1/jobs/{job.json()['id']}").json()["state"] not in done
            assert first and provisioning(first[-1]) and all(e["event"] != "end" for e in first)
            assert len(first) >= 5  # job running; quiesce, snapshot, restart each began and ended; provision began

            with c.stream("GET", url, headers={"Last-Event-ID": str(first[-1]["id"])}) as stream:
                assert stream.status_code == 200
                second = read_sse(stream, after=first[-1]["id"])
            assert second[-1] == {"id": None, "event": "end", "data": {"state": "succeeded"}}
            assert len(second) > 1  # the rest of the job came over the second connection

            with c.stream("GET", url) as stream:
                full = read_sse(stream)
            assert full[-1] == second[-1]

            resumed = first + second[:-1]
            ids = [e["id"] for e in resumed]
            assert ids == sorted(set(ids)), ids  # strictly rising, so no duplicate
            assert resumed == full[:-1]  # and no gap: exactly what one uninterrupted stream carries
            assert sum(1 for e in resumed if e["event"] == "step" and e["data"]["state"] == "succeeded") == 5
            for name in ("solo-copy", "solo"):
                assert c.delete(f"/v1/environments/{name}").status_code == 202
                wait_for(lambda n=name: c.get(f"/v1/environments/{n}").status_code == 404, timeout=60, what="delete")
        assert lease_count() == 0
