"""A real multi-host envclone for tests: N hosts, each with its own agent, data root and address
pool; general workers and beat beside them; one state database and one broker.

As root the hosts are isolated as separate machines would be (api.cli.hostnet): each agent runs in
its host's network namespace, in a PID namespace of its own, reaching the broker and the database
over the bridge -- so code acting on another host's node fails instead of working by accident.
Without root: agents on separate loopback subnets (the isolation tests then skip)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import create_database, destroy_everything, make_data_root
from tests.helpers import wait_for
from tests.stack import claim_redis_db, leave_backend, stop_group, use_backend

# PID 1 of a host's PID namespace: reaps what it inherits (nodes whose agent died), lives until the
# host is torn down. Agents are started beside it (nsenter), so killing an agent kills no node.
# An agent silent this long marks its host down: long enough for a killed agent's replacement to
# boot on a loaded two-core machine (6 s was not, under three test processes), short enough that a
# host gone for good fails its job within a test's patience.
HOST_DOWN_S = 10

_HOLDER = ("import os, signal\nsignal.signal(signal.SIGCHLD, lambda *a: None)\nwhile True:\n"
           "    try:\n        os.wait()\n    except ChildProcessError:\n        signal.pause()\n")

_DESTROY_ALL = ("import sys\nfrom shared.drivers.local import LocalDriver\nd = LocalDriver(sys.argv[1])\n"
                "for n in d.node_ids():\n    d.destroy_node(n)\n")


@dataclass
class Host:
    name: str
    pool: str
    data_dir: Path
    transfer_bind: str
    net: object | None = None  # api.cli.hostnet.HostNet when isolated
    holder: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    log: Path = field(default=Path("/dev/null"))
    _ns_pid: int | None = None

    def ns_pid(self) -> int | None:
        """The holder's pid as the root namespace sees it: unshare's child, found by its parent pid
        (/proc/<pid>/task/<pid>/children may miss a child while the machine is busy)."""
        if self.holder is None:
            return None
        if self._ns_pid is None:
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        status = Path(f"/proc/{entry}/status").read_text()
                    except OSError:
                        continue
                    if f"\nPPid:\t{self.holder.pid}\n" in status:
                        self._ns_pid = int(entry)
                        break
        return self._ns_pid


class Cluster:
    def __init__(self, count: int = 3, general_workers: int = 2, prefix: str | None = None, base: str | None = None,
                 loopback_base: str = "127.150", extra_env: dict[str, str] | None = None) -> None:
        # Per xdist worker: two clusters at once (tests spread test by test) never share a bridge.
        worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % 2
        prefix, base = prefix or f"ecm{worker}", base or f"10.{236 + worker}"
        loopback_base = f"127.{150 + worker}" if loopback_base == "127.150" else loopback_base
        self.root = make_data_root("envclone-cluster-")
        self.db_name, self.db_url = create_database()
        self.redis_db = claim_redis_db()
        self.secret = uuid.uuid4().hex
        self.isolated = False
        self.net = None
        try:
            from api.cli import hostnet

            self.isolated = hostnet.available() is None
        except ImportError:
            hostnet = None  # type: ignore[assignment]
        self.hosts: list[Host] = []
        if self.isolated:
            self.net = hostnet.Cluster(prefix=prefix, base=base)
            self.net.teardown()  # what a crashed run of this module left
            self.bridge_ip = self.net.bridge_ip
            for hn in self.net.create(count):
                self.hosts.append(Host(hn.name, hn.pool, self.root / hn.name, f"{hn.ip}:7070", hn))
        else:
            for i in range(1, count + 1):
                self.hosts.append(Host(f"host-{i}", f"{loopback_base}.{i}.0/24", self.root / f"host-{i}",
                                       f"127.0.0.1:{_free_port()}"))
        for host in self.hosts:
            host.data_dir.mkdir()
            host.data_dir.chmod(0o755)
            host.log = self.root / f"{host.name}.log"
        self.env = {
            "ENVCLONE_DATABASE_URL": self.db_url,
            "ENVCLONE_BROKER_URL": f"redis://127.0.0.1:6379/{self.redis_db}",
            "ENVCLONE_CLUSTER_SECRET": self.secret,
            "ENVCLONE_RETRY_BASE_S": "0.1",
            "ENVCLONE_RETRY_CAP_S": "1",
            "ENVCLONE_HEALTH_TIMEOUT_S": "30",
            "ENVCLONE_FAULT_INJECTION": "1",
            "ENVCLONE_HOST_DOWN_S": str(HOST_DOWN_S),
            "ENVCLONE_WATCHDOG_INTERVAL_S": "1",
            "ENVCLONE_DATA_DIR": str(self.root / "general"),
            "ENVCLONE_HOST_NAME": "none",
            "ENVCLONE_AGENT": "false",
            **(extra_env or {}),
        }
        self.general_count = general_workers
        self.general: list[subprocess.Popen[bytes]] = []
        self.beat: subprocess.Popen[bytes] | None = None
        self.relay: subprocess.Popen[bytes] | None = None
        self._saved: dict[str, str | None] = {}

    # ---- life ------------------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        self.celery, self._saved = use_backend(self.env, self.env["ENVCLONE_BROKER_URL"], self.db_url)
        try:
            self._start()
        except BaseException:
            self.__exit__()  # nothing of a start that failed half-way is left for the next attempt
            raise
        return self

    def _start(self) -> None:
        if self.isolated:
            self.relay = self.net.relay([6379, 5432])
        for host in self.hosts:
            self.start_agent(host)
        for i in range(self.general_count):
            self.general.append(self._spawn([sys.executable, "-m", "celery", "-A", "workers.worker", "worker", "-c",
                                             "2", "-n", f"general-{i}-{uuid.uuid4().hex[:6]}@%h", "-l", "info"],
                                            self.env, self.root / f"general-{i}.log"))
        self.beat = self._spawn([sys.executable, "-m", "celery", "-A", "workers.worker", "beat", "-l", "info",
                                 "-s", str(self.root / "beat-schedule")], self.env, self.root / "beat.log")
        wait_for(lambda: len(self.celery.control.ping(timeout=0.5)) >= len(self.hosts) + self.general_count,
                 timeout=90, what="every agent and general worker to answer ping")
        wait_for(self.all_up, timeout=60, what="every host to report up")

    def all_up(self) -> bool:
        from shared.db import session_scope
        from shared.models import Host as HostRow

        with session_scope() as session:
            return all((row := session.get(HostRow, h.name)) is not None and row.state == "up" for h in self.hosts)

    def agent_env(self, host: Host) -> dict[str, str]:
        env = {**self.env, "ENVCLONE_HOST_NAME": host.name, "ENVCLONE_DATA_DIR": str(host.data_dir),
               "ENVCLONE_ADDRESS_POOL": host.pool, "ENVCLONE_AGENT": "true", "ENVCLONE_ORCHESTRATE": "false",
               "ENVCLONE_TRANSFER_BIND": host.transfer_bind}
        if self.isolated:  # inside its namespace the root's 127.0.0.1 is the bridge, through the relay
            env["ENVCLONE_DATABASE_URL"] = self.db_url.replace("127.0.0.1", self.bridge_ip)
            env["ENVCLONE_BROKER_URL"] = env["ENVCLONE_BROKER_URL"].replace("127.0.0.1", self.bridge_ip)
        return env

    def start_agent(self, host: Host) -> None:
        argv = [sys.executable, "-m", "celery", "-A", "workers.worker", "worker", "-c", "2", "-E", "-l", "info",
                "-n", f"agent-{host.name}-{uuid.uuid4().hex[:6]}@%h"]
        if self.isolated:
            if host.holder is None:
                host.holder = self._spawn(host.net.argv([sys.executable, "-c", _HOLDER]), {}, host.log)

                def started() -> int | None:
                    if host.holder is not None and host.holder.poll() is not None:
                        raise AssertionError(f"{host.name}'s namespace holder exited: {host.log.read_text()[-2000:]}")
                    return host.ns_pid()

                wait_for(started, timeout=30, what=f"{host.name}'s PID namespace")
            argv = [*self._inside(host), *argv]
        host.agent = self._spawn(argv, self.agent_env(host), host.log)

    def _inside(self, host: Host) -> list[str]:
        """A command prefix that runs in the host's network and PID namespaces."""
        return ["nsenter", "--target", str(host.ns_pid()), "--pid", "--mount", "--net", "--"]

    def kill_agent(self, host: Host, sig: int = signal.SIGKILL) -> None:
        """The agent and its pool processes die; the host's nodes keep running (a crashed agent)."""
        if host.agent is None:
            return
        stop_group(host.agent, sig)
        host.agent = None

    def _spawn(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env={**os.environ, **env}, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def __exit__(self, *exc: object) -> None:
        for proc in [self.beat, *self.general]:
            if proc is not None:
                stop_group(proc)
        for host in self.hosts:
            self.kill_agent(host, signal.SIGTERM)
        leftovers = []
        for host in self.hosts:
            if host.holder is not None:
                # Node pid files hold the host's own pids: its nodes are stopped from inside it, then
                # its PID namespace ends with its init (whatever still ran there ends with it).
                subprocess.run([*self._inside(host), sys.executable, "-c", _DESTROY_ALL, str(host.data_dir)],
                               env={**os.environ, **self.agent_env(host)}, check=False, timeout=300)
                os.killpg(host.holder.pid, signal.SIGKILL)
                host.holder.wait(timeout=60)
            leftovers += destroy_everything(host.data_dir) if host.data_dir.exists() else []
        if self.relay is not None:
            stop_group(self.relay)
        if self.net is not None:
            self.net.teardown()
        leave_backend(self.celery, self._saved, self.db_name, self.env["ENVCLONE_BROKER_URL"], self.redis_db)
        kept = Path(tempfile.gettempdir()) / "envclone-last-cluster" / self.root.name  # for a post-mortem
        kept.mkdir(parents=True, exist_ok=True)
        for log in self.root.glob("*.log"):
            shutil.copy(log, kept / log.name)
        destroy_everything(self.root)
        assert not leftovers, f"processes left behind: {leftovers}"

    # ---- looking ---------------------------------------------------------------------------------
    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def volumes(self, host: Host) -> set[str]:
        nodes = host.data_dir / "nodes"
        return {p.name for p in nodes.iterdir()} if nodes.exists() else set()

    def snapshots(self, host: Host) -> set[str]:
        snaps = host.data_dir / "snapshots"
        return {p.name for p in snaps.iterdir() if not p.name.startswith(".reflink-probe")} if snaps.exists() else set()

    def log(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.root.glob("*.log")))


def _free_port() -> int:
    from tests.integration.test_api_server import free_port

    return free_port()
