"""The API as a real server process (gunicorn) with a real worker; and the same server facing a
broker that is down."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from api.auth import create_token
from api.cli.client import Client
from api.cli.up import gunicorn_args
from api.streams import per_process_cap
from shared.db import session_scope
from shared.models import JobEvent
from tests.api_client import parse_sse
from tests.helpers import wait_for
from tests.stack import Backend
from tests.workflow_client import drop_parked, lease_count, parked_job

pytestmark = [pytest.mark.integration, pytest.mark.long]
BACKEND = {"pool": "127.107.0.0/16"}  # the module's shared back end (conftest's ``backend``)


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range (32768+): a port the kernel hands out
    for port 0 is the kind it hands out again to the next outgoing connection, before our server
    binds it. Random, so parallel tests rarely pick the same one."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


@contextmanager
def api_server(env: dict[str, str], processes: int | None = None, threads: int | None = None,
               log: Path | None = None) -> Iterator[str]:
    """gunicorn serving the API as `envclone up` does (api/gunicorn_conf.py); ``processes`` and
    ``threads`` override ENVCLONE_API_WORKERS and _THREADS. Its log (tracebacks too) goes to ``log``."""
    port = free_port()
    server_env = {**os.environ, **env}
    if processes is not None:
        server_env["ENVCLONE_API_WORKERS"] = str(processes)
    if threads is not None:
        server_env["ENVCLONE_API_THREADS"] = str(threads)
    log_file = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", *gunicorn_args(f"127.0.0.1:{port}")],
                            env=server_env, stdout=log_file, stderr=log_file, start_new_session=True)
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
    with Backend(pool="127.114.0.0/16") as backend, api_server(backend.env) as base:
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


# ---- event streams: a cap per tenant, a maximum duration, the API answering beside them ---------------------
def _open(c: httpx.Client, stack: ExitStack, job_id: str, **kw: object) -> httpx.Response:
    """An event stream held open on its own connection (the server sends its headers at once). Its
    body is left unread: an abandoned line iterator would close the connection."""
    response = stack.enter_context(c.stream("GET", f"/v1/jobs/{job_id}/events", **kw))
    if response.status_code != 200:
        response.read()
    return response


def _client(base: str, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {create_token(tenant)}"})


@pytest.fixture
def tenants() -> Iterator[list[str]]:
    """Tenant names for a test; their parked rows are removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        drop_parked(name)


