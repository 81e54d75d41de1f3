"""`envclone up`: the whole embedded stack in the foreground under honcho -- a bundled Valkey as
broker (unless ENVCLONE_BROKER_URL names one), SQLite under the data dir (unless
ENVCLONE_DATABASE_URL), the API (gunicorn, its server model in api/gunicorn_conf.py), a Celery
worker with 2 processes, beat, and Flower.
Ctrl-C stops all of it; node processes keep running (`envclone down` stops them).

Locked down: everything is created under umask 077 (api.cli.private); the broker wants a password
and Flower a login, both generated once and kept 0600 in the data dir; secrets reach the processes
through their environment, never their command lines, and never the log stream (honcho's output)."""

from __future__ import annotations

import os
import shlex
import socket
import sys
import threading
from pathlib import Path

import httpx
from rich.console import Console
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from api.cli import private, up_hosts
from api.cli.client import Client, CliError
from shared.identity import can_switch_users

console = Console(stderr=True, soft_wrap=True)  # a long path is not cut across lines


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


def _configure(data_dir: Path, broker_port: int, broker_password: str = "") -> tuple[dict[str, str], bool]:
    """Environment for every process of the stack; also applied to this process."""
    env = {"ENVCLONE_DATA_DIR": str(data_dir)}
    embedded_broker = not os.environ.get("ENVCLONE_BROKER_URL")
    if embedded_broker:
        auth = f":{broker_password}@" if broker_password else ""
        env["ENVCLONE_BROKER_URL"] = f"redis://{auth}127.0.0.1:{broker_port}/0"
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


def mark_stopped_nodes_running() -> int:
    """Nodes `envclone down` stopped are to run again: their hosts' agents start them."""
    from sqlalchemy import update

    from shared.db import session_scope
    from shared.models import Node

    with session_scope() as session:
        return session.execute(update(Node).where(Node.state == "stopped").values(state="running")).rowcount


def first_token(data_dir: Path) -> Path:
    """<data-dir>/token (0600) holds a token of tenant ``default``: the one kept there while it is
    still good, else a new one. Its path is what gets printed, never the token."""
    from api.auth import create_token, lookup, refusal

    path = data_dir / private.TOKEN_FILE
    kept = private.read_private(path)
    if kept is None or refusal(lookup(kept)) is not None:
        private.write_private(path, create_token("default") + "\n")
    return path


