"""`envclone hosts` (list over HTTP; drain and undrain are an operator's, on the state database)
and `envclone agent` (run this machine's agent: the worker of one host)."""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from api.cli.client import Client

hosts_app = typer.Typer(no_args_is_help=True, help="Hosts: the machines that hold nodes.")
console = Console()
HOST_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")


@hosts_app.command("list")
def hosts_list(ctx: typer.Context) -> None:
    """Hosts with their state, nodes, free disk and reflink."""
    items = Client(ctx.obj["url"], ctx.obj["token"]).get("/v1/hosts")["items"]
    table = Table()
    for col in ("host", "state", "nodes", "free", "reflink", "heartbeat"):
        table.add_column(col)
    for h in items:
        table.add_row(h["name"], h["state"], str(h["nodes"]), f"{h['free_bytes'] / 2**30:.1f} GiB",
                      "yes" if h["reflink"] else "no", h["heartbeat_at"])
    console.print(table)


def _set(name: str, state: str) -> None:
    from shared.hosts import set_state
    from shared.migrate import upgrade
    from shared.states import HostState

    upgrade()
    try:
        host = set_state(name, HostState(state))
    except (LookupError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"host {host.name} is {host.state}")


@hosts_app.command("drain")
def hosts_drain(name: str) -> None:
    """Place nothing new on host NAME (its nodes stay and keep running)."""
    _set(name, "draining")


@hosts_app.command("undrain")
def hosts_undrain(name: str) -> None:
    """Let placement use host NAME again."""
    _set(name, "up")


def _check_host(value: str) -> str:
    if not HOST_NAME.fullmatch(value):
        raise typer.BadParameter("a host name: a-z, 0-9, '.', '-' (at most 63)")
    return value


def _check_pool(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def agent(host: str = typer.Option(..., "--host", callback=_check_host, help="This host's name."),
          data_dir: Path = typer.Option(..., "--data-dir", help="This host's data root (volumes, snapshots)."),
          address_pool: str = typer.Option(..., "--address-pool", callback=_check_pool,
                                           help="CIDR its nodes' addresses come from."),
          transfer_bind: str = typer.Option("", "--transfer-bind", envvar="ENVCLONE_TRANSFER_BIND",
                                            help="host:port where it serves snapshots to other agents."),
          concurrency: int = typer.Option(2, "-c", "--concurrency", min=1),
          ) -> None:
    """Run host NAME's agent: the only process that starts, stops, snapshots, provisions or deletes
    its nodes (a Celery worker on envclone.host.NAME and its window queue). The cluster secret comes
    from ENVCLONE_CLUSTER_SECRET; broker and state database as for every envclone process."""
    env = {**os.environ, "ENVCLONE_HOST_NAME": host, "ENVCLONE_DATA_DIR": str(data_dir.resolve()),
           "ENVCLONE_ADDRESS_POOL": address_pool, "ENVCLONE_AGENT": "true", "ENVCLONE_ORCHESTRATE": "false"}
    if transfer_bind:
        env["ENVCLONE_TRANSFER_BIND"] = transfer_bind
    argv = [sys.executable, "-m", "celery", "-A", "workers.worker", "worker", "-c", str(concurrency), "-E",
            "-l", "info", "-n", f"agent-{host}@%h"]
    os.execvpe(argv[0], argv, env)


def register(app: typer.Typer) -> None:
    app.add_typer(hosts_app, name="hosts")
    app.command("agent")(agent)
