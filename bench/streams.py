"""Event streams beside ordinary requests: GET /healthz latency (and GET /v1/jobs/{id}, an ordinary
authenticated call that reads the database) with no stream open, then with 100 SSE streams open,
on the server model `envclone up` runs (api/gunicorn_conf.py) with real PostgreSQL and Redis.

The streams follow jobs that stay queued (planned, never sent to a worker), so they stay open for
as long as the measurement lasts, measured twice: quiet (no event: a queued job, a long copy) and
active (every job gets 2 events a second, as running jobs do, and every stream sends them). They
belong to 6 tenants, so the per-tenant cap refuses none. Probes are a closed loop of a few
clients, each sending its next request when the last one answered."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import redis

from api.auth import create_token
from api.streams import key as streams_key
from bench.common import median, pct
from shared.config import get_settings
from shared.db import session_scope
from shared.models import JobEvent
from tests.helpers import wait_for
from tests.integration.test_api_server import api_server
from tests.stack import Backend
from tests.workflow_client import parked_job

STREAMS = 100
TENANTS = 6  # 17 streams each: under the default cap of 20


async def _probe(base: str, path: str, token: str, clients: int, per_client: int) -> list[float]:
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        for _ in range(per_client):
            start = time.perf_counter()
            response = await http.get(path)
            latencies.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, response.text

    http = [httpx.AsyncClient(base_url=base, timeout=60, headers={"Authorization": f"Bearer {token}"})
            for _ in range(clients)]
    try:
        await asyncio.gather(*(h.get("/healthz") for h in http))  # connected before the clock starts
        await asyncio.gather(*(client(h) for h in http))
    finally:
        await asyncio.gather(*(h.aclose() for h in http))
    return latencies


async def _measure(base: str, job: str, token: str, clients: int, per_client: int) -> dict[str, float]:
    health = await _probe(base, "/healthz", token, clients, per_client)
    job_get = await _probe(base, f"/v1/jobs/{job}", token, clients, per_client // 3)
    return {"healthz_p50_ms": median(health), "healthz_p99_ms": pct(health, 99), "healthz_n": len(health),
            "job_get_p50_ms": median(job_get), "job_get_p99_ms": pct(job_get, 99), "job_get_n": len(job_get)}


class Feeder:
    """Writes a progress event to each job every ``interval`` s, as running jobs do: their streams
    keep receiving and keep polling at the busy rate."""

    def __init__(self, jobs: list[str], interval: float = 0.5) -> None:
        self.jobs, self.interval, self.stop = jobs, interval, threading.Event()
        self.thread = threading.Thread(target=self._feed, daemon=True)

    def _feed(self) -> None:
        n = 0
        while not self.stop.wait(self.interval):  # the pace of a running job's events
            n += 1
            with session_scope() as session:
                session.add_all(JobEvent(job_id=j, kind="progress", data={"node": "cache", "n": n}) for j in self.jobs)

    def __enter__(self) -> Feeder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


async def _hold(base: str, jobs: list[tuple[str, str]], streams: int, counts: Any, stop: Any) -> None:
    """Open ``streams`` streams (round robin over the jobs) and read them until ``stop`` is set."""

    async def hold(http: httpx.AsyncClient, i: int) -> None:
        token, job = jobs[i % len(jobs)]
        async with http.stream("GET", f"/v1/jobs/{job}/events", headers={"Authorization": f"Bearer {token}"},
                               timeout=httpx.Timeout(60, read=None)) as response:
            with counts.get_lock():
                counts[0 if response.status_code == 200 else 1] += 1
            async for _ in response.aiter_raw():
                pass

    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, limits=limits) as http:
        holders = [asyncio.create_task(hold(http, i)) for i in range(streams)]
        while not stop.is_set():
            await asyncio.sleep(0.1)  # poll: the parent's signal to close them
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)


def _holder_process(base: str, jobs: list[tuple[str, str]], streams: int, counts: Any, stop: Any) -> None:
    asyncio.run(_hold(base, jobs, streams, counts, stop))


def _with_streams(base: str, jobs: dict[str, tuple[str, str]], streams: int, settle_s: float,
                  probe: Callable[[], Awaitable[dict[str, float]]]) -> dict[str, Any]:
    """``probe`` while ``streams`` streams are open. The streams are held (and read) by a process of
    their own, so their traffic does not slow the probes' event loop."""
    ctx = multiprocessing.get_context("spawn")
    counts, stop = ctx.Array("i", 2), ctx.Event()
    holder = ctx.Process(target=_holder_process, args=(base, list(jobs.values()), streams, counts, stop))
    holder.start()
    try:
        started = time.perf_counter()
        wait_for(lambda: sum(counts) == streams, timeout=120, interval=0.05, what="the streams to open")
        open_s = time.perf_counter() - started
        time.sleep(settle_s)  # settle: every stream's server thread in its steady polling
        figures = asyncio.run(probe())
    finally:
        stop.set()
        holder.join(timeout=60)
    # Their slots are given back once the server sees the clients gone: wait, so the next phase starts clean.
    slots = redis.Redis.from_url(get_settings().broker_url)
    wait_for(lambda: not any(slots.zcard(streams_key(t)) for t in jobs), timeout=60, what="stream slots released")
    return {**figures, "streams_open": counts[0], "streams_refused": counts[1], "open_all_s": open_s}


def _line(label: str, r: dict[str, Any]) -> str:
    return (f"{label}: /healthz p50/p99 {r['healthz_p50_ms']:.1f}/{r['healthz_p99_ms']:.1f} ms, "
            f"GET /v1/jobs/{{id}} p50/p99 {r['job_get_p50_ms']:.1f}/{r['job_get_p99_ms']:.1f} ms")


def run(streams: int = STREAMS, clients: int = 4, per_client: int = 150) -> dict[str, Any]:
    with Backend(pool="127.108.0.0/16") as backend:
        backend.stop_worker()  # the API alone: no job moves, every stream stays open
        jobs = {f"st-{i}": (create_token(f"st-{i}"), parked_job(f"st-{i}", "src")) for i in range(TENANTS)}
        token, job = next(iter(jobs.values()))
        settings = get_settings()

        def probe() -> Awaitable[dict[str, float]]:
            return _measure(base, job, token, clients, per_client)

        with api_server(backend.env) as base:
            asyncio.run(probe())  # warm-up (first requests of each process), not counted
            idle = asyncio.run(probe())
            quiet = _with_streams(base, jobs, streams, 2, probe)
            with Feeder([j for _, j in jobs.values()]):
                active = _with_streams(base, jobs, streams, 2, probe)
    result = {"streams": streams, "tenants": TENANTS, "probe_clients": clients,
              "server": f"gunicorn gthread, {settings.api_workers} processes x {settings.api_threads} threads",
              "idle": idle, "quiet_streams": quiet, "active_streams": active}
    print(_line("streams: 0 open", idle), flush=True)
    for label, r in ((f"{streams} quiet streams (queued jobs)", quiet), (f"{streams} active streams (2 events/s "
                                                                         "each)", active)):
        print(_line(f"streams: {label}, {r['streams_refused']} refused", r) + " (target /healthz p99 < 200 ms)",
              flush=True)
    return result
