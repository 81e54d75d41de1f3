"""N "hosts" on one machine, each isolated the way a separate machine is: its own network namespace
(a veth to a bridge of ours), node addresses from its own subnet, its own PID namespace.

Names and addresses, for a prefix P and a base B (two octets, e.g. ``10.231``):
  bridge ``Pbr`` at ``B.0.1/24`` in the root namespace;
  host i (1-based): netns ``P-hi``, veth ``Pvi`` (root side, on the bridge) / ``Ppi`` (in the netns)
  at ``B.0.(i+1)/24``, node pool ``B.i.0/24`` -- every address of it bindable inside the netns
  (AnyIP: ``local B.i.0/24 dev lo``) and routed to it from the root namespace.
The broker and the state DB listen on 127.0.0.1 of the root namespace, which a host cannot reach
(its 127.0.0.1 is its own): `Cluster.relay` forwards ``<bridge ip>:port`` to ``127.0.0.1:port``.

Root only (``available()`` says why not). Changes no machine-wide setting: forwarding is enabled on
our bridge alone (``net.ipv4.conf.<bridge>.forwarding``), which goes with it. Run as a script for manual use:
``python -m api.cli.hostnet create --prefix P --base 10.231 --count 3`` / ``teardown --prefix P`` /
``relay --prefix P --bind 10.231.0.1 --ports 6379,5432``."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

MAX_HOSTS = 200
NETNS_ETC = Path("/etc/netns")  # per-netns overrides of /etc files, applied by `ip netns exec`
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # + "-h200" / "v200" stays within IFNAMSIZ (15)


class HostNetError(Exception):
    """A step of the plumbing failed; the message names the command and the kernel's answer."""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise HostNetError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


@dataclass(frozen=True)
class HostNet:
    name: str  # host-1 ...
    netns: str
    veth_root: str
    veth_ns: str
    ip: str  # the host's address on the bridge
    gateway: str  # the bridge's address: where the relay (broker, state DB) is reached from the host
    pool: str  # the host's node subnet, every address of it bindable inside the host

    def argv(self, cmd: list[str], pid_ns: bool = True) -> list[str]:
        """``cmd`` to run inside this host. With ``pid_ns`` it is PID 1 of a PID namespace of its own
        (it sees and can signal only its descendants), and when the returned process (unshare)
        dies, its child is SIGKILLed and with it everything in that PID namespace. `ip netns exec`
        execs (no fork), so the pid a caller gets from Popen is unshare's.

        Stopping: unshare ignores SIGTERM/SIGINT, and PID 1 gets only the signals it handles. So
        start it with ``start_new_session=True`` and stop it with ``os.killpg(pid, SIGTERM)`` (what
        honcho does): the command gets the SIGTERM; then SIGKILL the wrapper if it lingers."""
        wrap = ["ip", "netns", "exec", self.netns]
        if pid_ns:
            wrap += ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
        return [*wrap, *cmd]


def available() -> str | None:
    """None when hosts can be made here, else why not (the caller falls back and says so)."""
    if os.geteuid() != 0:
        return "not root: network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access("/proc/sys/net/ipv4/conf/lo/forwarding", os.W_OK):
        return "cannot enable forwarding (/proc/sys is read-only here)"
    probe = f"ecprobe{os.getpid() % 100000}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:  # the link kinds we use, tried inside the throwaway namespace
        for kind in (["type", "bridge"], ["type", "veth", "peer", "name", "ecprobep"]):
            link = _run("ip", "-n", probe, "link", "add", "ecprobe", *kind, check=False)
            if link.returncode != 0:
                return f"cannot create a {kind[1]} link: {link.stderr.strip()}"
            _run("ip", "-n", probe, "link", "del", "ecprobe", check=False)
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


