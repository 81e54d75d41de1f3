"""Operator commands: they act on this machine and the state database, not over HTTP."""

from __future__ import annotations

import re
from pathlib import Path

import typer

token_app = typer.Typer(no_args_is_help=True, help="API tokens.")

DataDir = typer.Option(Path("./var"), "--data-dir", envvar="ENVCLONE_DATA_DIR", help="Data root.")


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


def up(data_dir: Path = DataDir,
       api_port: int = typer.Option(8000, "--api-port", envvar="ENVCLONE_API_PORT", min=1, max=65535),
       flower_port: int = typer.Option(5555, "--flower-port", envvar="ENVCLONE_FLOWER_PORT", min=1, max=65535),
       broker_port: int = typer.Option(6380, "--broker-port", envvar="ENVCLONE_BROKER_PORT", min=1, max=65535),
       demo: bool = typer.Option(False, "--demo", help="Run the demo once the stack is ready.")) -> None:
    """Run the whole embedded stack in the foreground; Ctrl-C stops it (nodes keep running)."""
    from api.cli.up import up as run_up

    raise typer.Exit(run_up(data_dir, api_port, flower_port, broker_port, demo))


def down(data_dir: Path = DataDir) -> None:
    """Stop every node process under the data dir; `envclone up` starts them again."""
    from api.cli.up import down as run_down

    raise typer.Exit(run_down(data_dir))


def demo(ctx: typer.Context) -> None:
    """Against a running stack: create a demo environment, clone it with live progress, compare."""
    from rich.console import Console

    from api.cli.client import Client
    from api.cli.demo import run_demo

    if not run_demo(Client(ctx.obj["url"], ctx.obj["token"]), Console()):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")
    app.command("migrate")(migrate)
    app.command("up")(up)
    app.command("down")(down)
    app.command("demo")(demo)
