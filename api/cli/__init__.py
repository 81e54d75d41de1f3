"""The `envclone` command: operator commands (token, migrate, up, down) and HTTP client commands."""

from __future__ import annotations

import typer

from api.cli import operator

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="envclone: clone live multi-node environments.")
operator.register(app)


def main() -> None:
    app()
