"""`envclone up --hosts N`: N hosts on this machine, named host-1 ... host-N, each with its own agent,
data root (<data-dir>/hosts/host-i) and address pool. As root each host is isolated the way a
separate machine is (api.cli.hostnet): its own network namespace on a bridge envclone makes, its
node subnet, its own PID namespace; the broker and the state database are reached over the bridge,
and node addresses stay reachable from this machine. Without root or `ip`: N agents on separate
loopback subnets, said at start. `envclone down` removes what this made."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from api.cli import hostnet, private

PREFIX, BASE = "ec", "10.231"  # the tests use other prefixes and bases: never the same bridge
STATE_FILE = "hosts.json"  # what `down` must undo
SECRET_FILE = "cluster-secret"
TRANSFER_PORT = 7070


@dataclass(frozen=True)
class HostPlan:
    name: str
    pool: str
    data_dir: Path
    transfer_bind: str
    net: hostnet.HostNet | None  # None: on this machine's loopback


def plan_hosts(data_dir: Path, count: int) -> tuple[list[HostPlan], str | None, str]:
    """(hosts, why they are not isolated or None, the address the hosts reach the broker at)."""
    reason = hostnet.available()
    hosts_dir = data_dir / "hosts"
    if reason is None:
        cluster = hostnet.Cluster(PREFIX, BASE)
        cluster.teardown()  # what a crashed run left
        nets = cluster.create(count)
        plans = [HostPlan(h.name, h.pool, hosts_dir / h.name, f"{h.ip}:{TRANSFER_PORT}", h) for h in nets]
        gateway = cluster.bridge_ip
    else:
        plans = [HostPlan(f"host-{i}", f"127.81.{i}.0/24", hosts_dir / f"host-{i}",
                          f"127.0.0.1:{TRANSFER_PORT + i}", None) for i in range(1, count + 1)]
        gateway = "127.0.0.1"
    for plan in plans:
        plan.data_dir.mkdir(parents=True, exist_ok=True)
        plan.data_dir.chmod(0o711)  # node accounts pass through to their volumes
    hosts_dir.chmod(0o711)
    private.write_private(data_dir / STATE_FILE, json.dumps(
        {"isolated": reason is None, "prefix": PREFIX, "hosts": [p.name for p in plans]}))
    return plans, reason, gateway


def cluster_secret(data_dir: Path) -> str:
    path = data_dir / SECRET_FILE
    kept = private.read_private(path)
    if kept is None:
        kept = secrets.token_hex(32)
        private.write_private(path, kept + "\n")
    return kept


def _via(url: str, gateway: str) -> str:
    """The URL as a host reaches it: a service on this machine's loopback through the bridge."""
    parts = urlsplit(url)
    if parts.hostname in ("127.0.0.1", "localhost") and gateway != "127.0.0.1":
        return url.replace(f"@{parts.hostname}", f"@{gateway}").replace(f"//{parts.hostname}", f"//{gateway}")
    return url


def relay_ports(env: dict[str, str], embedded_broker: bool) -> list[int]:
    """Ports of loopback services the hosts must reach through the relay (the embedded broker binds
    the bridge itself; an SQLite state database is a file)."""
    ports = []
    for key in ("ENVCLONE_DATABASE_URL", *(() if embedded_broker else ("ENVCLONE_BROKER_URL",))):
        parts = urlsplit(env.get(key, ""))
        if parts.hostname in ("127.0.0.1", "localhost") and parts.port:
            ports.append(parts.port)
    return ports


def add_processes(manager: object, plans: list[HostPlan], env: dict[str, str], gateway: str,
                  embedded_broker: bool) -> None:
    """The relay (as root), an agent per host, and the general worker (orchestration only)."""
    py, q = sys.executable, shlex.quote
    if plans and plans[0].net is not None:
        ports = relay_ports(env, embedded_broker)
        if ports:
            relay = [py, "-P", hostnet.__file__, "relay", "--prefix", PREFIX, "--bind", gateway,
                     "--ports", ",".join(map(str, ports))]
            manager.add_process("relay", " ".join(q(a) for a in relay), env=env)  # type: ignore[attr-defined]
    for plan in plans:
        agent_env = {**env, "ENVCLONE_HOST_NAME": plan.name, "ENVCLONE_DATA_DIR": str(plan.data_dir),
                     "ENVCLONE_ADDRESS_POOL": plan.pool, "ENVCLONE_AGENT": "true", "ENVCLONE_ORCHESTRATE": "false",
                     "ENVCLONE_TRANSFER_BIND": plan.transfer_bind,
                     "ENVCLONE_BROKER_URL": _via(env["ENVCLONE_BROKER_URL"], gateway),
                     "ENVCLONE_DATABASE_URL": _via(env["ENVCLONE_DATABASE_URL"], gateway)}
        argv = [py, "-m", "celery", "-A", "workers.worker", "worker", "-c", "2", "-E", "-l", "info",
                "-n", f"agent-{plan.name}@%h"]
        if plan.net is not None:
            argv = plan.net.argv(argv)
        manager.add_process(f"agent-{plan.name}", " ".join(q(a) for a in argv), env=agent_env)  # type: ignore[attr-defined]
    manager.add_process("worker", f"{q(py)} -m celery -A workers.worker worker -c 2 -E -l info "  # type: ignore[attr-defined]
                        "-n general@%h", env={**env, "ENVCLONE_AGENT": "false", "ENVCLONE_HOST_NAME": "none"})


def take_down(data_dir: Path) -> tuple[int, bool]:
    """Stop the nodes of every host `up --hosts` made and remove its namespaces, bridge and relay.
    Returns (nodes stopped, whether there was anything of it)."""
    from shared.drivers.local import LocalDriver

    state_path = data_dir / STATE_FILE
    state = json.loads(private.read_private(state_path) or "null")
    if state is None:
        return 0, False
    stopped = set()
    for name in state["hosts"]:
        driver = LocalDriver(data_dir / "hosts" / name)
        if not state["isolated"]:  # nodes in this namespace: stopped one by one, gracefully
            for node_id in driver.running_node_ids():
                driver.stop(node_id)
                stopped.add(node_id)
        else:
            stopped |= driver.node_ids()  # they end with their host's PID namespace, below
    if state["isolated"] and os.geteuid() == 0:
        hostnet.Cluster(state["prefix"]).teardown()
    state_path.unlink(missing_ok=True)
    return len(stopped), True
