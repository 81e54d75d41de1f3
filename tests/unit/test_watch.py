"""The CLI's live view of a job that is still unplanned when it starts watching: the request only
admits a job, so its nodes appear with the start task's first events."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from api.cli.watch import watch


def _node(state: str) -> dict[str, Any]:
    steps = ("quiesce", "snapshot", "restart", "provision", "assign_ips")
    return {"name": "cache", "downtime_ms": None, "steps": [{"step": s, "state": state} for s in steps]}


class Recorded:
    """A job as the API answers it: queued with no nodes, then its events, then succeeded."""

    def __init__(self) -> None:
        self.gets = 0

    def get(self, path: str) -> dict[str, Any]:
        self.gets += 1
        done = self.gets > 1
        return {"id": "j1", "source": "shop", "target": "stage", "state": "succeeded" if done else "queued",
                "percent": 100 if done else 0, "error": None, "nodes": [_node("succeeded")] if done else []}

    def events(self, job_id: str):
        yield "step", {"node": "cache", "step": "quiesce", "state": "running", "percent": 5, "job_state": "running"}
        yield "progress", {"node": "cache", "bytes_copied": 1, "bytes_total": 2}
        yield "end", {"percent": 100, "job_state": "succeeded"}


def test_nodes_appear_with_their_first_event() -> None:
    out = io.StringIO()
    job = watch(Recorded(), "j1", Console(file=out, width=120))
    assert job["state"] == "succeeded"
    text = out.getvalue()
    assert "cache" in text and "job succeeded" in text
