"""Client commands: they talk to the API over HTTP (--url/--token or ENVCLONE_URL/ENVCLONE_TOKEN)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from api.cli.client import Client, CliError
from api.cli.safety import print_safety
from api.cli.watch import watch
from shared.states import JobState

console = Console()
env_app = typer.Typer(no_args_is_help=True, help="Environments.")
jobs_app = typer.Typer(no_args_is_help=True, help="Clone jobs.")


def client(ctx: typer.Context) -> Client:
    return Client(ctx.obj["url"], ctx.obj["token"])


def _nodes_table(env: dict[str, Any]) -> Table:
    table = Table(title=f"{env['name']} ({env['state']})" + (f" clone of {env['source']}" if env.get("source") else ""))
    for col in ("node", "stack", "host", "address", "port", "state", "url"):
        table.add_column(col)
    for n in env["nodes"]:
        table.add_row(n["name"], n["stack"], n["host"], n["address"], str(n["port"]), n["state"], n["url"] or "")
    return table


@env_app.command("create")
def env_create(ctx: typer.Context, file: Path = typer.Option(..., "-f", "--file", exists=True, dir_okay=False,
                                                              help="YAML or JSON: {name, nodes: [...]}")) -> None:
    """Create an environment from a file."""
    try:
        body = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise CliError(f"{file}: not valid YAML: {exc}") from None
    env = client(ctx).post("/v1/environments", body)
    console.print(f"environment {env['name']} is {env['state']}")


@env_app.command("list")
def env_list(ctx: typer.Context) -> None:
    """List environments."""
    envs = client(ctx).get("/v1/environments")["items"]
    table = Table()
    for col in ("name", "state", "source", "nodes"):
        table.add_column(col)
    for e in envs:
        table.add_row(e["name"], e["state"], e["source"] or "", str(len(e["nodes"])))
    console.print(table)


@env_app.command("show")
def env_show(ctx: typer.Context, name: str) -> None:
    """Show an environment and its nodes."""
    console.print(_nodes_table(client(ctx).get(f"/v1/environments/{name}")))


@env_app.command("credentials")
def env_credentials(ctx: typer.Context, name: str, node: str) -> None:
    """Print a node's credentials (username, password, full URL); the read is recorded."""
    creds = client(ctx).get(f"/v1/environments/{name}/nodes/{node}/credentials")
    console.print_json(json.dumps(creds))


@env_app.command("delete")
def env_delete(ctx: typer.Context, name: str) -> None:
    """Delete an environment: stop and destroy its nodes, free their addresses."""
    env = client(ctx).delete(f"/v1/environments/{name}")
    console.print(f"environment {env['name']} is being deleted")


def _mask_rule(text: str) -> dict[str, str]:
    """NODE:TABLE.COLUMN=WITH (TABLE may be SCHEMA.TABLE)."""
    where, sep, kind = text.partition("=")
    node, colon, path = where.partition(":")
    table, dot, column = path.rpartition(".")
    if not (sep and colon and dot and node and table and column and kind):
        raise typer.BadParameter(f"{text!r}: expected NODE:TABLE.COLUMN=WITH", param_hint="--mask")
    return {"node": node, "table": table, "column": column, "with": kind}