def up(data_dir: Path, api_port: int, flower_port: int, broker_port: int, demo: bool,
       flower_auth: str | None = None, hosts: int = 0) -> int:
    from honcho.manager import Manager

    from shared.migrate import upgrade
    from shared.stacks.valkey import valkey_binary

    data_dir = data_dir.resolve()
    os.umask(private.PRIVATE_UMASK)
    data_dir.mkdir(parents=True, exist_ok=True)
    private.lock_down(data_dir)
    embedded_broker = not os.environ.get("ENVCLONE_BROKER_URL")
    broker_password = private.broker_password(data_dir) if embedded_broker else ""
    env, _ = _configure(data_dir, broker_port, broker_password)
    ports = [("--api-port", api_port), ("--flower-port", flower_port)]
    if embedded_broker:
        ports.append(("--broker-port", broker_port))
    for flag, port in ports:
        if not _port_free(port):
            raise CliError(f"port {port} on 127.0.0.1 is in use ({flag})")
    upgrade()
    token_path = first_token(data_dir)
    if flower_auth:
        flower_login, flower_new = flower_auth, False
    else:
        flower_login, flower_new = private.flower_credentials(data_dir)
    plans, not_isolated, gateway = up_hosts.plan_hosts(data_dir, hosts) if hosts else ([], None, "127.0.0.1")
    # With hosts, each agent brings back its own nodes (its round restarts what should run).
    restarted = restart_stopped_nodes() if not hosts else mark_stopped_nodes_running()

    py = shlex.quote(sys.executable)
    q = shlex.quote
    manager = Manager()
    # Secrets travel in the environment (/proc/<pid>/environ is its owner's alone), not in argv.
    child_env = {k: v for k, v in {**os.environ, **env}.items()
                 if k not in ("FLOWER_UNAUTHENTICATED_API", "FLOWER_BASIC_AUTH")}
    if hosts:
        child_env["ENVCLONE_CLUSTER_SECRET"] = up_hosts.cluster_secret(data_dir)
    if embedded_broker:
        broker_dir = data_dir / "broker"
        bind = "127.0.0.1" if gateway == "127.0.0.1" else f"127.0.0.1 {gateway}"  # hosts reach it over the bridge
        manager.add_process("broker", f"{q(valkey_binary())} {q(str(data_dir / private.BROKER_CONF))} "
                            f"--bind {bind} --port {broker_port} --dir {q(str(broker_dir))} "
                            "--appendonly yes --save '' --protected-mode no", env=child_env)
    api_argv = " ".join(q(a) for a in gunicorn_args(f"127.0.0.1:{api_port}"))
    manager.add_process("api", f"{py} -m gunicorn --graceful-timeout 5 --access-logfile - {api_argv}", env=child_env)
    if hosts:
        up_hosts.add_processes(manager, plans, child_env, gateway, embedded_broker)
    else:
        manager.add_process("worker", f"{py} -m celery -A workers.worker worker -c 2 -E -l info "
                            "-n envclone@%h", env=child_env)
    manager.add_process("beat", f"{py} -m celery -A workers.worker beat -l info "
                        f"-s {q(str(data_dir / 'celerybeat-schedule'))}", env=child_env)
    manager.add_process("flower", f"{py} -m celery -A workers.worker flower --address=127.0.0.1 "
                        f"--port={flower_port}", env={**child_env, "FLOWER_BASIC_AUTH": flower_login})

    api_url = f"http://127.0.0.1:{api_port}"
    flower_url = f"http://127.0.0.1:{flower_port}"

    def announce() -> None:
        def ready() -> bool:
            try:
                return httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:  # polled: the processes honcho just started send no notice
            Retrying(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(120), wait=wait_fixed(0.3))(ready)
        except RetryError:
            console.print("[red]the API did not become ready within 120 s")
            return
        user = flower_login.partition(":")[0]
        where = "from --flower-auth" if flower_auth else f"in {data_dir / private.FLOWER_AUTH_FILE}"
        console.rule("envclone is up")
        console.print(f"API      {api_url}   (docs {api_url}/docs/)")
        console.print(f"Flower   {flower_url}   (user {user}, password {where})")
        console.print(f"data     {data_dir}")
        if hosts:
            where = ("each in its own network and PID namespace, on a bridge" if not_isolated is None
                     else f"on loopback subnets of this machine, NOT isolated ({not_isolated})")
            console.print(f"hosts    {', '.join(f'{p.name} ({p.pool})' for p in plans)}: {where}")
        if not can_switch_users():
            console.print("[yellow]not root: nodes run as this user, not an account per environment, and "
                          "without the kernel fence (environments report fence: unavailable)")
        if restarted:
            console.print(f"restarted {restarted} node(s) stopped by 'envclone down'")
        console.print(f"token    in {token_path} (tenant default)")
        console.print(f"try      export ENVCLONE_URL={api_url} ENVCLONE_TOKEN=$(cat {token_path}); envclone demo")
        console.rule()
        if flower_new:
            # Shown once, on the terminal only: stdout and stderr may be a log file.
            private.to_terminal(f"Flower login (shown once; kept in {data_dir / private.FLOWER_AUTH_FILE}): "
                                f"{user} / {flower_login.partition(':')[2]}\n")
        if demo:
            try:
                run_demo_against(api_url, (private.read_private(token_path) or ""))
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
    on_hosts, had_hosts = up_hosts.take_down(data_dir)
    if had_hosts:
        console.print(f"removed the hosts `envclone up --hosts` made (namespaces, bridge, relay); "
                      f"{on_hosts} node(s) on them stopped")
    db = data_dir / "envclone.sqlite3"
    if os.environ.get("ENVCLONE_DATABASE_URL") or db.exists():
        with session_scope() as session:
            query = session.query(Node).filter(Node.state == "running")
            if not had_hosts:
                query = query.filter(Node.id.in_(running))
            for node in query:
                node.state = "stopped"
    console.print(f"stopped {len(running)} node(s) under {data_dir}")
    return 0
