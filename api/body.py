"""Request bodies, checked before a route sees them: at most MAX_BODY_BYTES however they are sent,
and JSON that parses -- or one clear 4xx naming "body", never a 500.

Two gaps this closes. werkzeug stops reading a chunked body (no Content-Length) silently at exactly
the limit, so a 2 MB body arrived as 1 MB of truncated JSON (422) instead of a 413. And Python's
JSON parser raises RecursionError (not ValueError) on deeply nested input, which Flask does not
catch."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

from flask import Flask, Request, request
from flask.json.provider import DefaultJSONProvider

from api.errors import ApiError

MAX_BODY_BYTES = 1024 * 1024
# How much more of an oversized streamed body is read (and dropped) before the 413 goes out: a
# client writes its whole body before it reads the answer, and gunicorn drains only 64 KiB before
# it closes, so without this the client sees a reset connection instead of the 413.
DRAIN_BYTES = 8 * MAX_BODY_BYTES
_READ = 64 * 1024


def read_at_most(stream: Any, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of ``stream``, and whether there was more."""
    out = bytearray()
    while len(out) <= limit:
        chunk = stream.read(min(_READ, limit + 1 - len(out)))
        if not chunk:
            return bytes(out), False
        out += chunk
    return bytes(out[:limit]), True


def drain(stream: Any, limit: int) -> None:
    left = limit
    while left > 0 and (chunk := stream.read(min(_READ, left))):
        left -= len(chunk)


class StreamedBodyLimit:
    """WSGI middleware: a body sent without Content-Length (chunked) is read here, up to the limit,
    and handed on with its length, so werkzeug's own Content-Length check applies to it too: one
    over the limit reaches Flask declared as ``limit + 1`` bytes and is answered 413."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            body, more = read_at_most(environ["wsgi.input"], self.limit)
            if more:
                drain(environ["wsgi.input"], DRAIN_BYTES)
                body = b""
            environ.pop("HTTP_TRANSFER_ENCODING")
            environ["CONTENT_LENGTH"] = str(self.limit + 1 if more else len(body))
            environ["wsgi.input"] = io.BytesIO(body)
        return self.app(environ, start_response)


class JSONProvider(DefaultJSONProvider):
    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


class ApiRequest(Request):
    def on_json_loading_failed(self, e: ValueError | None) -> Any:
        raise ApiError(422, "invalid_json", f"the body is not valid JSON: {e}" if e else "the body must be JSON",
                       "body")


def _parse_json_body() -> None:
    # flask-openapi3 parses with silent=True, which turns any parse error into "body: Input should be
    # a valid dictionary"; parsing here first (the result is cached) says what is wrong.
    if request.is_json and request.content_length:
        request.get_json()


def install(app: Flask) -> None:
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.request_class = ApiRequest
    app.json = JSONProvider(app)
    app.before_request(_parse_json_body)
    app.wsgi_app = StreamedBodyLimit(app.wsgi_app, MAX_BODY_BYTES)  # type: ignore[method-assign]