def clone(ctx: typer.Context, source: str, name: str,
          watch_: bool = typer.Option(False, "--watch", "-w", help="Follow progress until the job ends."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; change nothing."),
          keep_on_failure: bool = typer.Option(False, "--keep-on-failure", help="Keep a failed clone to inspect."),
          on_leak: str = typer.Option("fail", "--on-leak", help="fail | warn: a trace of the source found in "
                                      "the clone's files fails the job (and tears the clone down), or is listed."),
          mask: list[str] = typer.Option([], "--mask", help="NODE:TABLE.COLUMN=WITH (email, name, phone, hash, "
                                         "redact, null, constant:VALUE): fakes on the clone; repeatable."),
          mask_seed: str | None = typer.Option(None, "--mask-seed", help="The same seed, the same fakes."),
          target_host: str | None = typer.Option(None, "--target-host", help="Put every clone node on this host."),
          place: list[str] = typer.Option([], "--place", help="NODE=HOST: pin one clone node; repeatable."),
          ) -> None:
    """Clone environment SOURCE as NAME."""
    api = client(ctx)
    body: dict[str, Any] = {"name": name, "dry_run": dry_run, "keep_on_failure": keep_on_failure,
                            "on_leak": on_leak}
    if target_host:
        body["target_host"] = target_host
    if place:
        if not all("=" in p for p in place):
            raise CliError("--place takes NODE=HOST")
        body["placement"] = dict(p.split("=", 1) for p in place)
    if mask:
        body["mask"] = [_mask_rule(m) for m in mask]
    if mask_seed:
        body["mask_seed"] = mask_seed
    result = api.post(f"/v1/environments/{source}/clones", body)
    if dry_run:
        table = Table(title=f"plan: {source} -> {name} ({'ok' if result['ok'] else 'CONFLICTS'})")
        for col in ("node", "stack", "from", "to", "host", "bytes", "across hosts", "est. downtime", "est. time"):
            table.add_column(col)
        for n in result["nodes"]:
            table.add_row(n["name"], n["stack"], n["source_address"], n["address"] or "-",
                          f"{n['source_host']} -> {n['host']}", str(n["bytes"]), str(n["bytes_across_hosts"]),
                          f"{n['estimated_downtime_ms']} ms", f"{n['estimated_ms']} ms")
        console.print(table)
        console.print(f"snapshot method {result['snapshot_method']}, disk needed {result['disk_bytes_needed']} of "
                      f"{result['disk_bytes_free']} free, estimated {result['estimated_duration_ms']} ms")
        for leak in result.get("predicted_leaks", []):
            console.print(f"predicted leak: {leak['node']} {leak['key']} names a source {leak['kind']} literally "
                          f"({leak['origin']}): {leak['outcome']}", highlight=False)
        for c in result["conflicts"]:
            console.print(f"[red]conflict[/] {c['code']}: {c['message']}")
        if not result["ok"]:
            raise typer.Exit(1)
        return
    console.print(f"job {result['id']} {result['state']}")
    if watch_ and watch(api, result["id"], console)["state"] != JobState.SUCCEEDED:
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(ctx: typer.Context, state: JobState = typer.Option(None, "--state"),
              environment: str = typer.Option(None, "--environment")) -> None:
    """List clone jobs, newest first."""
    params = {k: v for k, v in {"state": state, "environment": environment}.items() if v}
    jobs = client(ctx).get("/v1/jobs", params=params)["items"]
    table = Table()
    for col in ("id", "state", "source", "target", "percent", "created"):
        table.add_column(col)
    for j in jobs:
        table.add_row(j["id"], j["state"], j["source"], j["target"], f"{j['percent']}%", j["created_at"])
    console.print(table)


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: str) -> None:
    """Show a job with every node's steps, then its safety report."""
    job = client(ctx).get(f"/v1/jobs/{job_id}")
    console.print_json(json.dumps(job))
    print_safety(console, job)


@jobs_app.command("watch")
def jobs_watch(ctx: typer.Context, job_id: str) -> None:
    """Live per-node progress until the job ends (exit 1 unless it succeeded)."""
    if watch(client(ctx), job_id, console)["state"] != JobState.SUCCEEDED:
        raise typer.Exit(1)


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str) -> None:
    """Cancel at the next step boundary; sources are restarted, the partial clone removed."""
    console.print(f"job {job_id} {client(ctx).post(f'/v1/jobs/{job_id}/cancel')['state']}")


@jobs_app.command("retry")
def jobs_retry(ctx: typer.Context, job_id: str) -> None:
    """Resume a failed job from its failed steps."""
    console.print(f"job {job_id} {client(ctx).post(f'/v1/jobs/{job_id}/retry')['state']}")


def register(app: typer.Typer) -> None:
    app.add_typer(env_app, name="env")
    app.add_typer(jobs_app, name="jobs")
    app.command("clone")(clone)
