"""An authenticated client for the Flask app (test client) with SSE reading."""

from __future__ import annotations

import json
from typing import Any

from flask.testing import FlaskClient

from tests.helpers import wait_for


class Api:
    def __init__(self, client: FlaskClient, token: str) -> None:
        self.client, self.token = client, token

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **(extra or {})}

    def get(self, path: str, **kw: Any):
        return self.client.get(path, headers=self.headers(kw.pop("headers", None)), **kw)

    def post(self, path: str, body: Any = None, **kw: Any):
        return self.client.post(path, json=body, headers=self.headers(kw.pop("headers", None)), **kw)

    def delete(self, path: str, **kw: Any):
        return self.client.delete(path, headers=self.headers(kw.pop("headers", None)), **kw)

    def events(self, job_id: str, last_event_id: int | None = None) -> list[dict[str, Any]]:
        """Read the job's SSE stream until the server closes it (when the job ends)."""
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        response = self.get(f"/v1/jobs/{job_id}/events", headers=headers, buffered=False)
        assert response.status_code == 200, response.data
        assert response.mimetype == "text/event-stream"
        text = "".join(chunk.decode() for chunk in response.response)
        return parse_sse(text)


def parse_sse(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            fields[key] = value
        if "event" in fields:
            events.append({"id": int(fields["id"]) if "id" in fields else None, "event": fields["event"],
                           "data": json.loads(fields.get("data", "{}"))})
    return events


def wait_running(api: Api, name: str, timeout: float = 120) -> dict[str, Any]:
    """The environment once it runs; fails at once, with its error, if it failed."""
    def running() -> dict[str, Any] | None:
        env = api.get(f"/v1/environments/{name}").json
        assert env["state"] != "failed", env["error"]
        return env if env["state"] == "running" else None

    return wait_for(running, timeout=timeout, what=f"environment {name} running")


def delete_env(api: Api, name: str) -> None:
    assert api.delete(f"/v1/environments/{name}").status_code == 202
    wait_for(lambda: api.get(f"/v1/environments/{name}").status_code == 404, timeout=60, what=f"{name} deleted")


def clone_job(api: Api, source: str, body: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
    """Clone ``source`` with ``body`` and return the job once it succeeded or failed."""
    response = api.post(f"/v1/environments/{source}/clones", body)
    assert response.status_code == 202, response.json
    job_id = response.json["id"]
    return wait_for(lambda: (j := api.get(f"/v1/jobs/{job_id}").json)["state"] in ("succeeded", "failed") and j,
                    timeout=timeout, what=f"clone {body['name']}")
