"""The `webapp` stack: runs shared.stacks.webapp_server with its connection strings in config/.env."""

from __future__ import annotations

import sys

import httpx

from shared.stacks.base import NodeContext, Stack

ENV_FILE = "config/.env"


class WebappStack(Stack):
    name = "webapp"
    default_port = 8080
    config_files = (ENV_FILE,)

    def init(self, ctx: NodeContext, config: dict[str, str]) -> None:
        super().init(ctx, config)
        lines = [f"{key}={value}" for key, value in sorted(config.items())]
        (ctx.volume / ENV_FILE).write_text("\n".join(lines) + "\n")

    def command(self, ctx: NodeContext) -> tuple[list[str], dict[str, str]]:
        argv = [sys.executable, "-m", "shared.stacks.webapp_server",
                "--env-file", str(ctx.volume / ENV_FILE), "--address", ctx.address, "--port", str(ctx.port)]
        return argv, {}

    def check(self, ctx: NodeContext) -> str:
        response = httpx.get(f"http://{ctx.address}:{ctx.port}/healthz", timeout=2.0)
        response.raise_for_status()
        return "HTTP 200"

    def url(self, ctx: NodeContext) -> str:
        return f"http://{ctx.address}:{ctx.port}/"
