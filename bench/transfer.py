"""Snapshot transfer throughput: our pull (python -m shared.transfer, server and puller as their own
processes) against `tar -cf - . | socat` -> `socat | tar -xf -` of the same snapshot between the
same two endpoints: two network namespaces joined by a veth pair when root and `ip` allow it (as two
hosts would be), else loopback. Each side runs from a cold page cache (dropped first; needs root) and
from a warm one (source read ahead), interleaved; figures are wall clock, process start included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from bench.common import MIB, filesystem, median
from shared.transfer.manifest import load_or_build

REPO = Path(__file__).resolve().parents[1]
NS_A, NS_B = "ecbench-a", "ecbench-b"  # sender, receiver
ADDR_A, ADDR_B = "10.239.0.1", "10.239.0.2"
SECRET = "bench-cluster-secret"
PORT_OURS, PORT_TAR = 29311, 29312
# A snapshot of mixed sizes, as a database volume is: one big file, a few mid-sized, many small.
LAYOUT = [(1, 512), (2, 128), (8, 24), (64, 1)]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _netns_usable() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@contextmanager
def endpoints() -> Iterator[tuple[list[str], list[str], str, str]]:
    """(sender command prefix, receiver command prefix, sender address, receiver address)."""
    if not _netns_usable():
        yield [], [], "127.0.0.1", "127.0.0.1"
        return
    for ns in (NS_A, NS_B):  # leftovers of a run that was killed
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    try:
        _ip("netns", "add", NS_A)
        _ip("netns", "add", NS_B)
        _ip("link", "add", "ecb-a", "netns", NS_A, "type", "veth", "peer", "name", "ecb-b", "netns", NS_B)
        for ns, dev, addr in ((NS_A, "ecb-a", ADDR_A), (NS_B, "ecb-b", ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield ["ip", "netns", "exec", NS_A], ["ip", "netns", "exec", NS_B], ADDR_A, ADDR_B
    finally:
        for ns in (NS_A, NS_B):  # deleting a namespace deletes its end of the veth pair, so both
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def make_snapshot(snaps: Path, snap_id: str) -> int:
    vol = snaps / snap_id / "volume"
    (vol / "base").mkdir(parents=True)
    block, total = os.urandom(MIB), 0
    for count, mib in LAYOUT:
        for i in range(count):
            with open(vol / ("base" if mib < 64 else ".") / f"seg{mib}m.{i}", "wb") as f:
                for k in range(mib):  # distinct blocks: nothing compresses or deduplicates
                    f.write(block[k % 4096:] + block[:k % 4096])
            total += mib * MIB
    (snaps / snap_id / "meta.json").write_text(json.dumps({"snapshot_id": snap_id, "method": "copy",
                                                           "size_bytes": total, "window_ms": 0}))
    return total


def _settle(cache: str, src: Path) -> None:
    """Start a run from a known state: no dirty pages of the run before, and the source either out
    of the page cache (cold: what a snapshot not read for a while costs, mostly the disk) or
    all in it (warm: the transfer machinery itself, network and receiving writes)."""
    subprocess.run(["sync"], check=False)
    if cache == "cold":
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    buf = bytearray(MIB)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _listening(prefix: list[str], port: int) -> bool:
    out = subprocess.run([*prefix, "ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=False)
    return bool(out.stdout.strip())


def _wait_listening(prefix: list[str], port: int) -> None:
    Retrying(stop=stop_after_delay(10), wait=wait_fixed(0.02), retry=retry_if_result(lambda ok: not ok),
             reraise=True)(_listening, prefix, port)


def run_ours(send: list[str], recv: list[str], addr: str, snaps: Path, dst: Path, cache: str) -> dict[str, float]:
    env = {**os.environ, "ENVCLONE_CLUSTER_SECRET": SECRET, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([*send, sys.executable, "-m", "shared.transfer", "serve", "--snaps-dir", str(snaps),
                               "--bind", f"{addr}:{PORT_OURS}"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = json.loads(server.stdout.readline())["url"]  # printed once it listens
        _settle(cache, snaps)
        started = time.perf_counter()
        out = subprocess.run([*recv, sys.executable, "-m", "shared.transfer", "pull", "--url", url,
                              "--snapshot", "xferbench", "--dest", str(dst)], env=env, capture_output=True,
                             text=True, check=True)
        wall = time.perf_counter() - started
    finally:
        server.kill()
        server.wait()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "in_process_s": result["seconds"], "bytes": result["bytes_received"]}


def run_tar(send: list[str], recv: list[str], addr: str, src: Path, dst: Path, cache: str) -> dict[str, float]:
    dst.mkdir(parents=True)
    listen = subprocess.Popen([*recv, "socat", "-u", f"TCP-LISTEN:{PORT_TAR},bind={addr},reuseaddr", "-"],
                              stdout=subprocess.PIPE)
    untar = subprocess.Popen([*recv, "tar", "-C", str(dst), "-xf", "-"], stdin=listen.stdout)
    assert listen.stdout is not None
    listen.stdout.close()  # tar alone holds the pipe's read end
    _wait_listening(recv, PORT_TAR)
    _settle(cache, src)
    started = time.perf_counter()
    tar = subprocess.Popen([*send, "tar", "-C", str(src), "-cf", "-", "."], stdout=subprocess.PIPE)
    sock = subprocess.Popen([*send, "socat", "-u", "-", f"TCP:{addr}:{PORT_TAR}"], stdin=tar.stdout)
    assert tar.stdout is not None
    tar.stdout.close()
    codes = [p.wait() for p in (tar, sock, listen, untar)]
    wall = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"tar | socat pipeline failed: exit codes {codes}")
    return {"wall_s": wall}


def run(root: Path, repeats: int = 2) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    snaps = root / "src"
    total = make_snapshot(snaps, "xferbench")
    started = time.perf_counter()
    load_or_build(snaps / "xferbench")  # once per snapshot, before its first pull; timed on its own
    manifest_s = time.perf_counter() - started
    caches = ["cold", "warm"] if os.geteuid() == 0 else ["warm"]  # dropping the page cache needs root
    runs: dict[str, dict[str, list[dict[str, float]]]] = {c: {"ours": [], "tar": []} for c in caches}
    try:
        with endpoints() as (send, recv, addr_a, addr_b):
            link = "veth between two network namespaces" if send else "loopback"
            for cache in caches:
                for _ in range(repeats):  # interleaved, so a drift of the machine hits both alike
                    ours = run_ours(send, recv, addr_a, snaps, root / "ours", cache)
                    assert ours["bytes"] == total
                    runs[cache]["ours"].append(ours)
                    shutil.rmtree(root / "ours")
                    runs[cache]["tar"].append(run_tar(send, recv, addr_b, snaps / "xferbench", root / "tar", cache))
                    shutil.rmtree(root / "tar")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mb = total / 1e6
    r: dict[str, Any] = {"size_mib": total // MIB, "files": sum(c for c, _ in LAYOUT), "link": link,
                         "filesystem": filesystem(REPO), "manifest_s": manifest_s, "repeats": repeats}
    for cache in caches:
        ours_runs = [mb / o["wall_s"] for o in runs[cache]["ours"]]
        tar_runs = [mb / t["wall_s"] for t in runs[cache]["tar"]]
        c = r[cache] = {"ours_mb_s_runs": ours_runs, "tar_socat_mb_s_runs": tar_runs,
                        "ours_in_process_mb_s_runs": [mb / o["in_process_s"] for o in runs[cache]["ours"]],
                        "ours_mb_s": median(ours_runs), "tar_socat_mb_s": median(tar_runs)}
        c["ours_in_process_mb_s"] = median(c["ours_in_process_mb_s_runs"])
        c["ratio"] = c["ours_mb_s"] / c["tar_socat_mb_s"]
        print(f"transfer {r['size_mib']} MiB over {link}, {cache} page cache: ours {c['ours_mb_s']:.0f} MB/s "
              f"(in-process {c['ours_in_process_mb_s']:.0f}), tar|socat {c['tar_socat_mb_s']:.0f} MB/s, "
              f"ratio {c['ratio']:.2f} (target >= 0.7); runs ours {[round(x) for x in ours_runs]}, "
              f"tar|socat {[round(x) for x in tar_runs]}", flush=True)
    print(f"manifest of the snapshot (SHA-256 of every file, once per snapshot): {manifest_s:.1f} s", flush=True)
    return r
