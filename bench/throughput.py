"""Throughput: clone jobs completed per minute with 2 and with 4 worker processes; and the API's
enqueue latency with 50 concurrent clients (gunicorn as `envclone up` runs it, real PostgreSQL and
Redis), beside the latency of GET /healthz under the same load (the HTTP stack's own floor).

Two kinds of load: closed (each client sends its next request the moment the last one answers:
latency is then clients / throughput, whatever the server does) and paced (each client sends at a
steady rate with random spacing, latency counted from the moment the request was due, so a slow
server is not hidden by sending less)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from api.auth import create_token
from bench.common import median, pct, ratio, timed
from tests.integration.test_api_server import api_server
from tests.stack import Backend
from tests.workflow_client import create_environment, delete_environment, start_clone, wait_job


def jobs_per_minute(workers: int, jobs: int) -> dict[str, Any]:
    with Backend(pool="127.112.0.0/16", concurrency=workers):
        create_environment("tp", [{"name": "cache", "stack": "valkey"}])
        started = time.perf_counter()
        ids = [start_clone("tp", f"tp-{i:03d}") for i in range(jobs)]
        done = [wait_job(i, timeout=900) for i in ids]
        minutes = (time.perf_counter() - started) / 60
        assert all(j.state == "succeeded" for j in done)
        for i in range(jobs):
            delete_environment(f"tp-{i:03d}", timeout=300)
        delete_environment("tp")
    return {"workers": workers, "jobs": jobs, "jobs_per_minute": jobs / minutes}


@asynccontextmanager
async def _connected(base: str, token: str, clients: int) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One HTTP client (one connection) per simulated user, made and connected before any clock
    starts: building 50 clients takes the event loop most of a second, which is the load
    generator's time, not the server's."""
    http = [httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)
            for _ in range(clients)]
    try:
        await asyncio.gather(*(h.get("/healthz") for h in http))
        yield http
    finally:
        await asyncio.gather(*(h.aclose() for h in http))


async def _request(http: httpx.AsyncClient, clone: bool, name: str) -> None:
    if clone:
        r = await http.post("/v1/environments/lat/clones", json={"name": name})
        assert r.status_code == 202, r.text
    else:
        r = await http.get("/healthz")
        assert r.status_code == 200


async def _load(base: str, token: str, clients: int, per_client: int, clone: bool) -> list[float]:
    """Closed loop: each client sends its next request as soon as the last one answered."""
    latencies: list[float] = []

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for i in range(per_client):
            start = time.perf_counter()
            await _request(http, clone, f"l-{c:02d}-{i:03d}")
            latencies.append((time.perf_counter() - start) * 1000)

    async with _connected(base, token, clients) as http:
        await asyncio.gather(*(client(c, h) for c, h in enumerate(http)))
    return latencies


async def _paced(base: str, token: str, clients: int, rate: float, seconds: float, clone: bool) -> list[float]:
    """Each client sends ``rate`` requests/s on average (exponential spacing) for ``seconds``;
    latency counts from when a request was due, so a late send is the server's delay too."""
    latencies: list[float] = []
    rng = random.Random(7)

    async def client(c: int, http: httpx.AsyncClient) -> None:
        due, end, i = time.perf_counter() + rng.expovariate(rate), time.perf_counter() + seconds, 0
        while due < end:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))  # pacing the load, not a wait
            await _request(http, clone, f"p-{c:02d}-{i:04d}")
            latencies.append((time.perf_counter() - due) * 1000)
            due, i = due + rng.expovariate(rate), i + 1

    async with _connected(base, token, clients) as http:
        await asyncio.gather(*(client(c, h) for c, h in enumerate(http)))
    return latencies


def _figures(prefix: str, enq: list[float], floor: list[float], seconds: float) -> dict[str, float]:
    return {f"{prefix}_requests": len(enq), f"{prefix}_enqueue_per_s": len(enq) / seconds,
            f"{prefix}_enqueue_p50_ms": median(enq), f"{prefix}_enqueue_p99_ms": pct(enq, 99),
            f"{prefix}_healthz_p50_ms": median(floor), f"{prefix}_healthz_p99_ms": pct(floor, 99)}


