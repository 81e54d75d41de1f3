"""Operator commands: they act on the state database directly, not over HTTP."""

from __future__ import annotations

import re

import typer

token_app = typer.Typer(no_args_is_help=True, help="API tokens.")


@token_app.command("create")
def token_create(tenant: str = typer.Option(..., "--tenant", help="Tenant the token belongs to.")) -> None:
    """Create a token for TENANT and print it alone on stdout (it is stored hashed, shown once)."""
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,62}", tenant):
        typer.echo("error: --tenant must be a DNS label (a-z, 0-9, '-', starting with a letter)", err=True)
        raise typer.Exit(2)
    from api.auth import create_token
    from shared.migrate import upgrade

    upgrade()
    typer.echo(create_token(tenant))


def migrate() -> None:
    """Apply database migrations (idempotent)."""
    from shared.migrate import upgrade

    upgrade()
    typer.echo("database is up to date")


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")
    app.command("migrate")(migrate)
