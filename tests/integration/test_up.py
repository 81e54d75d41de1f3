"""`envclone up` end to end: the embedded stack (bundled Valkey broker, SQLite, gunicorn, a Celery
worker, beat, Flower) as a subprocess; a clone over HTTP; Flower sees the tasks; `envclone jobs
watch` renders to completion; Ctrl-C leaves no process behind; `envclone down` stops the nodes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import destroy_everything, make_data_root
from tests.helpers import processes_under, wait_for
from tests.integration.test_api_server import free_port

pytestmark = pytest.mark.integration

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


def test_up_clone_watch_flower_and_clean_stop() -> None:
    root = make_data_root("envclone-up-")
    api_port, flower_port, broker_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVCLONE_")}
    env.update({"ENVCLONE_DATA_DIR": str(root / "var"), "ENVCLONE_ADDRESS_POOL": "127.99.0.0/16"})
    log = open(root / "up.log", "w")
    up = subprocess.Popen([sys.executable, "-m", "api.cli", "up", "--api-port", str(api_port), "--flower-port",
                           str(flower_port), "--broker-port", str(broker_port)], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{api_port}"
    try:
        wait_for(lambda: httpx.get(f"{api}/readyz", timeout=2).status_code == 200, timeout=90, what="stack ready")
        token = envclone("token", "create", "--tenant", "acme", env=env)
        assert token.returncode == 0, token.stderr
        token = token.stdout.strip()
        assert token.startswith("ec_") and "\n" not in token
        client = httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert client.post("/v1/environments", json={"name": "src", "nodes": [
            {"name": "cache", "stack": "valkey"}]}).status_code == 202
        wait_for(lambda: client.get("/v1/environments/src").json()["state"] == "running", timeout=60, what="env")
        job_id = client.post("/v1/environments/src/clones", json={"name": "dst"}).json()["id"]

        cli_env = {**env, "ENVCLONE_URL": api, "ENVCLONE_TOKEN": token, "COLUMNS": "120"}
        watched = envclone("jobs", "watch", job_id, env=cli_env)
        assert watched.returncode == 0, watched.stdout + watched.stderr
        assert "job succeeded" in watched.stdout and "cache" in watched.stdout and "100%" in watched.stdout

        def flower_tasks() -> dict | None:
            tasks = httpx.get(f"http://127.0.0.1:{flower_port}/api/tasks", timeout=5).json()
            mine = {t["name"]: t["state"] for t in tasks.values() if job_id[:8] in (t.get("args") or "")}
            return mine if all(mine.get(name) == "SUCCESS" for name in STEP_TASKS) else None

        seen = wait_for(flower_tasks, timeout=30, what="Flower to list the job's tasks")
        assert sorted(seen) == sorted(STEP_TASKS)

        assert envclone("env", "delete", "dst", env=cli_env).returncode == 0
        wait_for(lambda: client.get("/v1/environments/dst").status_code == 404, timeout=60, what="delete")
        bad = envclone("env", "show", "nope", env=cli_env)
        assert bad.returncode == 1 and "does not exist" in bad.stderr
        started = descendants(up.pid)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
        log.close()
    try:
        wait_for(lambda: not [p for p in started if alive(p) and not _is_node(p, root)], timeout=15,
                 what="every process `envclone up` started to exit")
        # The source node is the customer's server: it outlives the stack until `envclone down`.
        assert processes_under(root / "var" / "nodes")
        down = envclone("down", "--data-dir", str(root / "var"), env=env)
        assert down.returncode == 0 and "stopped 1 node(s)" in down.stderr, down.stderr
        assert processes_under(root / "var" / "nodes") == []
    finally:
        print((root / "up.log").read_text()[-3000:])
        destroy_everything(root)


def _is_node(pid: int, root: Path) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/cwd").startswith(str(root / "var" / "nodes"))
    except OSError:
        return False
