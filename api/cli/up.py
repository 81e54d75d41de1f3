"""`envclone up`: the whole embedded stack in the foreground under honcho -- a bundled Valkey as
broker (unless ENVCLONE_BROKER_URL names one), SQLite under the data dir (unless
ENVCLONE_DATABASE_URL), the API (gunicorn, its server model in api/gunicorn_conf.py), a Celery
worker with 2 processes, beat, and Flower.
Ctrl-C stops all of it; node processes keep running (`envclone down` stops them)."""

from __future__ import annotations

import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console

from api.cli.client import Client, CliError

console = Console(stderr=True)


def gunicorn_args(bind: str) -> list[str]:
    """gunicorn's arguments for the API: the server model is in api/gunicorn_conf.py (ENVCLONE_API_*)."""
    return ["-c", "python:api.gunicorn_conf", "-b", bind, "api.wsgi:app"]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _configure(data_dir: Path, broker_port: int) -> tuple[dict[str, str], bool]:
    """Environment for every process of the stack; also applied to this process."""
    env = {"ENVCLONE_DATA_DIR": str(data_dir)}
    embedded_broker = not os.environ.get("ENVCLONE_BROKER_URL")
    if embedded_broker:
        env["ENVCLONE_BROKER_URL"] = f"redis://127.0.0.1:{broker_port}/0"
    os.environ.update(env)
    from shared.config import get_settings
    from shared.db import get_engine, get_sessionmaker

    get_settings.cache_clear()
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()
    env["ENVCLONE_DATABASE_URL"] = get_settings().resolved_database_url
    os.environ.update(env)
    return env, embedded_broker


def restart_stopped_nodes() -> int:
    """Nodes `envclone down` stopped come back with the stack."""
    from shared.db import session_scope
    from shared.drivers import DriverError, get_driver
    from shared.models import Node

    driver, n = get_driver(), 0
    with session_scope() as session:
        for node in session.query(Node).filter(Node.state == "stopped"):
            try:
                driver.start(node.id)
                node.state = "running"
                n += 1
            except DriverError as exc:
                console.print(f"[yellow]node {node.name} ({node.id}) did not start: {exc}")
    return n


def up(data_dir: Path, api_port: int, flower_port: int, broker_port: int, demo: bool) -> int:
    from honcho.manager import Manager

    from api.auth import create_token
    from shared.migrate import upgrade
    from shared.stacks.valkey import valkey_binary

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o755)  # node processes run unprivileged and must reach their volumes
    env, embedded_broker = _configure(data_dir, broker_port)
    ports = [("--api-port", api_port), ("--flower-port", flower_port)]
    if embedded_broker:
        ports.append(("--broker-port", broker_port))
    for flag, port in ports:
        if not _port_free(port):
            raise CliError(f"port {port} on 127.0.0.1 is in use ({flag})")
    upgrade()
    token = create_token("default")
    restarted = restart_stopped_nodes()

    py = shlex.quote(sys.executable)
    q = shlex.quote
    manager = Manager()
    child_env = {**os.environ, **env}
    if embedded_broker:
        broker_dir = data_dir / "broker"
        broker_dir.mkdir(exist_ok=True)
        manager.add_process("broker", f"{q(valkey_binary())} --bind 127.0.0.1 --port {broker_port} "
                            f"--dir {q(str(broker_dir))} --appendonly yes --save '' --protected-mode no",
                            env=child_env)
    api_argv = " ".join(q(a) for a in gunicorn_args(f"127.0.0.1:{api_port}"))
    manager.add_process("api", f"{py} -m gunicorn --graceful-timeout 5 --access-logfile - {api_argv}", env=child_env)
    manager.add_process("worker", f"{py} -m celery -A workers.worker worker -c 2 -E -l info "
                        "-Q envclone.window,envclone -n envclone@%h", env=child_env)
    manager.add_process("beat", f"{py} -m celery -A workers.worker beat -l info "
                        f"-s {q(str(data_dir / 'celerybeat-schedule'))}", env=child_env)
    manager.add_process("flower", f"{py} -m celery -A workers.worker flower --address=127.0.0.1 "
                        f"--port={flower_port}", env={**child_env, "FLOWER_UNAUTHENTICATED_API": "true"})

    api_url = f"http://127.0.0.1:{api_port}"

    def announce() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)  # poll: waiting for the processes honcho just started
        else:
            console.print("[red]the API did not become ready within 120 s")
            return
        console.rule("envclone is up")
        console.print(f"API      {api_url}   (docs {api_url}/docs/)")
        console.print(f"Flower   http://127.0.0.1:{flower_port}")
        console.print(f"data     {data_dir}")
        if restarted:
            console.print(f"restarted {restarted} node(s) stopped by 'envclone down'")
        console.print(f"token    {token}")
        console.print(f"try      export ENVCLONE_URL={api_url} ENVCLONE_TOKEN={token}; envclone demo")
        console.rule()
        if demo:
            try:
                run_demo_against(api_url, token)
            except CliError as exc:
                console.print(f"[red]demo failed: {exc}")

    threading.Thread(target=announce, daemon=True).start()
    manager.loop()
    return manager.returncode or 0


def run_demo_against(url: str, token: str) -> bool:
    from api.cli.demo import run_demo

    return run_demo(Client(url, token), Console())


def down(data_dir: Path) -> int:
    """Stop every node process under the data dir (volumes and state are kept)."""
    from shared.db import session_scope
    from shared.drivers.local import LocalDriver
    from shared.models import Node

    data_dir = data_dir.resolve()
    _configure(data_dir, 0)
    from shared.config import get_settings

    driver = LocalDriver(data_dir, get_settings().node_user)
    running = driver.running_node_ids()
    for node_id in sorted(running):
        driver.stop(node_id)
    db = data_dir / "envclone.sqlite3"
    if os.environ.get("ENVCLONE_DATABASE_URL") or db.exists():
        with session_scope() as session:
            for node in session.query(Node).filter(Node.id.in_(running)):
                node.state = "stopped"
    console.print(f"stopped {len(running)} node(s) under {data_dir}")
    return 0
