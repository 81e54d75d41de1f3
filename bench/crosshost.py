"""End-to-end clone of a ~1 GiB PostgreSQL environment onto another host, against the naive way
(stop, ``tar | socat``, start), on the same two hosts of a real multi-host envclone (tests/cluster.py:
hosts are network and PID namespaces, so this needs root).

envclone: a clone job with ``target_host="host-2"``, consistency=online and =stop; total = the job's
created_at -> finished_at, and the job's own reported downtime (JobNode.downtime_ms). Naive: the
source's server stopped by its host's driver (a fast shutdown, as ``pg_ctl stop -m fast``), its
volume sent with ``tar -C <volume> -cf - . | socat -u - TCP:<host-2>:PORT`` from inside host-1 into
``socat -u TCP-LISTEN:PORT,bind=<host-2> - | tar -xf -`` inside host-2, then the source started again.
Host-1's agent is stopped for the naive run (its nodes keep running): it would otherwise restart the
stopped server within a second (reconcile_nodes), in the middle of the copy, as it should.
The naive copy is only unpacked on host-2, never started as a server there (envclone's total
includes starting the copy, new credentials and a new address). For both, a probe in the root
namespace opens a new connection and runs ``SELECT 1`` against the source every 10 ms: the longest
gap between two that succeeded (overlapping the clone) and the refused count are the source's
downtime as a client sees it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import IO, Any

from bench.realclient import ConnectProbe
from shared.snapshots import tree_size
from shared.stacks import CATALOG
from shared.stacks.postgres import APP_DB, SUPERUSER, postgres_bindir
from tests.cluster import Cluster, Host
from tests.helpers import wait_for
from tests.workflow_client import clone, create_environment, delete_environment, environment

PORT = 7301  # the naive copy's socat port on host-2
MODES = ("online", "stop")
# One driver process inside the host, started (and its imports done) before the clock starts: it
# reads "<action> <node id>" lines and answers "ok" once the driver call has returned.
_DRIVER_LOOP = ("import sys\nfrom shared.drivers.local import LocalDriver\nd = LocalDriver(sys.argv[1])\n"
                "print('ready', flush=True)\nfor line in sys.stdin:\n    action, node = line.split()\n"
                "    d.stop(node) if action == 'stop' else d.restart(node, 600)\n    print('ok', flush=True)\n")

_HEALTH = ("import sys\nfrom shared.drivers.local import LocalDriver\n"
           "print(LocalDriver(sys.argv[1]).health(sys.argv[2]))\n")


def _answer(out: IO[str] | None) -> str:
    assert out is not None
    return out.readline().strip()


def fill(url_super: str, mib: int) -> float:
    """pgbench -i at about 15 MiB per scale unit (as bench.realclient.fill_postgres); seconds taken."""
    started = time.monotonic()
    subprocess.run([str(postgres_bindir() / "pgbench"), "-i", "-q", "-s", str(max(1, round(mib / 15))), url_super],
                   check=True, capture_output=True)
    return time.monotonic() - started


def probe_figures(probe: ConnectProbe, t0: float, t1: float) -> dict[str, Any]:
    gap, began = probe.max_gap(t0, t1)
    return {"probe_gap_ms": gap, "probe_gap_began_s": began, "refused_connections": probe.failures(t0, t1),
            "connect_attempts": sum(1 for t, _ in probe.events if t0 <= t <= t1)}


def _start_probe(url: str) -> ConnectProbe:
    probe = ConnectProbe("postgres", url)
    probe.start()
    wait_for(lambda: sum(ok for _, ok in probe.events) >= 10, timeout=30, what="the probe to connect")
    return probe


def envclone_run(url: str, mode: str) -> dict[str, Any]:
    target = f"xsrc-{mode}"
    probe = _start_probe(url)
    try:
        t0 = time.time()
        job = clone("xsrc", target, timeout=1800, target_host="host-2", consistency=mode)
        t1 = time.time()
    finally:
        probe.stop()
    assert job.state == "succeeded", job.error
    copy = environment(target)
    assert copy is not None and all(n.host == "host-2" for n in copy.nodes), copy
    jn = job.nodes[0]
    steps = {str(s.step): round((s.finished_at - s.started_at).total_seconds(), 2)
             for s in job.steps if s.started_at and s.finished_at}
    provision = next((s.detail.get("transfer") for s in job.steps if str(s.step) == "provision"), None)
    delete_environment(target, timeout=300)
    return {"method": f"envclone {mode}", "total_s": (job.finished_at - job.created_at).total_seconds(),
            "wall_s": t1 - t0, "job_downtime_ms": jn.downtime_ms, "steps_s": steps, "transfer": provision,
            **probe_figures(probe, t0, t1)}


def naive_run(c: Cluster, url: str, node_id: str) -> dict[str, Any]:
    src, dst = c.host("host-1"), c.host("host-2")
    volume = src.data_dir / "nodes" / node_id
    dest = dst.data_dir / "naive-copy"
    dest.mkdir()
    ip = dst.net.ip  # type: ignore[attr-defined]
    c.kill_agent(src, signal.SIGTERM)  # no supervisor: nothing restarts the stopped server behind our back
    driver = _spawn_inside(c, src, [sys.executable, "-c", _DRIVER_LOOP, str(src.data_dir)], stdin=True)
    receiver = _spawn_inside(c, dst, ["sh", "-c", f"socat -u TCP-LISTEN:{PORT},bind={ip},reuseaddr - | "
                                                   f"tar -C {dest} -xf -"])
    probe = None
    try:
        assert _answer(driver.stdout) == "ready"
        wait_for(lambda: f"{ip}:{PORT}" in subprocess.run([*c._inside(dst), "ss", "-Hltn"], capture_output=True,
                                                          text=True, check=True).stdout,
                 timeout=30, what="socat listening on host-2")
        probe = _start_probe(url)
        t0 = time.time()
        assert driver.stdin is not None
        driver.stdin.write(f"stop {node_id}\n")
        driver.stdin.flush()
        assert _answer(driver.stdout) == "ok"
        t_stopped = time.time()
        subprocess.run([*c._inside(src), "sh", "-c",
                        f"tar -C {volume} -cf - . | socat -u - TCP:{ip}:{PORT}"], check=True)
        assert receiver.wait(timeout=600) == 0
        t_copied = time.time()
        driver.stdin.write(f"restart {node_id}\n")
        driver.stdin.flush()
        assert _answer(driver.stdout) == "ok"
        t1 = time.time()
        probe.stop()
        health = subprocess.run([*c._inside(src), sys.executable, "-c", _HEALTH, str(src.data_dir), node_id],
                                env={**os.environ, **c.agent_env(src)}, capture_output=True, text=True, check=True)
        copied = tree_size(dest)
        return {"method": "naive stop + tar|socat + start", "total_s": t1 - t0, "wall_s": t1 - t0,
                "job_downtime_ms": None, "stop_s": t_stopped - t0, "copy_s": t_copied - t_stopped,
                "start_s": t1 - t_copied, "copied_bytes": copied,
                "source_after": health.stdout.strip(),
                "copy_mib_s": copied / 2**20 / (t_copied - t_stopped), **probe_figures(probe, t0, t1)}
    finally:
        if probe is not None:
            probe.stop()
        assert driver.stdin is not None
        driver.stdin.close()  # the driver loop ends at EOF
        driver.wait(timeout=60)
        if receiver.poll() is None:
            receiver.kill()  # what it left in host-2's PID namespace ends with the host
        receiver.wait(timeout=60)
        shutil.rmtree(dest, ignore_errors=True)
        c.start_agent(src)
        wait_for(lambda: len(c.celery.control.ping(timeout=0.5)) >= len(c.hosts) + c.general_count, timeout=90,
                 what="host-1's agent back")
        wait_for(c.all_up, timeout=60, what="host-1 up again")


def _spawn_inside(c: Cluster, host: Host, argv: list[str], stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen([*c._inside(host), *argv], env={**os.environ, **c.agent_env(host)}, text=True,
                            stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE if stdin else None)


def run(mib: int = 1024) -> dict[str, Any]:
    with Cluster(count=2, general_workers=2, prefix="ecx", base="10.238") as c:
        if not c.isolated:
            print("crosshost: hosts are not namespaces here (needs root): skipped", flush=True)
            return {}
        try:
            env = create_environment("xsrc", [{"name": "db", "stack": "postgres", "host": "host-1"}], timeout=300)
            node = env.nodes[0]
            url = CATALOG[node.stack].url(node.address, node.port, node.credentials, secret=True)
            url_super = (f"postgresql://{SUPERUSER}:{node.credentials['superuser_password']}@{node.address}:"
                         f"{node.port}/{APP_DB}")
            fill_s = fill(url_super, mib)
            volume_bytes = tree_size(c.host("host-1").data_dir / "nodes" / node.id)
            print(f"crosshost: filled {volume_bytes / 2**20:.0f} MiB in {fill_s:.0f} s", flush=True)
            rows = [naive_run(c, url, node.id)] + [envclone_run(url, mode) for mode in MODES]
        finally:
            if environment("xsrc") is not None:
                delete_environment("xsrc", timeout=300)
    naive = rows[0]
    for r in rows:
        r["total_vs_naive"] = r["total_s"] / naive["total_s"]
        r["downtime_vs_naive"] = r["probe_gap_ms"] / naive["probe_gap_ms"] if naive["probe_gap_ms"] else None
        print(f"crosshost {r['method']:<32} total {r['total_s']:6.1f} s ({r['total_vs_naive']:.2f}x naive), "
              f"client-seen downtime {r['probe_gap_ms']:7.0f} ms, refused {r['refused_connections']}/"
              f"{r['connect_attempts']}, job's downtime {r['job_downtime_ms']} ms", flush=True)
    return {"size_mib": mib, "volume_bytes": volume_bytes, "fill_s": fill_s, "rows": rows}
