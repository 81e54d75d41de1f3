"""The pure parts of bounded event streams: Retry-After, the per-process reserve, seeing a client
go, and the CLI's reading of a stream."""

from __future__ import annotations

import socket

from api.cli.client import sse
from api.streams import peer_closed, per_process_cap, retry_after


def test_retry_after_is_when_the_oldest_stream_ends_at_the_latest() -> None:
    members = [b"1000:aa", b"1040:bb", b"1300:cc"]
    assert retry_after(members, now=990.0) == 10
    assert retry_after(members, now=1000.5) == 1  # never 0: a client would hammer
    assert retry_after([], now=0.0) == 1


def test_streams_leave_threads_to_ordinary_requests() -> None:
    assert per_process_cap(128) == 112
    assert per_process_cap(8) == 4
    assert per_process_cap(2) == 1
    assert all(per_process_cap(t) < t for t in range(2, 300))


def test_a_closed_client_is_seen_without_reading_anything() -> None:
    server, client = socket.socketpair()
    with server, client:
        assert not peer_closed(server)
        client.sendall(b"GET / HTTP/1.1\r\n")  # a pipelined request is not a goodbye, and is not consumed
        assert not peer_closed(server)
        assert server.recv(100) == b"GET / HTTP/1.1\r\n"
        client.close()
        assert peer_closed(server)
    assert not peer_closed(None)


def test_the_cli_reads_events_ids_and_skips_comments() -> None:
    lines = [": open", "", "id: 4", "event: step", 'data: {"a": 1}', "", ": keepalive", "",
             "event: resume", 'data: {"last_event_id": 4}', ""]
    assert list(sse(lines)) == [("step", 4, {"a": 1}), ("resume", None, {"last_event_id": 4})]