def enqueue_latency(clients: int = 50, per_client: int = 10, paced_rate: float = 0.2,
                    paced_s: float = 30.0) -> dict[str, Any]:
    with Backend(pool="127.113.0.0/16") as backend:
        create_environment("lat", [{"name": "cache", "stack": "valkey"}])
        backend.stop_worker()  # measure the API alone: accepted jobs stay queued, then are dropped
        with api_server({**backend.env}) as base:
            token = create_token("acme")
            floor = asyncio.run(_load(base, token, clients, per_client, clone=False))
            took, enq = timed(lambda: asyncio.run(_load(base, token, clients, per_client, clone=True)))
            r = {"clients": clients, "paced_rate_per_client": paced_rate,
                 **_figures("closed", enq, floor, took / 1000)}
            floor = asyncio.run(_paced(base, token, clients, paced_rate, paced_s, clone=False))
            enq = asyncio.run(_paced(base, token, clients, paced_rate, paced_s, clone=True))
            r.update(_figures("paced", enq, floor, paced_s))
    for kind in ("closed", "paced"):
        r[f"{kind}_p99_over_floor"] = ratio(r[f"{kind}_enqueue_p99_ms"], r[f"{kind}_healthz_p99_ms"])
    return r


def _server_cpu_s(port: str) -> float:
    """CPU seconds (user + system) of the gunicorn processes bound to ``port`` (master and workers)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "gunicorn" not in cmd or f":{port}" not in cmd:
                continue
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def enqueue_cpu(n: int = 200) -> dict[str, Any]:
    """Server CPU per enqueue: ``n`` clone requests one after another from one client against
    gunicorn, the server's processes' CPU time before and after; and the same for GET /healthz (the
    HTTP stack's own cost). Also the sequential latency (p50), the figure the old notes call
    "server time when sent alone"."""
    with Backend(pool="127.116.0.0/16") as backend:
        create_environment("cpu", [{"name": "cache", "stack": "valkey"}])
        backend.stop_worker()
        with api_server({**backend.env}) as base:
            port = base.rsplit(":", 1)[1]
            headers = {"Authorization": f"Bearer {create_token('acme')}"}
            out: dict[str, Any] = {"requests": n}
            with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
                for kind in ("healthz", "enqueue"):
                    lat = []
                    before = _server_cpu_s(port)
                    for i in range(n):
                        start = time.perf_counter()
                        if kind == "enqueue":
                            r = http.post("/v1/environments/cpu/clones", json={"name": f"cpu-{i:04d}"})
                            assert r.status_code == 202, r.text
                        else:
                            assert http.get("/healthz").status_code == 200
                        lat.append((time.perf_counter() - start) * 1000)
                    out[f"{kind}_cpu_ms"] = (_server_cpu_s(port) - before) * 1000 / n
                    out[f"{kind}_sequential_p50_ms"] = median(lat)
                    out[f"{kind}_sequential_p99_ms"] = pct(lat, 99)
    return out


def enqueue_only() -> dict[str, Any]:
    """The API's side alone: CPU per enqueue, then paced and closed-loop latency (no clone jobs run)."""
    cpu = enqueue_cpu()
    print(f"enqueue: server CPU {cpu['enqueue_cpu_ms']:.1f} ms per request (GET /healthz "
          f"{cpu['healthz_cpu_ms']:.1f} ms), sequential p50 {cpu['enqueue_sequential_p50_ms']:.1f} ms", flush=True)
    lat = enqueue_latency()
    for kind in ("closed", "paced"):
        print(f"enqueue latency, 50 clients, {kind} load ({lat[f'{kind}_enqueue_per_s']:.0f} req/s): "
              f"p50 {lat[f'{kind}_enqueue_p50_ms']:.1f} ms, p99 {lat[f'{kind}_enqueue_p99_ms']:.1f} ms; "
              f"GET /healthz p99 {lat[f'{kind}_healthz_p99_ms']:.1f} ms", flush=True)
    return {"cpu": cpu, "latency": lat}


def run(jobs: int = 30) -> dict[str, Any]:
    two, four = jobs_per_minute(2, jobs), jobs_per_minute(4, jobs)
    print(f"throughput: {two['jobs_per_minute']:.1f} jobs/min with 2 workers, {four['jobs_per_minute']:.1f} "
          f"with 4 (ratio {ratio(four['jobs_per_minute'], two['jobs_per_minute']):.2f})", flush=True)
    lat = enqueue_latency()
    for kind in ("closed", "paced"):
        print(f"enqueue latency, 50 clients, {kind} load ({lat[f'{kind}_enqueue_per_s']:.0f} req/s): "
              f"p50 {lat[f'{kind}_enqueue_p50_ms']:.1f} ms, p99 {lat[f'{kind}_enqueue_p99_ms']:.1f} ms "
              f"(target p99 < 50 ms); GET /healthz p99 {lat[f'{kind}_healthz_p99_ms']:.1f} ms", flush=True)
    return {"jobs_per_minute": [two, four], "enqueue": lat}
