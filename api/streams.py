"""Bounds on open event streams (SSE). Per tenant (ENVCLONE_MAX_STREAMS_PER_TENANT), counted in
Redis so every API process on every host sees one number: a sorted set per tenant whose members are
open streams, scored by when their slot expires. A stream refreshes its slot while it runs and
releases it when it ends or its client goes; the slot of a process that died expires by itself.
Per process, streams never take the last threads (ordinary requests need them)."""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import uuid

import redis

from api.errors import ApiError

log = logging.getLogger("envclone.api.streams")

SLOT_TTL_S = 30.0  # a slot nobody refreshed for this long is free: the process holding it died
REFRESH_S = SLOT_TTL_S / 3
RESERVED_THREADS_MIN = 4  # a worker's threads that streams leave to ordinary requests (at least)

# KEYS[1] the tenant's set; ARGV: cap, slot TTL, member. Returns nil when the slot was taken, else
# the open streams' members (each names when its stream ends at the latest).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return redis.call('ZRANGE', KEYS[1], 0, -1)
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])))
return false
"""
_REFRESH = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(ARGV[1]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])))
"""


def key(tenant: str) -> str:
    return f"envclone:streams:{tenant}"


def per_process_cap(threads: int) -> int:
    return max(1, threads - max(RESERVED_THREADS_MIN, threads // 8))


def retry_after(members: list[bytes], now: float) -> int:
    """Seconds until the oldest open stream ends at the latest (each member is "<ends_at>:<id>")."""
    ends = [float(m.split(b":", 1)[0]) for m in members]
    return max(1, math.ceil(min(ends) - now)) if ends else 1


def peer_closed(sock: socket.socket | None) -> bool:
    """The client closed its connection (peeked: nothing is consumed). False when unknown."""
    if sock is None:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


class Slot:
    """One open stream's place; release() is idempotent."""

    def __init__(self, limiter: StreamLimiter, tenant: str, member: str) -> None:
        self.limiter, self.key, self.member = limiter, key(tenant), member
        self.refreshed = time.monotonic()
        self._released = False

    def keep(self) -> None:
        """Refresh the slot if it is due (call it while the stream runs)."""
        if time.monotonic() - self.refreshed < REFRESH_S:
            return
        self.refreshed = time.monotonic()
        try:
            self.limiter.refresh_script(keys=[self.key], args=[SLOT_TTL_S, self.member])
        except redis.RedisError as exc:
            log.warning("stream slot %s not refreshed: %s", self.member, exc)

    def release(self, taken: bool = True) -> None:
        """``taken=False``: the slot never made it into Redis (refused, or Redis unreachable)."""
        with self.limiter.lock:
            if self._released:
                return
            self._released = True
            self.limiter.in_process -= 1
        if not taken:
            return
        try:
            self.limiter.redis.zrem(self.key, self.member)
        except redis.RedisError as exc:  # it expires by itself
            log.warning("stream slot %s not released: %s", self.member, exc)


class StreamLimiter:
    def __init__(self, redis_url: str, per_tenant: int, max_stream_s: float, threads: int) -> None:
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.acquire_script = self.redis.register_script(_ACQUIRE)
        self.refresh_script = self.redis.register_script(_REFRESH)
        self.per_tenant, self.max_stream_s = per_tenant, max_stream_s
        self.per_process = per_process_cap(threads)
        self.lock = threading.Lock()
        self.in_process = 0

    def acquire(self, tenant: str) -> Slot:
        """A slot for one more stream of ``tenant``, or ApiError 429 (tenant at its cap) / 503."""
        with self.lock:
            if self.in_process >= self.per_process:
                raise ApiError(503, "server_busy", "this API process serves as many event streams as it can; "
                               "retry (another process may take it)", headers={"Retry-After": "1"})
            self.in_process += 1
        slot = Slot(self, tenant, f"{int(time.time() + self.max_stream_s)}:{uuid.uuid4().hex}")
        try:
            refused = self.acquire_script(keys=[slot.key], args=[self.per_tenant, SLOT_TTL_S, slot.member])
        except redis.RedisError as exc:
            slot.release(taken=False)
            raise ApiError(503, "broker_unavailable", f"cannot count open event streams: {exc}",
                           headers={"Retry-After": "5"}) from exc
        if refused is not None:
            slot.release(taken=False)
            wait = retry_after(refused, time.time())
            raise ApiError(429, "too_many_streams", f"this tenant has {self.per_tenant} event streams open, the "
                           f"most allowed; close one or retry in {wait} s", headers={"Retry-After": str(wait)})
        return slot
