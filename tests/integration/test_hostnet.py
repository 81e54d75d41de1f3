"""Hosts on one machine (api.cli.hostnet): network and PID namespaces, node pools, the relay to the
root namespace's broker and state DB, teardown after a crash. Root only."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from api.cli.hostnet import Cluster, HostNet, available
from tests.helpers import wait_for
from tests.integration.test_api_server import free_port

pytestmark = pytest.mark.integration

PREFIX, BASE = "ect", "10.233"  # `envclone up` uses its own (10.231): the two never collide
PY = sys.executable


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reason = available()
    if reason:
        pytest.skip(reason)
    c = Cluster(PREFIX, BASE)
    c.teardown()  # whatever a killed run left
    try:
        c.create(2)
        yield c
    finally:
        c.teardown()


@pytest.fixture(scope="module")
def hosts(cluster: Cluster) -> list[HostNet]:
    return cluster.hosts(2)


def netns_pids(host: HostNet) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True, check=True)
    return [int(p) for p in out.stdout.split()]


@contextmanager
def running(host: HostNet, cmd: list[str], **kw) -> Iterator[subprocess.Popen]:
    """``cmd`` inside ``host``; on exit its wrapper is killed and the host must be left empty."""
    proc = subprocess.Popen(host.argv(cmd), **kw)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        wait_for(lambda: not netns_pids(host), timeout=10, what=f"nothing left running in {host.netns}")


def run_in(host: HostNet, code: str) -> str:
    done = subprocess.run(host.argv([PY, "-c", code]), capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_names_and_addresses_fit_the_kernel() -> None:
    c = Cluster("abcdefgh", "10.231")
    h = c.host(200)
    assert (h.netns, h.veth_root, h.veth_ns, h.ip, h.pool) == (
        "abcdefgh-h200", "abcdefghv200", "abcdefghp200", "10.231.0.201", "10.231.200.0/24")
    assert all(len(n) <= 15 for n in (c.bridge, h.netns, h.veth_root, h.veth_ns))
    for bad in ("", "Up", "1x", "toolongpre"):
        with pytest.raises(ValueError):
            Cluster(bad)
    with pytest.raises(ValueError):
        Cluster("ok", "8.8")  # not private


def test_a_node_address_is_reachable_from_the_root_and_from_another_host(
        hosts: list[HostNet], tmp_path: Path) -> None:
    h1, h2 = hosts
    addr = f"{BASE}.1.7"  # any address of host-1's pool binds, nothing set up for it
    server = [PY, "-m", "http.server", "--bind", addr, "8080"]
    with running(h1, server, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        url = f"http://{addr}:8080/"
        wait_for(lambda: urllib.request.urlopen(url, timeout=2).status == 200, timeout=15,
                 what="the server in host-1, from the root namespace")
        # host-2 -> root ns (forwarding) -> host-1: a separate machine's path.
        assert run_in(h2, f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).status)") == "200"


def test_a_host_has_its_own_pid_namespace_which_dies_with_its_leader(hosts: list[HostNet]) -> None:
    h1, h2 = hosts
    me = os.getpid()
    with running(h2, ["sleep", "300"]):  # a process of another host, to (not) see
        seen = run_in(h1, "import os\n"
                          "procs = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
                          f"try:\n os.kill({me}, 0); reach = 'yes'\n"
                          "except ProcessLookupError: reach = 'no'\n"
                          "print(os.getpid(), procs, reach)")
    assert seen == "1 [1] no"  # alone: PID 1, no other process, the test process out of reach

    # A tree inside host-1: killing the wrapper (unshare) takes all of it down.
    proc = subprocess.Popen(h1.argv(["sh", "-c", "sleep 300 & sleep 300 & wait"]))
    try:
        assert proc.pid in wait_for(lambda: len(netns_pids(h1)) >= 4 and netns_pids(h1), timeout=10,
                                    what="unshare, sh and two sleeps in host-1")
        proc.kill()
        proc.wait()
        wait_for(lambda: not netns_pids(h1), timeout=10, what="host-1's processes to die with their leader")
    finally:
        proc.kill()
        proc.wait()


def test_a_command_in_a_host_stops_gracefully_on_sigterm_to_its_process_group(hosts: list[HostNet]) -> None:
    h1, _ = hosts
    # unshare ignores SIGTERM itself; SIGTERM to the group reaches the command (PID 1 of its own
    # namespace: delivered because it handles it) -- what honcho does on Ctrl-C.
    code = ("import signal, sys\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
            "print('armed', flush=True)\n"
            "signal.pause()")
    proc = subprocess.Popen(h1.argv([PY, "-c", code]), stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "armed"
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(10) == 7  # its own exit status, through unshare
        wait_for(lambda: not netns_pids(h1), timeout=10, what="host-1 empty")
    finally:
        proc.kill()
        proc.wait()


def test_another_hosts_node_address_is_not_bindable(hosts: list[HostNet]) -> None:
    h1, _ = hosts
    code = ("import socket\n"
            f"s = socket.socket(); s.bind(('{BASE}.1.9', 0))\n"
            "t = socket.socket()\n"
            f"try:\n t.bind(('{BASE}.2.9', 0)); print('bound')\n"
            "except OSError as e:\n print(e.errno)")
    assert run_in(h1, code) == str(errno.EADDRNOTAVAIL)


@contextmanager
def counting_server(port: int) -> Iterator[None]:
    """On 127.0.0.1: reads to EOF, then answers with the number of bytes read (half-close)."""
    srv = socket.create_server(("127.0.0.1", port), backlog=128)

    def serve(conn: socket.socket) -> None:
        with conn:
            n = 0
            while chunk := conn.recv(1 << 16):
                n += len(chunk)
            conn.sendall(str(n).encode())

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield
    finally:
        srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        t.join(5)


def test_the_relay_reaches_the_roots_redis_and_postgresql(cluster: Cluster, hosts: list[HostNet]) -> None:
    h1, _ = hosts
    gw = cluster.bridge_ip
    echo_port = free_port()
    relay = cluster.relay([6379, 5432, echo_port])
    try:
        with counting_server(echo_port):
            ping = ("import socket\n"
                    f"s = socket.create_connection(('{gw}', 6379), timeout=5); s.sendall(b'PING\\r\\n')\n"
                    "print(s.recv(64).decode().strip())")
            assert run_in(h1, ping) == "+PONG"
            # PostgreSQL trusts 127.0.0.1 only: through the relay, that is who it sees.
            psql = subprocess.run(h1.argv(["psql", "-h", gw, "-U", "root", "-d", "postgres", "-tAc", "select 1"]),
                                  capture_output=True, text=True, timeout=30, check=False)
            assert (psql.returncode, psql.stdout.strip()) == (0, "1"), psql.stderr

            # Many connections at once, each half-closed: the answer comes after our EOF.
            payload = os.urandom(256 * 1024)

            def one(_: int) -> bytes:
                with socket.create_connection((gw, echo_port), timeout=10) as s:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    return b"".join(iter(lambda: s.recv(1 << 16), b""))

            with ThreadPoolExecutor(32) as pool:
                assert set(pool.map(one, range(100))) == {str(len(payload)).encode()}
    finally:
        relay.terminate()
        assert relay.wait(10) == 0


# A client that holds a row lock, asks one more question and dies before reading the answer: its
# kernel resets the connection (unread data), the way a killed agent's socket can end.
_DIES_HOLDING_A_LOCK = """
import select, sys, psycopg
conn = psycopg.connect(sys.argv[1])
conn.execute("SELECT id FROM relay_lock_probe WHERE id = 1 FOR UPDATE")
conn.pgconn.send_query(b"SELECT 1")
select.select([conn.pgconn.socket], [], [], 10)  # the answer is here, unread
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_client_reset_mid_transaction_ends_its_session_through_the_relay(cluster: Cluster) -> None:
    """A reset on one side is passed on at once: the server ends the session and its locks go. The
    relay used to wait for the server to speak first, so the dead client's transaction (and every
    row it had locked) lived until the relay stopped."""
    relay = cluster.relay([5432])
    direct = "postgresql://root@127.0.0.1:5432/test"
    with psycopg.connect(direct, autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS relay_lock_probe")
        admin.execute("CREATE TABLE relay_lock_probe (id int PRIMARY KEY)")
        admin.execute("INSERT INTO relay_lock_probe VALUES (1)")
    client = subprocess.Popen([PY, "-c", _DIES_HOLDING_A_LOCK, f"postgresql://root@{cluster.bridge_ip}:5432/test"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert client.stdout is not None and client.stdout.readline() == b"holding\n"

        def locked() -> bool:
            with psycopg.connect(direct) as conn:
                try:
                    conn.execute("SELECT id FROM relay_lock_probe WHERE id = 1 FOR UPDATE NOWAIT")
                except psycopg.errors.LockNotAvailable:
                    return True
                return False

        assert locked()  # the row is the client's
        client.kill()
        client.wait(10)
        wait_for(lambda: not locked(), timeout=10, what="the dead client's lock to go")
    finally:
        client.kill()
        client.wait(10)
        relay.terminate()
        assert relay.wait(10) == 0
        with psycopg.connect(direct, autocommit=True) as admin:
            admin.execute("DROP TABLE IF EXISTS relay_lock_probe")


def names_of(prefix: str, base: str) -> dict[str, list[str]]:
    def out(*args: str) -> list[str]:
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout.splitlines()

    own_link = re.compile(rf"^\d+: {prefix}(br|[vp]\d+)[@:]")
    return {"netns": [n for n in out("ip", "netns", "list") if n.startswith(f"{prefix}-")],
            "links": [n for n in out("ip", "-o", "link") if own_link.match(n)],
            "routes": [r for r in out("ip", "route") if f"{base}." in r],
            "etc": [p.name for p in Path("/etc/netns").glob(f"{prefix}-*")]}


def test_teardown_finds_everything_after_a_crash_and_create_completes_a_partial_run() -> None:
    reason = available()
    if reason:
        pytest.skip(reason)
    prefix, base = "ecu", "10.234"
    Cluster(prefix, base).teardown()
    c = Cluster(prefix, base)
    try:
        h1, h2 = c.create(2)
        subprocess.run(["ip", "link", "del", h2.veth_root], check=True)  # a run cut short
        assert c.create(2) == [h1, h2]
        assert len(names_of(prefix, base)["links"]) == 3  # bridge + 2 root ends
        relay = c.relay([6379])
        sleeper = subprocess.Popen(h1.argv(["sleep", "300"]))
        wait_for(lambda: netns_pids(h1), timeout=10, what="the sleeper in host-1")

        Cluster(prefix, base).teardown()  # knows nothing in memory: finds it all in the kernel
        relay.wait(10)  # both gone (TimeoutExpired otherwise)
        sleeper.wait(10)
        assert names_of(prefix, base) == {"netns": [], "links": [], "routes": [], "etc": []}
        Cluster(prefix, base).teardown()  # idempotent
    finally:
        c.teardown()
