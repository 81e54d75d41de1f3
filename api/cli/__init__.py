"""The `envclone` command: operator commands (token, migrate, up, down, demo) and HTTP client
commands (env, clone, jobs)."""

from __future__ import annotations

import os
import sys

import typer

from api.cli import commands, hosts, operator, private
from api.cli.client import CliError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="envclone: clone live multi-node environments.")


@app.callback()
def _options(ctx: typer.Context,
             url: str = typer.Option("http://127.0.0.1:8000", "--url", envvar="ENVCLONE_URL", help="API base URL."),
             token: str = typer.Option(None, "--token", envvar="ENVCLONE_TOKEN", help="API token.")) -> None:
    ctx.obj = {"url": url, "token": token}
    # Whatever a command writes (the SQLite state database, token and auth files) is ours alone.
    os.umask(private.PRIVATE_UMASK)


operator.register(app)
commands.register(app)
hosts.register(app)


def main() -> None:
    try:
        app(standalone_mode=True)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
