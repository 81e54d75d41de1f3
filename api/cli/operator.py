"""Operator commands: they act on this machine and the state database, not over HTTP."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

import typer

token_app = typer.Typer(no_args_is_help=True, help="API tokens.")

DataDir = typer.Option(Path("./var"), "--data-dir", envvar="ENVCLONE_DATA_DIR", help="Data root.")


_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str | None) -> timedelta | None:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` -> timedelta (None stays None)."""
    if text is None:
        return None
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise typer.BadParameter("a positive whole number and a unit: s, m, h, d or w (e.g. 30d)")
    return timedelta(seconds=int(match.group(1)) * _UNIT_S[match.group(2)])


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


@token_app.command("create")
def token_create(tenant: str = typer.Option(..., "--tenant", help="Tenant the token belongs to."),
                 expires_in: str = typer.Option(None, "--expires-in", callback=parse_duration,
                                                help="Lifetime, e.g. 30d, 12h, 90m (default: no expiry).")) -> None:
    """Create a token for TENANT and print it alone on stdout (it is stored hashed, shown once);
    its id and expiry go to stderr."""
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,62}", tenant):
        typer.echo("error: --tenant must be a DNS label (a-z, 0-9, '-', starting with a letter)", err=True)
        raise typer.Exit(2)
    from api.auth import create_token_row
    from shared.migrate import upgrade

    upgrade()
    row, token = create_token_row(tenant, expires_in)  # type: ignore[arg-type]  # the callback made it a timedelta
    typer.echo(token)
    typer.echo(f"token {row.id} for tenant {tenant}, expires {_when(row.expires_at)}"
               f"{' UTC' if row.expires_at else ''}", err=True)


@token_app.command("list")
def token_list(tenant: str = typer.Option(None, "--tenant", help="Only this tenant's tokens.")) -> None:
    """Tokens with their id, tenant, times (UTC) and state -- never the token itself."""
    from sqlalchemy import select

    from api.auth import refusal
    from shared.db import session_scope
    from shared.migrate import upgrade
    from shared.models import ApiToken, utcnow

    upgrade()
    now = utcnow()
    with session_scope() as session:
        query = select(ApiToken).order_by(ApiToken.created_at, ApiToken.id)
        if tenant:
            query = query.where(ApiToken.tenant == tenant)
        rows = [(t.id, t.tenant, _when(t.created_at), _when(t.expires_at), _when(t.last_used_at),
                 {None: "active", "token revoked": "revoked", "token expired": "expired"}[refusal(t, now)])
                for t in session.scalars(query)]
    header = ("ID", "TENANT", "CREATED", "EXPIRES", "LAST USED", "STATE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


@token_app.command("revoke")
def token_revoke(token_id: str = typer.Argument(..., metavar="ID", help="The token's id (from `token list`).")) -> None:
    """Revoke a token: from now on it gets 401. The row stays, so `token list` shows it revoked."""
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.migrate import upgrade
    from shared.models import ApiToken, utcnow

    upgrade()
    with session_scope() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.id == token_id.strip().lower()).with_for_update())
        if row is None:
            typer.echo(f"error: no token with id {token_id}", err=True)
            raise typer.Exit(1)
        if row.revoked_at is not None:
            typer.echo(f"error: token {row.id} was already revoked at {_when(row.revoked_at)} UTC", err=True)
            raise typer.Exit(1)
        row.revoked_at = utcnow()
    typer.echo(f"revoked token {row.id} of tenant {row.tenant}")


def migrate() -> None:
    """Apply database migrations (idempotent)."""
    from shared.migrate import upgrade

    upgrade()
    typer.echo("database is up to date")


def _login(value: str | None) -> str | None:
    """user:password as Flower takes it: a user without ':', no ',' (Flower splits on it), no blanks."""
    if value is not None and not re.fullmatch(r"[^:,\s]+:[^,\s]+", value):
        raise typer.BadParameter("user:password, without ',' or blanks")
    return value


def up(data_dir: Path = DataDir,
       api_port: int = typer.Option(8000, "--api-port", envvar="ENVCLONE_API_PORT", min=1, max=65535),
       flower_port: int = typer.Option(5555, "--flower-port", envvar="ENVCLONE_FLOWER_PORT", min=1, max=65535),
       broker_port: int = typer.Option(6380, "--broker-port", envvar="ENVCLONE_BROKER_PORT", min=1, max=65535),
       demo: bool = typer.Option(False, "--demo", help="Run the demo once the stack is ready."),
       flower_auth: str = typer.Option(None, "--flower-auth", envvar="ENVCLONE_FLOWER_AUTH", callback=_login,
                                       help="Flower login as user:password (default: generated once, kept "
                                            "0600 in <data-dir>/flower-auth). The variable keeps it out of ps."),
       hosts: int = typer.Option(0, "--hosts", min=0, max=32, help=(
           "Run N hosts host-1..host-N, each with its own agent, data root and address pool; as root each "
           "in its own network and PID namespace (their nodes stop with the stack). 0: one host, as before.")),
       ) -> None:
    """Run the whole embedded stack in the foreground; Ctrl-C stops it (nodes keep running)."""
    from api.cli.up import up as run_up

    raise typer.Exit(run_up(data_dir, api_port, flower_port, broker_port, demo, flower_auth, hosts))


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
