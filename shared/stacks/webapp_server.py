"""The `webapp` stack's program: a small HTTP app that, like real apps, keeps its connection strings
in an .env file in its volume. It is the app whose config goes stale when an environment is cloned.

    GET /         -> {"database": "host:port", "items": N, "cache": {"address": ..., "value": ...}}
    POST /items   {"name": "..."} -> 201 {"id": N, "webhook": "sent" | "failed" | "off"}
    PUT /cache    {"value": "..."} -> 200
    GET /healthz  -> 200 while the process serves (dependencies are reported by GET /)

Like a real app it has a side effect beyond its own data: when WEBHOOK_URL is set in its .env,
every new item is POSTed there as JSON ({"event": "item.created", "id", "name"}) -- best effort,
with a short timeout, never failing the request. A clone must not call production's webhook.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import psycopg
import redis

CACHE_KEY = "webapp:value"
WEBHOOK_TIMEOUT_S = 2.0
# No proxy from the environment: the call goes where the .env says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def read_env(path: Path) -> dict[str, str]:
    """KEY=value lines. A line ends at "\n" only: str.splitlines() (and read_text()'s universal
    newlines) would also break at \r, \x0b, \x0c, \x1c-\x1e, U+0085, U+2028 and U+2029, letting a
    value that holds one add a line of its own -- one that could override DATABASE_URL."""
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_bytes().decode().split("\n"):
            line = line.strip(" \t\r")
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip(" \t")] = value.strip(" \t")
    return values


class App:
    def __init__(self, env_file: Path) -> None:
        self.env_file = env_file

    def _db(self) -> psycopg.Connection:
        url = read_env(self.env_file).get("DATABASE_URL", "")
        if not url:
            raise LookupError("DATABASE_URL is not set")
        conn = psycopg.connect(url, connect_timeout=3, autocommit=True)
        conn.execute("CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, name text NOT NULL)")
        return conn

    def _cache(self) -> redis.Redis:
        url = read_env(self.env_file).get("CACHE_URL", "")
        if not url:
            raise LookupError("CACHE_URL is not set")
        return redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)

    def status(self) -> dict[str, object]:
        with self._db() as conn:
            host, port = conn.execute("SELECT host(inet_server_addr()), inet_server_port()").fetchone()
            count = conn.execute("SELECT count(*) FROM items").fetchone()[0]
        result: dict[str, object] = {"database": f"{host}:{port}", "items": count}
        try:
            with self._cache() as cache:
                kw = cache.connection_pool.connection_kwargs
                value = cache.get(CACHE_KEY)
                result["cache"] = {"address": f"{kw['host']}:{kw['port']}",
                                   "value": value.decode() if value is not None else None}
        except LookupError:
            result["cache"] = None
        return result

    def add_item(self, name: str) -> int:
        with self._db() as conn:
            return conn.execute("INSERT INTO items (name) VALUES (%s) RETURNING id", (name,)).fetchone()[0]

    def notify(self, event: dict[str, object]) -> str:
        """POST ``event`` to WEBHOOK_URL: "sent", "failed" (never raised) or "off" (none set)."""
        url = read_env(self.env_file).get("WEBHOOK_URL", "")
        if not url:
            return "off"
        if urlparse(url).scheme not in ("http", "https"):
            return "failed"
        request = urllib.request.Request(url, data=json.dumps(event).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(request, timeout=WEBHOOK_TIMEOUT_S) as response:
                response.read(1024)
        except (OSError, ValueError):  # refused, timed out, an HTTP error status, a bad URL
            return "failed"
        return "sent"

    def set_cache(self, value: str) -> None:
        with self._cache() as cache:
            cache.set(CACHE_KEY, value)


def make_handler(app: App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _json_body(self) -> dict[str, object]:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            return body

        def _guard(self, fn) -> None:  # type: ignore[no-untyped-def]
            try:
                fn()
            except (ValueError, KeyError) as exc:
                self._send(400, {"error": str(exc)})
            except (LookupError, psycopg.Error, redis.RedisError, OSError) as exc:
                self._send(503, {"error": f"{type(exc).__name__}: {exc}"})

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            if path == "/healthz":
                self._send(200, {"ok": True})
            elif path == "/":
                self._guard(lambda: self._send(200, app.status()))
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            if urlparse(self.path).path != "/items":
                self._send(404, {"error": "not found"})
                return

            def post() -> None:
                name = str(self._json_body()["name"])
                item = app.add_item(name)
                hook = app.notify({"event": "item.created", "id": item, "name": name})
                self._send(201, {"id": item, "webhook": hook})

            self._guard(post)

        def do_PUT(self) -> None:
            if urlparse(self.path).path != "/cache":
                self._send(404, {"error": "not found"})
                return

            def put() -> None:
                value = str(self._json_body()["value"])
                app.set_cache(value)
                self._send(200, {"value": value})

            self._guard(put)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per request would drown the node log

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env-file", type=Path, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.address, args.port), make_handler(App(args.env_file)))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
