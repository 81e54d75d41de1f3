"""The `webapp` stack: runs shared.stacks.webapp_server with its connection strings in config/.env."""

from __future__ import annotations

import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx

from shared import safefiles
from shared.stacks import webapp_server
from shared.stacks.base import Credentials, NodeContext, Stack, write_private

ENV_FILE = "config/.env"
APP_DIR = "app"
SYSTEM_PYTHON = "/usr/bin/python3"


@lru_cache(maxsize=8)
def _usable(python: str, uid: int | None, gid: int | None) -> bool:
    """Whether the node account can run ``python`` with the app's libraries (psycopg, redis)."""
    kwargs: dict[str, object] = {} if uid is None else {"user": uid, "group": gid, "extra_groups": []}
    try:
        done = subprocess.run([python, "-c", "import psycopg, redis"], capture_output=True, timeout=30,
                              cwd="/", **kwargs)  # type: ignore[arg-type]
    except OSError:
        return False
    return done.returncode == 0


def node_python(ctx: NodeContext) -> str:
    """This interpreter when the node account can use it, else the system's (a root checkout's
    interpreter usually lies under /root, which other accounts cannot reach). Never root instead."""
    uid, gid = (ctx.run_as.uid, ctx.run_as.gid) if ctx.run_as else (None, None)
    for python in (sys.executable, SYSTEM_PYTHON):
        if _usable(python, uid, gid):
            return python
    raise RuntimeError(f"the webapp's account (uid {uid}) can run no Python with psycopg and redis: "
                       "install python3-psycopg and python3-redis (Debian) or run envclone from a "
                       "world-readable virtualenv")


class WebappStack(Stack):
    name = "webapp"
    default_port = 8080
    config_files = (ENV_FILE,)
    online_copy_supported = True  # its volume (code and config) does not change while it serves
    file_actions = frozenset({"config"})

    def init(self, ctx: NodeContext, config: dict[str, str], credentials: Credentials) -> None:
        super().init(ctx, config, credentials)
        lines = [f"{key}={value}" for key, value in sorted(config.items())]
        write_private(ctx.volume / ENV_FILE, "\n".join(lines) + "\n")
        # The app's code is part of its volume, as an app server's is: it is cloned with the node and
        # runs as the node's own account, which need not reach this checkout.
        # The account owns the volume by now, and so could have put a link where app/ goes (another
        # node of its environment runs as it): the code is written without following one.
        (ctx.volume / APP_DIR).mkdir(exist_ok=True)
        safefiles.replace_file(ctx.volume / APP_DIR / "webapp_server.py", Path(webapp_server.__file__).read_bytes())

    def file_action(self, ctx: NodeContext, kind: str, payload: Any) -> dict[str, Any]:
        """``config``: set or override keys of its .env (the last line of a key wins; duplicates go)."""
        if kind != "config":
            return super().file_action(ctx, kind, payload)
        path = ctx.volume / ENV_FILE
        lines = safefiles.read_text(path).splitlines() if path.exists() else []
        kept: list[str] = []
        for line in lines:
            key, eq, _ = line.partition("=")
            if not (eq and key.strip() in payload and not line.lstrip().startswith("#")):
                kept.append(line)
        kept += [f"{key}={value}" for key, value in sorted(payload.items())]
        write_private(path, "\n".join(kept) + "\n")  # keeps the node account as its owner
        return {"keys": sorted(payload)}

    def command(self, ctx: NodeContext) -> tuple[list[str], dict[str, str]]:
        argv = [node_python(ctx), str(ctx.volume / APP_DIR / "webapp_server.py"),
                "--env-file", str(ctx.volume / ENV_FILE), "--address", ctx.address, "--port", str(ctx.port)]
        return argv, {}

    def check(self, ctx: NodeContext) -> str:
        response = httpx.get(f"http://{ctx.address}:{ctx.port}/healthz", timeout=2.0)
        response.raise_for_status()
        return "HTTP 200"

    def url(self, address: str, port: int, credentials: Credentials, secret: bool = True) -> str:
        return f"http://{address}:{port}/"