class Cluster:
    def __init__(self, prefix: str, base: str = "10.231") -> None:
        if not _PREFIX.match(prefix):
            raise ValueError(f"prefix {prefix!r}: 1-8 characters, a lowercase letter then letters or digits")
        net = ipaddress.ip_network(f"{base}.0.0/16")  # raises on anything but two octets
        if not net.is_private:
            raise ValueError(f"base {base!r} is not a private range")
        self.prefix, self.base = prefix, base
        self.bridge = f"{prefix}br"
        self.bridge_ip = f"{base}.0.1"

    def host(self, i: int) -> HostNet:
        if not 1 <= i <= MAX_HOSTS:
            raise ValueError(f"host index {i}: 1..{MAX_HOSTS}")
        p, b = self.prefix, self.base
        return HostNet(name=f"host-{i}", netns=f"{p}-h{i}", veth_root=f"{p}v{i}", veth_ns=f"{p}p{i}",
                       ip=f"{b}.0.{i + 1}", gateway=self.bridge_ip, pool=f"{b}.{i}.0/24")

    def hosts(self, count: int) -> list[HostNet]:
        """The hosts `create(count)` makes, without making anything."""
        return [self.host(i) for i in range(1, count + 1)]

    # -- create -------------------------------------------------------------------------------

    def create(self, count: int) -> list[HostNet]:
        """Make (or complete) the bridge and hosts 1..count. Idempotent; hosts beyond ``count`` from
        an earlier run are left alone (call `teardown()` first to start clean)."""
        hosts = self.hosts(count)
        if not _link_exists(self.bridge):
            _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "replace", f"{self.bridge_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        # Routed, not bridged, between hosts: host-1 reaches host-2's pool through the root ns.
        # Forwarding on our bridge only (IPv4 checks the inbound device), not the machine-wide
        # ip_forward: nothing else starts being routed, and it goes with the bridge.
        Path(f"/proc/sys/net/ipv4/conf/{self.bridge}/forwarding").write_text("1\n")
        for h in hosts:
            self._create_host(h)
        return hosts

    def _create_host(self, h: HostNet) -> None:
        if not Path("/run/netns", h.netns).exists():
            _run("ip", "netns", "add", h.netns)
        # No DNS inside a host (the machine's resolver is out of reach: no NAT), and a lookup should
        # fail at once, not after resolv.conf's timeouts (http.server's getfqdn took 10 s): the
        # host's own 127.0.0.1 refuses. `ip netns exec` binds this over /etc/resolv.conf.
        etc = NETNS_ETC / h.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("# envclone host: no DNS\nnameserver 127.0.0.1\noptions attempts:1\n")
        if not _link_exists(h.veth_root):
            # A partial run may have left the peer alone in the netns (its root end gone): drop it.
            _run("ip", "-n", h.netns, "link", "del", h.veth_ns, check=False)
            _run("ip", "link", "add", h.veth_root, "type", "veth", "peer", "name", h.veth_ns, "netns", h.netns)
        elif _link_exists(h.veth_ns):  # made, but not yet moved into the netns
            _run("ip", "link", "set", h.veth_ns, "netns", h.netns)
        _run("ip", "link", "set", h.veth_root, "master", self.bridge, "up")
        ns = ("ip", "-n", h.netns)
        _run(*ns, "link", "set", "lo", "up")
        _run(*ns, "addr", "replace", f"{h.ip}/24", "dev", h.veth_ns)
        _run(*ns, "link", "set", h.veth_ns, "up")
        _run(*ns, "route", "replace", "default", "via", self.bridge_ip)
        # AnyIP: the whole pool is local to the host, so a node binds any address of it as is.
        _run(*ns, "route", "replace", "local", h.pool, "dev", "lo", "table", "local")
        _run("ip", "route", "replace", h.pool, "via", h.ip, "dev", self.bridge)

    # -- relay --------------------------------------------------------------------------------

    def relay(self, ports: list[int], timeout: float = 15.0) -> subprocess.Popen[bytes]:
        """Start one background process forwarding ``<bridge ip>:port`` to ``127.0.0.1:port`` for each
        port, and return once it listens. Userspace, not DNAT: the server sees 127.0.0.1 (which
        PostgreSQL's pg_hba trusts), not the host's address. `teardown()` stops it."""
        # The file, not `-m api.cli.hostnet`: the relay needs none of the API's imports (a second
        # of start-up). -P: api/cli must not shadow the standard library (it has an operator.py).
        argv = [sys.executable, "-P", str(Path(__file__).resolve()), "relay", "--prefix", self.prefix,
                "--bind", self.bridge_ip, "--ports", ",".join(str(p) for p in ports)]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
        assert proc.stdout is not None
        # It prints one line once every port listens (or exits, having said why on stderr).
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""
        proc.stdout.close()
        if line.strip() != b"ready":
            _stop(proc.pid)
            proc.wait()
            raise HostNetError(f"the relay on {self.bridge_ip} did not start (exit {proc.returncode})")
        return proc

    # -- teardown -----------------------------------------------------------------------------

    def teardown(self) -> None:
        """Remove everything of this prefix, found in the kernel (not in memory): after a crash too.
        Kills the relay and every process in the hosts' namespaces first. Idempotent."""
        for pid in _relay_pids(self.prefix):
            _stop(pid)
        own_ns = re.compile(rf"^{re.escape(self.prefix)}-h\d+$")
        listed = _run("ip", "netns", "list").stdout.split("\n")
        for ns in [line.split()[0] for line in listed if line.strip() and own_ns.match(line.split()[0])]:
            self._kill_all_in(ns)
            _run("ip", "netns", "del", ns, check=False)
        for etc in NETNS_ETC.glob(f"{self.prefix}-h*"):
            if own_ns.match(etc.name):
                shutil.rmtree(etc, ignore_errors=True)
        try:
            NETNS_ETC.rmdir()  # only if no one else's is left in it
        except OSError:
            pass
        # Root ends of veths (their peers went with the namespaces; this catches half-made pairs)
        # and the bridge; their routes go with them.
        own_link = re.compile(rf"^{re.escape(self.prefix)}(br|[vp]\d+)$")
        for link in _links():
            if own_link.match(link):
                _run("ip", "link", "del", link, check=False)
        for route in _run("ip", "-o", "route").stdout.splitlines():
            if f" dev {self.bridge} " in f" {route} ":  # only if the bridge survived somehow
                _run("ip", "route", "del", *route.split()[:1], check=False)

    def _kill_all_in(self, ns: str) -> None:
        def pids() -> list[int]:
            return [int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split()]

        for pid in pids():
            _kill(pid, signal.SIGKILL)
        # A namespace whose processes are still dying would outlive `ip netns del` (with its veth).
        Retrying(retry=retry_if_result(bool), stop=stop_after_delay(10), wait=wait_fixed(0.05),
                 retry_error_callback=lambda s: s.outcome.result())(pids)


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _links() -> list[str]:
    return [line.split(":")[1].strip().split("@")[0] for line in _run("ip", "-o", "link").stdout.splitlines()]


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL if it is still there after 5 s."""
    _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)  # poll
    _kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _relay_pids(prefix: str) -> list[int]:
    """Relays of this prefix, found by their command line (after a crash nothing else knows them)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = any(a.endswith(b"hostnet.py") or a == b"api.cli.hostnet" for a in args)
        tag = [b"relay", b"--prefix", prefix.encode()]
        if ours and any(args[i:i + 3] == tag for i in range(len(args))):
            found.append(int(entry))
    return found


