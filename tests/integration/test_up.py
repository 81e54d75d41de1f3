"""`envclone up` end to end: the embedded stack (bundled Valkey broker, SQLite, gunicorn, a Celery
worker, beat, Flower) as a subprocess on a terminal of its own; a clone over HTTP; Flower sees the
tasks; `envclone jobs watch` renders to completion; Ctrl-C leaves no process behind; `envclone down`
stops the nodes. And locked: Flower and the broker refuse whoever lacks their secrets, no secret is
in the log stream or on a command line, and the data dir is private."""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import termios
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import destroy_everything, make_data_root
from tests.helpers import processes_under, wait_for
from tests.integration.test_api_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.long]

# The start task builds the per-node canvas on a worker; Flower shows the job from it on.
STEP_TASKS = ["envclone.start_clone", "envclone.quiesce", "envclone.snapshot", "envclone.restart", "envclone.provision",
              "envclone.assign_ips", "envclone.report"]


def envclone(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


class Terminal:
    """A pseudo-terminal that becomes the controlling terminal of the process started on it."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        os.set_blocking(self.master, False)
        self.seen = b""

    def make_controlling(self) -> None:  # preexec_fn: runs in the child after setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def text(self) -> str:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except (BlockingIOError, OSError):  # nothing now, or the other side is gone (EIO)
                break
            if not chunk:
                break
            self.seen += chunk
        return self.seen.decode(errors="replace")

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


def modes_under(data: Path) -> dict[str, int]:
    """Permission bits of everything under ``data`` (symlinks aside), by path relative to it."""
    out = {".": stat.S_IMODE(data.lstat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(data):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            try:
                st = path.lstat()
            except FileNotFoundError:  # a temporary file that came and went
                continue
            if not stat.S_ISLNK(st.st_mode):
                out[str(path.relative_to(data))] = stat.S_IMODE(st.st_mode)
    return out


def broker_password(data: Path) -> str:
    conf = data / "broker" / "valkey.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    return next(line.split()[1] for line in conf.read_text().splitlines() if line.startswith("requirepass "))


def test_up_clone_watch_flower_and_clean_stop() -> None:
    root = make_data_root("envclone-up-")
    data = root / "var"
    api_port, flower_port, broker_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVCLONE_")}
    env.update({"ENVCLONE_DATA_DIR": str(data), "ENVCLONE_ADDRESS_POOL": "127.99.0.0/16"})
    env.pop("FLOWER_BASIC_AUTH", None)
    env["FLOWER_UNAUTHENTICATED_API"] = "true"  # an operator's leftover must not open Flower up
    log = open(root / "up.log", "w")
    tty = Terminal()
    up = subprocess.Popen([sys.executable, "-m", "api.cli", "up", "--api-port", str(api_port), "--flower-port",
                           str(flower_port), "--broker-port", str(broker_port)], env=env, stdin=tty.slave,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                          preexec_fn=tty.make_controlling)
    api = f"http://127.0.0.1:{api_port}"
    flower = f"http://127.0.0.1:{flower_port}"
    try:
        try:
            wait_for(lambda: httpx.get(f"{api}/readyz", timeout=2).status_code == 200, timeout=90, what="stack ready")

            # The first token is in <data>/token (0600), and only its path is announced.
            default_token = (data / "token").read_text().strip()
            assert default_token.startswith("ec_")
            assert httpx.get(f"{api}/v1/environments", headers={"Authorization": f"Bearer {default_token}"},
                             timeout=10).status_code == 200
            wait_for(lambda: f"token    in {data / 'token'}" in (root / "up.log").read_text(), timeout=30,
                     what="the announcement")

            # Flower: a generated login, kept 0600 in the data dir, shown once on the terminal.
            flower_login = (data / "flower-auth").read_text().strip()
            user, _, flower_pw = flower_login.partition(":")
            assert user == "envclone" and len(flower_pw) >= 20
            shown = wait_for(lambda: "Flower login" in (t := tty.text()) and t, timeout=30, what="the terminal")
            assert f"{user} / {flower_pw}" in shown
            flower_auth = httpx.BasicAuth(user, flower_pw)

            # The broker wants its password.
            broker_pw = broker_password(data)
            with redis.Redis(host="127.0.0.1", port=broker_port, socket_timeout=5) as anonymous:
                with pytest.raises(redis.exceptions.AuthenticationError, match="(?i)auth"):
                    anonymous.ping()
            with redis.Redis(host="127.0.0.1", port=broker_port, password="wrong", socket_timeout=5) as wrong:
                with pytest.raises(redis.exceptions.AuthenticationError):
                    wrong.ping()
            with redis.Redis(host="127.0.0.1", port=broker_port, password=broker_pw, socket_timeout=5) as broker:
                assert broker.ping()

            token = envclone("token", "create", "--tenant", "acme", env=env)
            assert token.returncode == 0, token.stderr
            token = token.stdout.strip()
            assert token.startswith("ec_") and "\n" not in token
            client = httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=30)
            assert client.post("/v1/environments", json={"name": "src", "nodes": [
                {"name": "cache", "stack": "valkey"}, {"name": "db", "stack": "postgres"}]}).status_code == 202
            # Generous: in a parallel run, other suites make and remove accounts (the account files' lock).
            env_state = wait_for(lambda: (e := client.get("/v1/environments/src").json())["state"]
                                 in ("running", "failed") and e, timeout=180, what="env")
            assert env_state["state"] == "running", env_state["error"]
            with sqlite3.connect(data / "envclone.sqlite3") as db:
                (src_id,) = db.execute("SELECT id FROM environments WHERE name = 'src'").fetchone()

            # Flower's API refuses whoever has no login: nothing reaches the workers through it.
            delete = f"{flower}/api/task/async-apply/envclone.delete_environment"
            for auth in (None, httpx.BasicAuth(user, "wrong"), httpx.BasicAuth("admin", flower_pw)):
                refused = httpx.post(delete, json={"args": [src_id]}, auth=auth, timeout=10)
                assert refused.status_code == 401, refused.text
                assert httpx.get(f"{flower}/api/tasks", auth=auth, timeout=10).status_code == 401
                assert httpx.get(f"{flower}/", auth=auth, timeout=10).status_code == 401

            job_id = client.post("/v1/environments/src/clones", json={"name": "dst"}).json()["id"]

            cli_env = {**env, "ENVCLONE_URL": api, "ENVCLONE_TOKEN": token, "COLUMNS": "120"}
            watched = envclone("jobs", "watch", job_id, env=cli_env, timeout=240)
            assert watched.returncode == 0, watched.stdout + watched.stderr
            assert "job succeeded" in watched.stdout and "cache" in watched.stdout and "100%" in watched.stdout

            def flower_tasks() -> dict | None:
                tasks = httpx.get(f"{flower}/api/tasks", auth=flower_auth, timeout=5).json()
                mine = {t["name"]: t["state"] for t in tasks.values() if job_id[:8] in (t.get("args") or "")}
                return mine if all(mine.get(name) == "SUCCESS" for name in STEP_TASKS) else None

            seen = wait_for(flower_tasks, timeout=30, what="Flower to list the job's tasks")
            assert sorted(seen) == sorted(STEP_TASKS)

            assert envclone("env", "delete", "dst", env=cli_env).returncode == 0
            wait_for(lambda: client.get("/v1/environments/dst").status_code == 404, timeout=60, what="delete")
            bad = envclone("env", "show", "nope", env=cli_env)
            assert bad.returncode == 1 and "does not exist" in bad.stderr

            # The refused delete never ran: a clone and a delete later, src is whole and Flower
            # (which sees every task) knows of no delete of it.
            assert client.get("/v1/environments/src").json()["state"] == "running"
            tasks = httpx.get(f"{flower}/api/tasks", auth=flower_auth, timeout=5).json().values()
            assert not [t for t in tasks
                        if t["name"] == "envclone.delete_environment" and src_id in (t.get("args") or "")]

            # No secret on a command line (ps shows those to every account).
            started = descendants(up.pid)
            secrets_ = {"token": default_token, "flower password": flower_pw, "broker password": broker_pw}
            for pid in started | {up.pid}:
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                for what, secret in secrets_.items():
                    assert secret not in cmdline, f"{what} on the command line of {pid}: {cmdline!r}"

            # Everything under the data dir is private, but for the root and nodes/ (0711).
            modes = modes_under(data)
            assert modes.pop(".") == 0o711 and modes.pop("nodes") == 0o711
            for name in ("token", "flower-auth", "envclone.sqlite3", "broker/valkey.conf"):
                assert modes[name] == 0o600, (name, oct(modes[name]))
            assert modes["broker"] == 0o700 and modes["snapshots"] == 0o700
            assert any(name.startswith("broker/") and name != "broker/valkey.conf" for name in modes)  # its files
            assert any(name.startswith("celerybeat-schedule") for name in modes)
            assert len([n for n in modes if n.startswith("nodes/") and n.count("/") == 1]) == 2  # src's volumes
            opened = {name: oct(mode) for name, mode in modes.items() if mode & 0o077}
            assert not opened, f"readable or writable by others: {opened}"
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(timeout=60)
            log.close()
            tty.close()
        wait_for(lambda: not [p for p in started if alive(p) and not _is_node(p, root)], timeout=15,
                 what="every process `envclone up` started to exit")
        # The source nodes are the customer's servers: they outlive the stack until `envclone down`.
        assert processes_under(root / "var" / "nodes")
        down = envclone("down", "--data-dir", str(root / "var"), env=env)
        assert down.returncode == 0 and "stopped 2 node(s)" in down.stderr, down.stderr
        assert processes_under(root / "var" / "nodes") == []
        # Tokens and passwords never reached the log stream (honcho's output).
        logged = (root / "up.log").read_text()
        assert "envclone is up" in logged and f"token    in {data / 'token'}" in logged
        for what, secret in secrets_.items():
            assert secret not in logged, f"{what} in the log"
    finally:
        print((root / "up.log").read_text()[-3000:])
        destroy_everything(data)  # also when a check above failed: its nodes are the driver's to stop
        destroy_everything(root)


def _is_node(pid: int, root: Path) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/cwd").startswith(str(root / "var" / "nodes"))
    except OSError:
        return False