def test_open_streams_are_capped_per_tenant_across_processes(backend: Backend, tenants: list[str],
                                                             tmp_path: Path) -> None:
    tenants += ["cap-a", "cap-b"]
    env = {**backend.env, "ENVCLONE_MAX_STREAMS_PER_TENANT": "2"}
    job_a, job_b = parked_job("cap-a", "a"), parked_job("cap-b", "b")
    log = tmp_path / "api.log"
    # Two servers (two processes) on one Redis and one database: the count is theirs together.
    with api_server(env, processes=1, log=log) as one, api_server(env, processes=1, log=log) as two, \
            _client(one, "cap-a") as a1, _client(two, "cap-a") as a2, _client(two, "cap-b") as b2, \
            ExitStack() as first, ExitStack() as rest:
        assert _open(a1, first, job_a).status_code == 200
        assert _open(a2, rest, job_a).status_code == 200
        refused = _open(a1, rest, job_a)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "too_many_streams" and refused.json()["error"]["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 300  # when the oldest stream ends at the latest
        assert _open(b2, rest, job_b).status_code == 200  # another tenant is not held back
        first.close()  # the client goes away: its slot is given back
        wait_for(lambda: _open(a2, rest, job_a).status_code == 200, timeout=30, what="a freed slot")
        assert _open(a1, rest, job_a).status_code == 429
    assert "Traceback" not in log.read_text(errors="replace")


def test_a_stream_ends_with_resume_after_its_maximum_duration(backend: Backend, tenants: list[str]) -> None:
    tenants.append("dur")
    job = parked_job("dur", "d")
    env = {**backend.env, "ENVCLONE_MAX_STREAM_S": "0.5", "ENVCLONE_MAX_STREAMS_PER_TENANT": "1"}
    with api_server(env, processes=1) as base, _client(base, "dur") as c:
        for last in (None, 7, 0):  # one slot: each reconnect finds the last stream's slot given back
            headers = {"Last-Event-ID": str(last)} if last is not None else {}
            response = c.get(f"/v1/jobs/{job}/events", headers=headers)
            assert response.status_code == 200, response.text
            assert parse_sse(response.text) == [{"id": None, "event": "resume", "data": {"last_event_id": last or 0}}]


def test_the_cli_follows_a_job_across_stream_resumes(backend: Backend) -> None:
    env = {**backend.env, "ENVCLONE_MAX_STREAM_S": "1", "ENVCLONE_MAX_STREAMS_PER_TENANT": "1"}
    with api_server(env, processes=1) as base, _client(base, "acme") as c:
        assert c.post("/v1/environments", json={"name": "solo", "nodes": [
            {"name": "cache", "stack": "valkey"}]}).status_code == 202
        wait_for(lambda: c.get("/v1/environments/solo").json()["state"] == "running", timeout=60, what="env")
        # A job that takes more than 3 s: its stream is cut (and picked up) at least twice.
        job_id = c.post("/v1/environments/solo/clones", json={"name": "solo-copy", "faults": [
            {"step": "provision", "kind": "hang", "seconds": 3}]}).json()["id"]
        cli = Client(base, c.headers["Authorization"].split()[1])
        seen = list(cli.events(job_id))
        assert cli.reconnects >= 2
        assert seen[-1] == ("end", {"state": "succeeded"})
        with session_scope() as session:  # every event, once, in order: what a single stream gives
            recorded = [(e.kind, e.data) for e in session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))]
        assert [(k, json.loads(json.dumps(d))) for k, d in recorded] == seen[:-1]
        for name in ("solo-copy", "solo"):
            assert c.delete(f"/v1/environments/{name}").status_code == 202
            wait_for(lambda n=name: c.get(f"/v1/environments/{n}").status_code == 404, timeout=60, what="delete")


def test_the_api_answers_beside_many_open_streams(backend: Backend, tenants: list[str], tmp_path: Path) -> None:
    """40 streams of 4 tenants on the server model `envclone up` runs; ordinary requests still answer
    (a generous deadline; bench/streams.py measures the latency)."""
    tenants += [f"many-{i}" for i in range(4)]
    jobs = {t: parked_job(t, "m") for t in tenants}
    log = tmp_path / "api.log"
    with api_server(backend.env, log=log) as base, ExitStack() as streams:
        clients = {t: streams.enter_context(_client(base, t)) for t in tenants}
        for i in range(40):
            tenant = tenants[i % 4]
            assert _open(clients[tenant], streams, jobs[tenant]).status_code == 200
        with httpx.Client(base_url=base, timeout=10, headers=clients[tenants[0]].headers) as c:
            for _ in range(20):
                assert c.get("/healthz").status_code == 200
                assert c.get("/readyz").status_code == 200
                assert c.get(f"/v1/jobs/{jobs[tenants[0]]}").json()["state"] == "queued"
                assert c.get("/v1/environments").json()["total"] == 2
    assert "Traceback" not in log.read_text(errors="replace")


def test_streams_leave_a_process_threads_for_other_requests(backend: Backend, tenants: list[str]) -> None:
    tenants.append("busy")
    job = parked_job("busy", "b")
    with api_server(backend.env, processes=1, threads=8) as base, _client(base, "busy") as c, ExitStack() as open_:
        answers = [_open(c, open_, job).status_code for _ in range(per_process_cap(8) + 1)]
        assert answers == [200] * per_process_cap(8) + [503]
        assert c.get("/healthz", timeout=10).status_code == 200
        assert c.get(f"/v1/jobs/{job}", timeout=10).status_code == 200
