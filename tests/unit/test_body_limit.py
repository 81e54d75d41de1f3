"""A streamed (chunked) body is counted against the size limit before Flask reads it."""

from __future__ import annotations

import io
from typing import Any

from api.body import MAX_BODY_BYTES, StreamedBodyLimit, drain, read_at_most


def test_read_at_most_says_whether_more_was_sent() -> None:
    assert read_at_most(io.BytesIO(b"x" * 10), 10) == (b"x" * 10, False)
    assert read_at_most(io.BytesIO(b"x" * 11), 10) == (b"x" * 10, True)
    assert read_at_most(io.BytesIO(b""), 10) == (b"", False)
    assert read_at_most(io.BytesIO(b"x" * 300_000), 200_000)[1] is True


def _through(body: bytes, limit: int, chunked: bool = True) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ, body=environ["wsgi.input"].read())
        return []

    environ = {"wsgi.input": io.BytesIO(body), "REQUEST_METHOD": "POST"}
    if chunked:
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    StreamedBodyLimit(app, limit)(environ, None)
    return seen


def test_a_chunked_body_reaches_the_app_with_its_length() -> None:
    seen = _through(b'{"a": 1}', 100)
    assert seen["CONTENT_LENGTH"] == "8" and seen["body"] == b'{"a": 1}' and "HTTP_TRANSFER_ENCODING" not in seen


def test_a_chunked_body_over_the_limit_is_declared_over_it() -> None:
    seen = _through(b"x" * 101, 100)
    assert seen["CONTENT_LENGTH"] == "101" and seen["body"] == b""


def test_a_body_with_content_length_is_left_alone() -> None:
    seen = _through(b"x" * 500, 100, chunked=False)
    assert "CONTENT_LENGTH" not in seen and seen["body"] == b"x" * 500



def test_the_rest_of_an_oversized_body_is_read_so_the_client_can_finish_sending() -> None:
    stream = io.BytesIO(b"x" * 3000)
    drain(stream, 500)
    assert stream.tell() == 500
    drain(stream, 10_000)
    assert stream.tell() == 3000
    sent = io.BytesIO(b"x" * (MAX_BODY_BYTES * 2))
    StreamedBodyLimit(lambda environ, start_response: [], MAX_BODY_BYTES)(
        {"wsgi.input": sent, "HTTP_TRANSFER_ENCODING": "chunked"}, None)
    assert sent.tell() == len(sent.getvalue())  # all of it read, within DRAIN_BYTES
