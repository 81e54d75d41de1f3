"""Orchestration overhead: clones of N tiny nodes (N = 1, 10, 50) through the real workflow (real
broker, PostgreSQL state, a 4-process worker). Wall time against the steps' own work time, and the
overhead per step two ways: a node chain's span minus the work its five steps did, divided by five
(includes waiting for a free worker process once N exceeds them); and the wall time beyond the
machine's floor -- max(longest chain's work, all work / cores) -- divided by the number of steps."""

from __future__ import annotations

import os
import time
from typing import Any

from bench.common import median, ratio
from shared.models import CLONE_STEPS
from tests.stack import Backend
from tests.workflow_client import clone, create_environment, delete_environment


def run(sizes: list[int], concurrency: int = 4) -> list[dict[str, Any]]:
    results = []
    with Backend(pool="127.111.0.0/16", concurrency=concurrency) as backend:
        for n in sizes:
            create_environment(f"orch{n}", [{"name": f"n{i:02d}", "stack": "valkey"} for i in range(n)], timeout=300)
            started = time.perf_counter()
            job = clone(f"orch{n}", f"orch{n}-copy", timeout=600)
            wall_ms = (time.perf_counter() - started) * 1000
            assert job.state == "succeeded", job.error
            work_ms = sum(s.detail.get("work_ms", 0) for s in job.steps)
            per_step = []
            for jn in job.nodes:
                steps = [s for s in job.steps if s.source_node_id == jn.source_node_id]
                span = (max(s.finished_at for s in steps) - min(s.started_at for s in steps)).total_seconds() * 1000
                per_step.append((span - sum(s.detail.get("work_ms", 0) for s in steps)) / len(CLONE_STEPS))
            r = {"nodes": n, "workers": concurrency, "wall_ms": wall_ms, "work_ms_sum": work_ms,
                 "critical_work_ms": max(sum(s.detail.get("work_ms", 0) for s in job.steps
                                             if s.source_node_id == jn.source_node_id) for jn in job.nodes),
                 "overhead_per_step_ms_median": median(per_step), "overhead_per_step_ms_max": max(per_step)}
            # The machine's floor: the longest node chain's own work, or all work spread over the
            # cores, whichever is more. What the wall spends beyond it is orchestration, queueing aside.
            r["floor_ms"] = max(r["critical_work_ms"], work_ms / (os.cpu_count() or 1))
            r["beyond_floor_per_step_ms"] = (wall_ms - r["floor_ms"]) / (n * len(CLONE_STEPS))
            r["wall_over_work"] = ratio(wall_ms, work_ms)
            # Source downtime as the workflow sees it: quiesce, snapshot and restart are three tasks,
            # so the window also holds two hand-offs between workers and their bookkeeping.
            r["workflow_downtime_ms_median"] = median([jn.downtime_ms for jn in job.nodes])
            r["workflow_downtime_ms_max"] = max(jn.downtime_ms for jn in job.nodes)
            results.append(r)
            print(f"orchestration N={n:>3}: wall {wall_ms:8.0f} ms  steps' own work {work_ms:8.0f} ms "
                  f"(sum)  overhead/step median {r['overhead_per_step_ms_median']:6.1f} ms", flush=True)
            delete_environment(f"orch{n}-copy", timeout=300)
            delete_environment(f"orch{n}", timeout=300)
        assert backend is not None
    by_n = {r["nodes"]: r for r in results}
    if 10 in by_n and 50 in by_n:
        scale = by_n[50]["wall_ms"] / by_n[10]["wall_ms"]
        for r in results:
            r["wall_50_over_10"] = scale
        print(f"orchestration wall(N=50) / wall(N=10) = {scale:.2f} (target <= 2)", flush=True)
    return results
