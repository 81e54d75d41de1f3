"""`envclone demo`: make a small shop (postgres + valkey + webapp with data), clone it with live
progress, then show source and clone side by side: addresses, rows, which database each webapp
talks to, and where each one's webhook goes.

The shop's webapp calls a webhook for every new item. The demo runs two receivers on loopback: one
stands for production's endpoint (the source's WEBHOOK_URL), the other is a sink; the shop declares
an on_clone action that points every clone's WEBHOOK_URL at the sink, so a clone never calls
production. Their ports are fixed because the shop outlives one run of the demo."""

from __future__ import annotations

import httpx
from rich.console import Console
from rich.table import Table
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from api.cli.client import Client, CliError
from api.cli.hooks import HookReceiver
from api.cli.watch import watch
from shared.states import EnvState, JobState

HOOK_HOST, PRODUCTION_PORT, SINK_PORT = "127.0.0.1", 18471, 18472
PRODUCTION_HOOK = f"http://{HOOK_HOST}:{PRODUCTION_PORT}/hook"
SINK_HOOK = f"http://{HOOK_HOST}:{SINK_PORT}/hook"
DEMO = {
    "name": "demo",
    "nodes": [
        {"name": "db", "stack": "postgres"},
        {"name": "cache", "stack": "valkey"},
        {"name": "web", "stack": "webapp", "config": {"DATABASE_URL": "{{db.url}}", "CACHE_URL": "{{cache.url}}",
                                                      "WEBHOOK_URL": PRODUCTION_HOOK}},
    ],
    # The kernel fence lets the shop (and so its clones) reach both receivers and nothing else off it.
    "egress": [{"cidr": f"{HOOK_HOST}/32", "ports": [PRODUCTION_PORT, SINK_PORT]}],
    "on_clone": [{"node": "web", "config": {"WEBHOOK_URL": SINK_HOOK}}],
}
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


def _receivers(console: Console) -> tuple[HookReceiver, HookReceiver] | None:
    try:
        production = HookReceiver(PRODUCTION_PORT, HOOK_HOST)
    except OSError as exc:
        console.print(f"[yellow]webhook receivers cannot listen on {HOOK_HOST}:{PRODUCTION_PORT} ({exc}): "
                      "the webhook part of the demo is skipped[/]")
        return None
    try:
        return production, HookReceiver(SINK_PORT, HOOK_HOST)
    except OSError as exc:
        production.close()
        console.print(f"[yellow]webhook receivers cannot listen on {HOOK_HOST}:{SINK_PORT} ({exc}): "
                      "the webhook part of the demo is skipped[/]")
        return None


def run_demo(api: Client, console: Console | None = None) -> bool:
    console = console or Console()
    hooks = _receivers(console)
    try:
        return _run(api, console, hooks)
    finally:
        for receiver in hooks or ():
            receiver.close()


def _run(api: Client, console: Console, hooks: tuple[HookReceiver, HookReceiver] | None) -> bool:
    names = {e["name"] for e in api.get("/v1/environments", params={"limit": 500})["items"]}
    if "demo" not in names:
        console.print("creating environment [bold]demo[/]: postgres + valkey + webapp (with a webhook)")
        api.post("/v1/environments", DEMO)
    src = _wait_running(api, "demo", console)
    if hooks and not src.get("on_clone"):
        console.print("[yellow]this demo environment predates webhooks (delete it to see them): skipped[/]")
        hooks = None
    web = _web(src)
    status = httpx.get(f"{web}/", timeout=10).json()
    for i in range(status["items"], ROWS):
        httpx.post(f"{web}/items", json={"name": f"item-{i}"}, timeout=10).raise_for_status()
    httpx.put(f"{web}/cache", json={"value": "hello from demo"}, timeout=10).raise_for_status()
    n = 1
    while f"demo-clone-{n}" in names:
        n += 1
    target = f"demo-clone-{n}"
    console.print(f"cloning [bold]demo[/] as [bold]{target}[/] (on_clone points the clone's webhook at the sink)")
    job = api.post("/v1/environments/demo/clones", {"name": target})
    if watch(api, job["id"], console)["state"] != JobState.SUCCEEDED:  # prints the safety report too
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
    clone_db = next(f"{x['address']}:{x['port']}" for x in dst["nodes"] if x["name"] == "db")
    ok = d["database"] == clone_db and d["items"] == s["items"] - 1
    hooks_ok = True
    if hooks:
        production, sink = hooks
        httpx.post(f"{_web(dst)}/items", json={"name": "written-in-the-clone"}, timeout=10).raise_for_status()
        from_clone = "written-in-the-clone"
        table.add_row("webhook calls at production", str(production.names().count("written-after-the-clone")),
                      str(production.names().count(from_clone)))
        table.add_row("webhook calls at the sink", str(sink.names().count("written-after-the-clone")),
                      str(sink.names().count(from_clone)))
        hooks_ok = from_clone in sink.names() and from_clone not in production.names()
    console.print(table)
    console.print("[green]the clone talks to its own database and holds the data as of the snapshot[/]" if ok
                  else "[red]the clone is not isolated from the source[/]")
    if hooks:
        console.print("[green]the clone's webhook goes to the sink; production hears only the source[/]" if hooks_ok
                      else "[red]the clone's webhook reached production[/]")
    return ok and hooks_ok
