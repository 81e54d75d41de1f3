"""A small HTTP client for the CLI: one place that turns API errors into one-line messages."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpx


class CliError(Exception):
    """Printed as a single line, exit status 1."""


RECONNECTS = 5  # attempts in a row, with no event between them, before a broken stream is an error


def sse(lines: Iterable[str]) -> Iterator[tuple[str, int | None, dict[str, Any]]]:
    """(event, id, data) of each event in a stream's lines; comments and unnamed blocks are skipped."""
    event, ident, data = "", None, ""
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("id: "):
            ident = int(line[4:])
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "":
            if event:
                yield event, ident, json.loads(data or "{}")
            event, ident, data = "", None, ""


def retry_after(response: httpx.Response) -> float:
    try:
        return min(60.0, max(1.0, float(response.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1.0


class Client:
    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        if not token:
            raise CliError("no API token: pass --token or set ENVCLONE_TOKEN (envclone token create --tenant NAME)")
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout,
                                 headers={"Authorization": f"Bearer {token}"})
        self.timeout = timeout
        self.reconnects = 0  # event streams picked up again (after `resume`, a break, a 429)

    def _check(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            err = response.json()["error"]
            where = f" ({err['field']})" if err.get("field") else ""
            raise CliError(f"{err['message']}{where} [HTTP {response.status_code} {err['code']}]")
        except (ValueError, KeyError, TypeError):
            raise CliError(f"HTTP {response.status_code}: {response.text[:200]}") from None

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach {self.http.base_url}: {exc}") from None
        self._check(response)
        return response.json()

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=body, **kw)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (event, data) from the job's SSE stream until its `end`. The server ends a stream
        after ENVCLONE_MAX_STREAM_S with `resume`; that, a broken connection or a busy server (429,
        503) makes this reconnect with Last-Event-ID, so the caller sees one unbroken stream."""
        last: int | None = None
        failures = 0
        while True:
            why, wait, progressed = "ended before the job did", 0.5, False
            headers = {"Last-Event-ID": str(last)} if last is not None else {}
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(self.timeout, read=None)) as response:
                    if response.status_code in (429, 503):
                        why, wait = f"refused (HTTP {response.status_code})", retry_after(response)
                    elif response.status_code >= 400:
                        response.read()
                        self._check(response)
                    else:
                        for event, ident, data in sse(response.iter_lines()):
                            progressed = True
                            if event == "resume":
                                why, wait, last = "resume", 0.0, data.get("last_event_id", last)
                                break
                            last = ident if ident is not None else last
                            yield event, data
                            if event == "end":
                                return
            except httpx.TransportError as exc:
                why = f"broke: {exc}"
            failures = 0 if progressed else failures + 1
            if failures > RECONNECTS:
                raise CliError(f"event stream {why}")
            time.sleep(wait)  # what the server asked for, or a short pause before reconnecting
            self.reconnects += 1
