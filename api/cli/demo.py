"""`envclone demo`: make a small shop (postgres + valkey + webapp with data), clone it with live
progress, then show source and clone side by side: addresses, rows, and which database each
webapp talks to."""

from __future__ import annotations

import httpx
from rich.console import Console
from rich.table import Table
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from api.cli.client import Client, CliError
from api.cli.watch import watch
from shared.states import EnvState, JobState

DEMO = {"name": "demo", "nodes": [
    {"name": "db", "stack": "postgres"},
    {"name": "cache", "stack": "valkey"},
    {"name": "web", "stack": "webapp", "config": {"DATABASE_URL": "{{db.url}}", "CACHE_URL": "{{cache.url}}"}},
]}
ROWS = 25


def _wait_running(api: Client, name: str, console: Console, timeout: float = 180) -> dict:
    def settled(env: dict) -> bool:
        if env["state"] == EnvState.FAILED:
            raise CliError(f"environment {name} failed: {env['error']}")
        return env["state"] == EnvState.RUNNING

    # Polled: the API offers no environment event stream.
    with console.status(f"waiting for environment {name} to start"):
        try:
            return Retrying(retry=retry_if_result(lambda env: not settled(env)), stop=stop_after_delay(timeout),
                            wait=wait_fixed(0.5))(api.get, f"/v1/environments/{name}")
        except RetryError:
            raise CliError(f"environment {name} not running after {timeout:.0f}s") from None


def _web(env: dict) -> str:
    return next(n["url"] for n in env["nodes"] if n["name"] == "web").rstrip("/")


def run_demo(api: Client, console: Console | None = None) -> bool:
    console = console or Console()
    names = {e["name"] for e in api.get("/v1/environments", params={"limit": 500})["items"]}
    if "demo" not in names:
        console.print("creating environment [bold]demo[/]: postgres + valkey + webapp")
        api.post("/v1/environments", DEMO)
    src = _wait_running(api, "demo", console)
    web = _web(src)
    status = httpx.get(f"{web}/", timeout=10).json()
    for i in range(status["items"], ROWS):
        httpx.post(f"{web}/items", json={"name": f"item-{i}"}, timeout=10).raise_for_status()
    httpx.put(f"{web}/cache", json={"value": "hello from demo"}, timeout=10).raise_for_status()
    n = 1
    while f"demo-clone-{n}" in names:
        n += 1
    target = f"demo-clone-{n}"
    console.print(f"cloning [bold]demo[/] as [bold]{target}[/]")
    job = api.post("/v1/environments/demo/clones", {"name": target})
    if watch(api, job["id"], console)["state"] != JobState.SUCCEEDED:
        return False
    dst = api.get(f"/v1/environments/{target}")
    httpx.post(f"{web}/items", json={"name": "written-after-the-clone"}, timeout=10).raise_for_status()
    s, d = httpx.get(f"{web}/", timeout=10).json(), httpx.get(f"{_web(dst)}/", timeout=10).json()
    table = Table(title="source vs clone")
    for col in ("", "demo", target):
        table.add_column(col)
    for a, b in zip(src["nodes"], dst["nodes"], strict=True):
        table.add_row(f"{a['name']} ({a['stack']}) address", a["address"], b["address"])
    table.add_row("webapp talks to database", s["database"], d["database"])
    table.add_row("rows in items", str(s["items"]), str(d["items"]))
    table.add_row("cache value", str(s["cache"]["value"]), str(d["cache"]["value"]))
    console.print(table)
    clone_db = next(f"{x['address']}:{x['port']}" for x in dst["nodes"] if x["name"] == "db")
    ok = d["database"] == clone_db and d["items"] == s["items"] - 1
    console.print("[green]the clone talks to its own database and holds the data as of the snapshot[/]" if ok
                  else "[red]the clone is not isolated from the source[/]")
    return ok