# -- the relay process --------------------------------------------------------------------------

_CHUNK = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(_CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()  # half-close passes through: the other way may still be talking


async def _serve(bind: str, ports: list[int]) -> None:
    async def handle(port: int, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            down_w.transport.abort()
            return
        for w in (down_w, up_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # broker round trips
        pipes = {asyncio.ensure_future(_pipe(down_r, up_w)), asyncio.ensure_future(_pipe(up_r, down_w))}
        done, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        errors = [p.exception() for p in done]  # each one read: none is logged as never retrieved
        if any(e is not None for e in errors):
            # A reset on one side resets the other at once, not when the other side next speaks: a
            # client killed mid-transaction would leave its session (and its row locks) to the
            # server until then, which, idle in a transaction, is never.
            for w in (down_w, up_w):
                w.transport.abort()
            for p in pending:
                p.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        else:
            for w in (down_w, up_w):
                w.close()

    # Python 3.11's start_server keeps no reference to a connection's task: one whose sockets are
    # both paused (flow control) is garbage, collected mid-transfer. Hold them until done.
    tasks: set[asyncio.Task[None]] = set()

    def connected(port: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(handle(port, r, w))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    servers = [await asyncio.start_server(lambda r, w, p=p: connected(p, r, w), bind, p, backlog=1024,
                                          reuse_address=True) for p in ports]
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.cli.hostnet",
                                     description="Hosts on one machine: namespaces, a bridge, a relay.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="make (or complete) the bridge and COUNT hosts")
    c.add_argument("--prefix", required=True)
    c.add_argument("--base", default="10.231")
    c.add_argument("--count", type=int, required=True)
    t = sub.add_parser("teardown", help="remove everything of PREFIX")
    t.add_argument("--prefix", required=True)
    r = sub.add_parser("relay", help="forward BIND:port to 127.0.0.1:port (foreground)")
    r.add_argument("--prefix", required=True)
    r.add_argument("--bind", required=True)
    r.add_argument("--ports", required=True, help="comma-separated")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            reason = available()
            if reason:
                print(f"hostnet: {reason}", file=sys.stderr)
                return 1
            for h in Cluster(args.prefix, args.base).create(args.count):
                print(f"{h.name} netns={h.netns} ip={h.ip} pool={h.pool} gateway={h.gateway}")
        elif args.command == "teardown":
            Cluster(args.prefix).teardown()
        else:
            asyncio.run(_serve(args.bind, [int(p) for p in args.ports.split(",") if p]))
    except (HostNetError, ValueError, OSError) as exc:
        print(f"hostnet: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
