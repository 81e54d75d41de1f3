"""A small HTTP client for the CLI: one place that turns API errors into one-line messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


class CliError(Exception):
    """Printed as a single line, exit status 1."""


class Client:
    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        if not token:
            raise CliError("no API token: pass --token or set ENVCLONE_TOKEN (envclone token create --tenant NAME)")
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout,
                                 headers={"Authorization": f"Bearer {token}"})

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach {self.http.base_url}: {exc}") from None
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                where = f" ({err['field']})" if err.get("field") else ""
                raise CliError(f"{err['message']}{where} [HTTP {response.status_code} {err['code']}]")
            except (ValueError, KeyError, TypeError):
                raise CliError(f"HTTP {response.status_code}: {response.text[:200]}") from None
        return response.json()

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=body, **kw)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (event, data) from the job's SSE stream until the server closes it."""
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    self.request("GET", f"/v1/jobs/{job_id}")  # raises the API's error
                event, data = "", ""
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = line[6:]
                    elif line == "" and event:
                        yield event, json.loads(data or "{}")
                        event, data = "", ""
        except httpx.HTTPError as exc:
            raise CliError(f"event stream broke: {exc}") from None
