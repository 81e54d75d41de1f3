"""Live per-node progress of a clone job, drawn from its SSE stream with rich progress bars."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from api.cli.client import Client
from api.cli.safety import print_safety
from shared.states import CLONE_STEPS, JobState, Step, StepState

STEPS = [str(s) for s in CLONE_STEPS]
SHARE = 100 / len(STEPS)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _node_completed(node: dict[str, Any]) -> float:
    done = sum(SHARE for s in node["steps"] if StepState(s["state"]).done)
    return min(100.0, done)


def watch(client: Client, job_id: str, console: Console | None = None) -> dict[str, Any]:
    """Render until the job ends; returns the final job."""
    console = console or Console()
    job = client.get(f"/v1/jobs/{job_id}")
    console.print(f"job [bold]{job_id}[/]: {job['source']} -> {job['target']}")
    columns = (TextColumn("{task.fields[node]:<12}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bars: dict[str, Any] = {}

        def bar(name: str, completed: float = 0) -> Any:
            # A job the start task has not planned yet has no nodes: a bar appears with its first event.
            if name not in bars:
                bars[name] = progress.add_task("", total=100, node=name, status="queued", completed=completed)
            return bars[name]

        for n in job["nodes"]:
            bar(n["name"], _node_completed(n))
        overall = progress.add_task("", total=100, node="[bold]overall", status=job["state"],
                                    completed=job["percent"])
        downtime: dict[str, str] = {}
        for event, data in client.events(job_id):
            if event == "step":
                node, step, state = data["node"], data["step"], data["state"]
                done = STEPS.index(step) + (1 if StepState(state).done else 0)
                status = f"{step} {state}" + (f" (attempt {data['attempt']})" if data.get("attempt", 1) > 1 else "")
                if step == Step.RESTART and state == StepState.SUCCEEDED:
                    downtime[node] = "source back"
                progress.update(bar(node), completed=done * SHARE, status=status + (
                    f" · {downtime[node]}" if node in downtime else ""))
            elif event == "progress":
                node = data["node"]
                frac = data["bytes_copied"] / data["bytes_total"] if data["bytes_total"] else 1.0
                copied = f"{_fmt_bytes(data['bytes_copied'])}/{_fmt_bytes(data['bytes_total'])}"
                progress.update(bar(node), completed=(Step.PROVISION.seq + frac) * SHARE,
                                status=f"provision {copied}")
            if "percent" in data:
                progress.update(overall, completed=data["percent"], status=data.get("job_state", ""))
            if event == "end":
                break
        job = client.get(f"/v1/jobs/{job_id}")
        progress.update(overall, completed=job["percent"], status=job["state"])
        for node in job["nodes"]:
            last = next((s for s in reversed(node["steps"]) if s["state"] != "pending"), node["steps"][-1])
            extra = f" · downtime {node['downtime_ms']} ms" if node["downtime_ms"] is not None else ""
            progress.update(bar(node["name"]), completed=_node_completed(node),
                            status=f"{last['step']} {last['state']}{extra}")
    style = "green" if job["state"] == JobState.SUCCEEDED else "red"
    console.print(f"[{style}]job {job['state']}[/]" + (f": {job['error']}" if job.get("error") else ""))
    print_safety(console, job)
    return job
