"""Copy throughput: provisioning a clone volume from a snapshot (byte copy, no reflink) against
`cp -a --reflink=never` of the same snapshot, same filesystem, same run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.common import filesystem, median, timed
from shared.drivers.local import LocalDriver
from shared.snapshots import tree_size

MIB = 1024 * 1024


def run(root: Path, mib: int = 1024, repeats: int = 3) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    driver = LocalDriver(root)
    driver._reflink = False  # the byte-copy path, whatever the filesystem could do
    snap = driver.snaps_dir / "copybench"
    (snap / "volume" / "data").mkdir(parents=True)
    chunk = os.urandom(MIB)
    for i in range(mib // 64):  # a volume of 64 MiB files, as PostgreSQL lays out big tables
        with open(snap / "volume" / "data" / f"seg{i}", "wb") as f:
            for _ in range(64):
                f.write(chunk)
    (snap / "volume" / "node.json").write_text('{"stack": "valkey", "address": "127.0.0.1", "port": 6379}')
    meta = {"snapshot_id": "copybench", "method": "copy", "size_bytes": tree_size(snap / "volume"), "window_ms": 0}
    (snap / "meta.json").write_text(json.dumps(meta))
    ours, cp = [], []
    try:
        for n in range(repeats):
            subprocess.run(["sync"], check=False)
            ms, _ = timed(lambda n=n: driver.provision("copybench", f"copy{n}"))
            ours.append(ms)
            driver.destroy_node(f"copy{n}")
            target = root / f"cp{n}"
            subprocess.run(["sync"], check=False)
            ms, _ = timed(lambda t=target: subprocess.run(["cp", "-a", "--reflink=never", str(snap / "volume"),
                                                           str(t)], check=True))
            cp.append(ms)
            shutil.rmtree(target)
    finally:
        shutil.rmtree(snap, ignore_errors=True)
    o, b = median(ours), median(cp)
    r = {"size_mib": mib, "filesystem": filesystem(root), "provision_ms": o, "cp_ms": b,
         "provision_mib_s": mib / (o / 1000), "cp_mib_s": mib / (b / 1000)}
    r["ratio"] = r["provision_mib_s"] / r["cp_mib_s"]
    print(f"copy {mib} MiB: provision {r['provision_mib_s']:.0f} MiB/s, cp -a {r['cp_mib_s']:.0f} MiB/s, "
          f"ratio {r['ratio']:.2f} (target >= 0.8)", flush=True)
    return r
