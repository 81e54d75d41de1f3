"""Run the benchmarks and write bench/results/: one JSON per benchmark, results.md (figures beside
their baselines, ratios, targets met or missed) and downtime.png.

    python -m bench.run                 # everything: downtime at 100 MiB, 1 GiB, 4 GiB
    python -m bench.run --sizes 100,1024 --only downtime,copy
    python -m bench.run --only realclient --realclient-sizes 1024 --realclient-roots default,xfs
    python -m bench.run --only crosshost --crosshost-mib 1024   # root: hosts as namespaces
    python -m bench.run --only transfer   # snapshot pull between two network namespaces vs tar | socat
    python -m bench.run --only floor      # the realclient loads with no clone: the machine's own gaps
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench import common

ALL = ("downtime", "orchestration", "throughput", "copy", "streams", "masking", "realclient", "pgonline", "enqueue",
       "crosshost", "transfer", "floor")


def plot(downtime: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (stack, root), marker in zip(sorted({(r["stack"], r["root"]) for r in downtime}),
                                     ["o", "s", "^", "d", "v", "x"], strict=False):
        pts = sorted((r["size_mib"], r["ours_ms"], r["naive_ms"]) for r in downtime
                     if r["stack"] == stack and r["root"] == root)
        xs = [p[0] for p in pts]
        line = ax.plot(xs, [p[1] / 1000 for p in pts], marker=marker, linestyle="-", label=f"envclone {stack} ({root})")
        ax.plot(xs, [p[2] / 1000 for p in pts], marker=marker, linestyle="--", alpha=0.45,
                color=line[0].get_color(), label=f"naive {stack} ({root})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("data size (MiB)")
    ax.set_ylabel("source downtime (s, log scale)")
    ax.set_title("Source downtime: envclone vs stop + cp -a + start")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = ["# Benchmark results", "",
           f"Machine: {m['cores']} cores, {m['memory_mib']} MiB RAM, kernel {m['kernel']}, Python {m['python']}, "
           f"default data root on {m['filesystem']}.", ""]
    if "downtime" in results:
        out += ["## Source downtime (quiesce start -> healthy again)", "",
                "Server side: quiesce start to healthy again (valkey: writes held, reads served). Client side: "
                "the longest gap between two acknowledged writes of a probe writing every 5 ms.", "",
                "Each figure is the median of the runs (3, or 2 at 4 GiB); the worst run is beside it.", "",
                common.row("root", "stack", "size", "volume", "method", "envclone", "naive", "ratio", "target",
                           "client write gap: envclone / naive", "worst run: envclone / naive"),
                common.row(*["---"] * 11)]
        for r in results["downtime"]:
            if r["root"] == "xfs-reflink" and r["size_mib"] >= 1024:
                target = "<= 500 ms: " + ("met" if r["ours_ms"] <= 500 else "MISSED")
            elif r["root"] == "default":
                target = ">= 1.5x: " + ("met" if r["ratio"] >= 1.5 else "MISSED")
            else:
                target = ""
            volume = f"{r['volume_bytes'] // 2**20} MiB"
            out.append(common.row(r["root"], r["stack"], f"{r['size_mib']} MiB", volume, r["method"],
                                  f"{r['ours_ms']:.0f} ms", f"{r['naive_ms']:.0f} ms", f"{r['ratio']:.1f}x", target,
                                  f"{r['write_gap_ours_ms']:.0f} / {r['write_gap_naive_ms']:.0f} ms"
                                  if "write_gap_ours_ms" in r else "not measured",
                                  f"{max(x['downtime_ms'] for x in r['runs_ours']):.0f} / "
                                  f"{max(x['downtime_ms'] for x in r['runs_naive']):.0f} ms"))
        out += ["", "![downtime vs size](downtime.png)", ""]
    if "orchestration" in results:
        out += ["## Orchestration overhead (tiny volumes, 4 worker processes)", "",
                common.row("nodes", "wall", "steps' own work (sum)", "chain overhead/step median", "max",
                           "floor: max(chain work, work / cores)", "wall beyond floor per step",
                           "source downtime in the workflow: median / max"),
                common.row(*["---"] * 8)]
        for r in results["orchestration"]:
            out.append(common.row(r["nodes"], f"{r['wall_ms']:.0f} ms", f"{r['work_ms_sum']:.0f} ms",
                                  f"{r['overhead_per_step_ms_median']:.1f} ms",
                                  f"{r['overhead_per_step_ms_max']:.1f} ms", f"{r['floor_ms']:.0f} ms",
                                  f"{r['beyond_floor_per_step_ms']:.1f} ms",
                                  f"{r['workflow_downtime_ms_median']:.0f} / {r['workflow_downtime_ms_max']:.0f} ms"))
        scale = results["orchestration"][-1].get("wall_50_over_10")
        if scale:
            floors = {r["nodes"]: r["floor_ms"] for r in results["orchestration"]}
            out += ["", f"wall(N=50) / wall(N=10) = {scale:.2f} (target <= 2: {'met' if scale <= 2 else 'MISSED'}); "
                        f"the machine's floor itself grows {floors[50] / floors[10]:.2f}x "
                        f"(the steps' own work grows with N and {results['machine']['cores']} cores run it)"]
        med = max(r["overhead_per_step_ms_median"] for r in results["orchestration"])
        beyond = max(r["beyond_floor_per_step_ms"] for r in results["orchestration"] if r["nodes"] > 1)
        out += [f"worst chain overhead per step (median) {med:.1f} ms (target <= 30 ms: "
                f"{'met' if med <= 30 else 'MISSED'}; beyond N = 1 it is mostly waiting for a free worker process)",
                f"worst wall beyond the machine's floor per step, N > 1: {beyond:.1f} ms "
                f"(against the same 30 ms: {'met' if beyond <= 30 else 'MISSED'})", ""]
    if "throughput" in results:
        t = results["throughput"]
        two, four = t["jobs_per_minute"]
        e = t["enqueue"]
        out += ["## Throughput", "",
                common.row("measure", "figure", "baseline", "ratio"), common.row(*["---"] * 4),
                common.row("clone jobs/min, 4 workers vs 2", f"{four['jobs_per_minute']:.1f}",
                           f"{two['jobs_per_minute']:.1f}", f"{four['jobs_per_minute'] / two['jobs_per_minute']:.2f}x"),
                ""]
        out += [common.row("enqueue, 50 clients", "req/s", "p50", "p99", "GET /healthz p50 / p99 (floor)",
                           "p99 vs floor", "target p99 < 50 ms"), common.row(*["---"] * 7)]
        for kind, label in (("closed", "closed loop (next request on answer)"),
                            ("paced", f"paced ({e['paced_rate_per_client']} req/s per client)")):
            p99 = e[f"{kind}_enqueue_p99_ms"]
            out.append(common.row(label, f"{e[f'{kind}_enqueue_per_s']:.0f}", f"{e[f'{kind}_enqueue_p50_ms']:.1f} ms",
                                  f"{p99:.1f} ms", f"{e[f'{kind}_healthz_p50_ms']:.1f} / "
                                  f"{e[f'{kind}_healthz_p99_ms']:.1f} ms", f"{e[f'{kind}_p99_over_floor']:.1f}x",
                                  "met" if p99 < 50 else "MISSED"))
        out.append("")
    if "copy" in results:
        c = results["copy"]
        out += ["## Copy throughput", "", common.row("measure", "provision", "cp -a", "ratio", "target"),
                common.row(*["---"] * 5),
                common.row(f"{c['size_mib']} MiB on {c['filesystem']}", f"{c['provision_mib_s']:.0f} MiB/s",
                           f"{c['cp_mib_s']:.0f} MiB/s", f"{c['ratio']:.2f}",
                           ">= 0.8: " + ("met" if c["ratio"] >= 0.8 else "MISSED")), ""]
    if "masking" in results:
        k = results["masking"]
        out += ["## Masking throughput (one PostgreSQL node)", "",
                common.row("measure", "masking (email rule)", "plain UPDATE email = email \\|\\| ''",
                           "ratio", "target"),
                common.row(*["---"] * 5),
                common.row(f"{k['rows']} rows, one transaction", f"{k['mask_rows_s']:.0f} rows/s",
                           f"{k['plain_rows_s']:.0f} rows/s", f"{k['ratio']:.2f}",
                           ">= 0.5: " + ("met" if k["ratio"] >= 0.5 else "MISSED")),
                "", f"As a clone runs it (private start + transaction + clean stop): {k['whole_rows_s']:.0f} rows/s "
                f"({k['whole_ms']:.0f} ms). For comparison, a keyed 64-bit non-cryptographic fake "
                f"(hashtextextended) instead of md5: ratio {k['fast_hash_ratio']:.2f}.", ""]
    if "streams" in results:
        st = results["streams"]
        idle, quiet, active = st["idle"], st["quiet_streams"], st["active_streams"]
        n = st["streams"]
        out += ["## Event streams beside ordinary requests", "",
                f"{st['server']}; {st['probe_clients']} probe clients in a closed loop. The streams follow "
                f"queued jobs of {st['tenants']} tenants: quiet (no events) and active (each job gets 2 events/s, "
                f"as a running one does). Refused: {quiet['streams_refused']} and {active['streams_refused']} "
                f"of {n}.", "",
                common.row("measure", "0 streams open", f"{n} quiet streams", f"{n} active streams",
                           "worst / 0 streams", "target"),
                common.row(*["---"] * 6)]
        for key, label in (("healthz", "GET /healthz"), ("job_get", "GET /v1/jobs/{id}")):
            for q in ("p50", "p99"):
                f = f"{key}_{q}_ms"
                worst = max(quiet[f], active[f])
                target = ("< 200 ms: " + ("met" if worst < 200 else "MISSED")) if f == "healthz_p99_ms" else ""
                out.append(common.row(f"{label} {q}", f"{idle[f]:.1f} ms", f"{quiet[f]:.1f} ms", f"{active[f]:.1f} ms",
                                      f"{worst / idle[f]:.1f}x", target))
        out.append("")
    if "enqueue" in results:
        c, e = results["enqueue"]["cpu"], results["enqueue"]["latency"]
        out += ["## Thin enqueue (one transaction + one publish of envclone.start_clone)", "",
                "Beside the figures of the former enqueue (six transactions and a chord per request) as "
                "analysis.md recorded them; same harness (gunicorn as `envclone up` runs it, 50 clients).", "",
                common.row("measure", "now", "before", "ratio (> 1: better now)"), common.row(*["---"] * 4),
                common.row("server CPU per enqueue (sequential, gunicorn processes' CPU time)",
                           f"{c['enqueue_cpu_ms']:.1f} ms", "not measured (sequential latency 20-24 ms)", ""),
                common.row("sequential latency p50", f"{c['enqueue_sequential_p50_ms']:.1f} ms", "20-24 ms",
                           f"{22 / c['enqueue_sequential_p50_ms']:.1f}x"),
                common.row("GET /healthz CPU per request (floor)", f"{c['healthz_cpu_ms']:.1f} ms", "", ""),
                common.row("paced p99, 50 clients x 0.2 req/s (10 req/s)", f"{e['paced_enqueue_p99_ms']:.1f} ms",
                           "107 ms", f"{107 / e['paced_enqueue_p99_ms']:.1f}x"),
                common.row("closed-loop throughput, 50 clients", f"{e['closed_enqueue_per_s']:.0f} req/s",
                           "30 req/s", f"{e['closed_enqueue_per_s'] / 30:.1f}x"),
                common.row("closed-loop p99", f"{e['closed_enqueue_p99_ms']:.0f} ms", "2200 ms", ""), ""]
    if "realclient" in results:
        out += realclient_markdown(results["realclient"])
    if results.get("crosshost"):
        out += crosshost_markdown(results["crosshost"])
    if "transfer" in results:
        out += transfer_markdown(results["transfer"])
    if "pgonline" in results:
        out += pg_online_markdown(results["pgonline"])
    if "floor" in results:
        out += floor_markdown(results["floor"])
    return "\n".join(out) + "\n"


def pg_online_markdown(rows: list[dict[str, Any]]) -> list[str]:
    out = ["## PostgreSQL online copy: pg_backup_start + copy/reflink vs pg_basebackup", "",
           "Same source, same pgbench TPC-B load (-c 4 -j 2), one run per row, methods in this order on each "
           "root (a second round in reverse order). Copy = snapshot_online; gap, failed, refused and p99 over "
           "the whole clone (copy, provision, new credentials, the copy's first start).", "",
           common.row("root", "size", "round", "method", "longest client gap", "failed tx", "refused conns",
                      "p99 before -> during", "copy", "clone", "invariant on copy"),
           common.row(*["---"] * 11)]
    for r in rows:
        ratio_ = r["p99_during_ms"] / r["p99_before_ms"] if r["p99_before_ms"] else float("inf")
        out.append(common.row(r["root"], f"{r['size_mib']} MiB", r.get("round", 1), r["pg_online_method"],
                              f"{r['longest_client_gap_ms']:.0f} ms", r["failed_transactions"],
                              f"{r['refused_connections']} / {r['connect_attempts']}",
                              f"{r['p99_before_ms']:.1f} -> {r['p99_during_ms']:.1f} ms ({ratio_:.1f}x)",
                              f"{r['copy_s']:.2f} s", f"{r['clone_s']:.1f} s",
                              "holds" if r["invariant_holds"] else "BROKEN"))
    return out + [""]


def floor_markdown(rows: list[dict[str, Any]]) -> list[str]:
    out = ["## The machine's floor: the realclient loads with no clone", "",
           "Each stack's realclient load against one of our nodes, filled and restarted as realclient does, with "
           "nothing else running, for a clone-length window; arms alternating on the same node: durable as the "
           "node is configured (MariaDB: redo flushed at each commit; Valkey: appendfsync everysec) and with that "
           "flush off. A clone's longest gap cannot be told from the durable arm's on this machine.", "",
           common.row("stack", "size", "commits", "window", "longest client gap", "gaps > 20 ms", "gaps > 50 ms",
                      "p99", "transactions"),
           common.row(*["---"] * 9)]
    for r in rows:
        out.append(common.row(r["stack"], f"{r['size_mib']} MiB", "durable" if r["durable"] else "flush off",
                              f"{r['window_s']:.0f} s", f"{r['longest_gap_ms']:.0f} ms", r["gaps_over_20ms"],
                              r["gaps_over_50ms"], f"{r['p99_ms']:.1f} ms", r["transactions"]))
    return out + [""]


def realclient_markdown(rows: list[dict[str, Any]]) -> list[str]:
    out = ["## A real client through a clone: consistency=online vs stop", "",
           "PostgreSQL: pgbench TPC-B, -c 4 -j 2 --max-tries=10, per-transaction log; Valkey: 4 clients looping "
           "MULTI INCR a INCR b EXEC. Beside the load, a probe writing every 5 ms (reconnecting when refused) and "
           "one opening a new connection every 10 ms. The clone: driver calls as the workflow makes them (stop: "
           "prepare_snapshot, quiesce, snapshot, restart; online: snapshot_online), then provision, "
           "assign_address, set_credentials, restart of the copy. Window = clone start to the copy serving. "
           "\"Longest client gap\": the longest wait one load client had between two acknowledged transactions "
           "(a pgbench client that aborted is counted as waiting until the clone's end: pgbench does not reconnect, "
           "and exits once all its clients have aborted; so in stop mode "
           "its p99 during covers only the time before the shutdown). One run per row. Targets: "
           "0 failed, 0 refused, gap <= 50 ms (PostgreSQL, MariaDB) / 20 ms (Valkey), p99 during <= 3x before. "
           "In brackets: the longest such gap in the 10 s of load before the clone, the machine's own floor.", "",
           common.row("root", "stack", "size", "mode", "method", "clone", "source held", "longest client gap",
                      "probe write gap", "failed tx", "aborted clients", "refused conns", "p99 before -> during",
                      "invariant on copy", "targets"),
           common.row(*["---"] * 15)]
    for r in rows:
        gap_target = 20 if r["stack"] == "valkey" else 50
        ratio_ = r["p99_during_ms"] / r["p99_before_ms"] if r["p99_before_ms"] else float("inf")
        missed = [name for name, ok in (("failed/aborted", r["failed_transactions"] == 0 and r["aborted_clients"] == 0),
                                        ("refused", r["refused_connections"] == 0),
                                        (f"gap <= {gap_target} ms", r["longest_client_gap_ms"] <= gap_target),
                                        ("p99 <= 3x", ratio_ <= 3)) if not ok]
        out.append(common.row(r["root"], r["stack"], f"{r['size_mib']} MiB", r["mode"], r["method"],
                              f"{r['clone_s']:.1f} s", f"{r['source_held_ms']:.0f} ms",
                              f"{r['longest_client_gap_ms']:.0f} ms"
                              + (f" ({r['longest_gap_before_ms']:.0f} before)" if "longest_gap_before_ms" in r else ""),
                              f"{r['probe_write_gap_ms']:.0f} ms", r["failed_transactions"], r["aborted_clients"],
                              f"{r['refused_connections']} / {r['connect_attempts']}",
                              f"{r['p99_before_ms']:.1f} -> {r['p99_during_ms']:.1f} ms ({ratio_:.1f}x)",
                              "holds" if r["invariant_holds"] else "BROKEN",
                              "all met" if not missed else "MISSED: " + ", ".join(missed)))
    return out + [""]


def crosshost_markdown(x: dict[str, Any]) -> list[str]:
    out = ["## Clone onto another host: envclone vs stop + tar | socat + start", "",
           f"A PostgreSQL node on host-1 filled by pgbench -i -s {max(1, round(x['size_mib'] / 15))} (about "
           f"{x['size_mib']} MiB of tables; the volume with its WAL: {x['volume_bytes'] / 2**20:.0f} MiB; an online "
           "snapshot leaves pg_wal out), cloned onto host-2 of a two-host envclone (hosts are network + PID "
           "namespaces; host-1's agent is stopped for the naive run, else it restarts the stopped server). "
           "Total: envclone = the job's created -> "
           "finished (includes starting the copy on host-2); naive = stop -> copied -> source started (the copy "
           "is only unpacked on host-2, not started). Client-seen downtime: the longest gap between two "
           "successful new connections + SELECT 1 of a probe every 10 ms from outside both hosts. One run.", "",
           common.row("method", "total", "total vs naive", "client-seen downtime", "vs naive", "refused conns",
                      "job's own downtime", "bytes moved", "move rate"),
           common.row(*["---"] * 9)]
    for r in x["rows"]:
        job = "" if r["job_downtime_ms"] is None else f"{r['job_downtime_ms']} ms"
        vs = f"{r['downtime_vs_naive']:.3f}x" if r["downtime_vs_naive"] is not None else ""
        if r.get("transfer"):  # envclone: the provision step pulls the snapshot agent to agent
            moved, rate = r["transfer"]["bytes_received"], r["transfer"]["bytes_received"] / r["steps_s"]["provision"]
            how = "provision step"
        else:
            moved, rate, how = r["copied_bytes"], r["copied_bytes"] / r["copy_s"], "tar \\| socat"
        out.append(common.row(r["method"].replace("|", "\\|"), f"{r['total_s']:.1f} s", f"{r['total_vs_naive']:.2f}x",
                              f"{r['probe_gap_ms']:.0f} ms", vs,
                              f"{r['refused_connections']} / {r['connect_attempts']}", job,
                              f"{moved / 2**20:.0f} MiB", f"{rate / 2**20:.0f} MiB/s ({how})"))
    return out + [""]


def transfer_markdown(t: dict[str, Any]) -> list[str]:
    out = ["## Snapshot transfer between hosts (pull over HTTP vs tar | socat)", "",
           f"{t['size_mib']} MiB snapshot in {t['files']} files of mixed sizes, random data, {t['link']}, "
           f"{t['filesystem']}. Ours: `python -m shared.transfer serve` on one side, `pull` on the other "
           "(signed requests, SHA-256 of every file checked as it lands); baseline: `tar -cf - . | socat` into "
           "`socat | tar -xf -`. Wall clock including process start, median of "
           f"{t['repeats']} interleaved runs each; the manifest (hashing the snapshot once) took "
           f"{t['manifest_s']:.1f} s beforehand and is not in the figures.", "",
           common.row("page cache", "ours", "tar \\| socat", "ratio", "target", "runs: ours / tar \\| socat"),
           common.row(*["---"] * 6)]
    for cache in ("cold", "warm"):
        if cache in t:
            c = t[cache]
            out.append(common.row(cache, f"{c['ours_mb_s']:.0f} MB/s", f"{c['tar_socat_mb_s']:.0f} MB/s",
                                  f"{c['ratio']:.2f}", ">= 0.7: " + ("met" if c["ratio"] >= 0.7 else "MISSED"),
                                  f"{', '.join(f'{x:.0f}' for x in c['ours_mb_s_runs'])} / "
                                  f"{', '.join(f'{x:.0f}' for x in c['tar_socat_mb_s_runs'])} MB/s"))
    return out + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1024,4096", help="downtime data sizes in MiB")
    parser.add_argument("--stacks", default="postgres,valkey", help="downtime stacks")
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--orchestration-nodes", default="1,10,50")
    parser.add_argument("--jobs", type=int, default=30, help="jobs per throughput run")
    parser.add_argument("--mask-rows", type=int, default=200_000, help="rows of the masking benchmark")
    parser.add_argument("--realclient-sizes", default="1024,4096", help="realclient PostgreSQL sizes in MiB")
    parser.add_argument("--realclient-roots", default="default,xfs", help="realclient data roots: default,xfs")
    parser.add_argument("--realclient-stacks", default="postgres,valkey,mariadb")
    parser.add_argument("--realclient-valkey-mib", type=int, default=1024)
    parser.add_argument("--realclient-mariadb-mib", type=int, default=256)
    parser.add_argument("--realclient-modes", default="online,online/baseline,stop",
                        help="realclient clone modes: online, stop, online:<pg method>; a /baseline suffix: "
                             "without write-behind and provision by move (ENVCLONE_COPY_WRITE_BEHIND_MIB=0, "
                             "ENVCLONE_PROVISION_MOVE=false)")
    parser.add_argument("--realclient-valkey-modes", default="",
                        help="realclient Valkey modes (online:<valkey method>, stop, suffixes as above); "
                             "default: online:aof_pause where the root can reflink, online:aof, online:bgsave, stop")
    parser.add_argument("--realclient-mariadb-modes", default="",
                        help="realclient MariaDB modes (online:<mariadb method>, stop, suffixes as above); "
                             "default: online:reflink where the root can reflink, online:backup, stop")
    parser.add_argument("--crosshost-mib", type=int, default=1024, help="crosshost PostgreSQL size in MiB")
    parser.add_argument("--transfer-repeats", type=int, default=3, help="runs per side and page-cache state")
    parser.add_argument("--pgonline-mib", type=int, default=1024, help="pgonline PostgreSQL size in MiB")
    parser.add_argument("--pgonline-roots", default="default,xfs", help="pgonline data roots: default,xfs")
    parser.add_argument("--pgonline-rounds", type=int, default=1, help="pgonline: both methods this many times")
    parser.add_argument("--floor-mib", type=int, default=4096, help="floor: data size of each node in MiB")
    parser.add_argument("--floor-stacks", default="mariadb,valkey", help="floor: stacks")
    parser.add_argument("--floor-rounds", type=int, default=2, help="floor: pairs of windows (durable, flush off)")
    parser.add_argument("--data-root", type=Path, default=None, help="default data root (a fresh temp dir)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    root = args.data_root or Path(tempfile.mkdtemp(prefix="envclone-bench-", dir="/tmp"))
    root.chmod(0o755)
    out = common.RESULTS
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "results.json"
    results: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {}
    results["machine"] = common.machine(root)
    if "downtime" in only:
        from bench import downtime

        fresh = downtime.run([int(s) for s in args.sizes.split(",")], args.stacks.split(","), root / "var")
        key = lambda r: (r["root"], r["stack"], r["size_mib"])  # noqa: E731
        kept = [r for r in results.get("downtime", []) if key(r) not in {key(f) for f in fresh}]
        results["downtime"] = sorted(kept + fresh, key=lambda r: (r["root"], r["stack"], r["size_mib"]))
        plot(results["downtime"], out / "downtime.png")
    if "orchestration" in only:
        from bench import orchestration

        results["orchestration"] = orchestration.run([int(n) for n in args.orchestration_nodes.split(",")])
    if "throughput" in only:
        from bench import throughput

        results["throughput"] = throughput.run(args.jobs)
    if "copy" in only:
        from bench import copy_throughput

        results["copy"] = copy_throughput.run(root / "copy")
    if "streams" in only:
        from bench import streams

        results["streams"] = streams.run()
    if "masking" in only:
        from bench import masking

        results["masking"] = masking.run(args.mask_rows, root=root / "masking")
    if "enqueue" in only:
        from bench import throughput

        results["enqueue"] = throughput.enqueue_only()
    if "realclient" in only:
        from bench import realclient

        fresh = realclient.run([int(s) for s in args.realclient_sizes.split(",")], args.realclient_roots.split(","),
                               root / "rc", args.realclient_valkey_mib, args.realclient_stacks.split(","),
                               args.realclient_mariadb_mib, args.realclient_modes.split(","),
                               [m for m in args.realclient_valkey_modes.split(",") if m],
                               [m for m in args.realclient_mariadb_modes.split(",") if m])
        key = lambda r: (r["root"], r["stack"], r["size_mib"], r["mode"])  # noqa: E731
        kept = [r for r in results.get("realclient", []) if key(r) not in {key(f) for f in fresh}]
        results["realclient"] = sorted(kept + fresh, key=key)
    if "crosshost" in only:
        from bench import crosshost

        results["crosshost"] = crosshost.run(args.crosshost_mib)
    if "transfer" in only:
        from bench import transfer

        results["transfer"] = transfer.run(root / "transfer", args.transfer_repeats)
    if "pgonline" in only:
        from bench import pg_online

        fresh = pg_online.run(args.pgonline_mib, args.pgonline_roots.split(","), root / "pgo", args.pgonline_rounds)
        key = lambda r: (r["root"], r["size_mib"], r["pg_online_method"], r.get("round", 1))  # noqa: E731
        kept = [r for r in results.get("pgonline", []) if key(r) not in {key(f) for f in fresh}]
        results["pgonline"] = sorted(kept + fresh, key=key)
    if "floor" in only:
        from bench import floor

        fresh = floor.run(args.floor_stacks.split(","), args.floor_mib, rounds=args.floor_rounds,
                          data_root=root / "floor")
        key = lambda r: (r["stack"], r["size_mib"], r["round"], r["durable"])  # noqa: E731
        kept = [r for r in results.get("floor", []) if key(r) not in {key(f) for f in fresh}]
        results["floor"] = kept + fresh
    common.save("results", results)
    (out / "results.md").write_text(markdown(results))
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}" + (", downtime.png" if "downtime" in only else ""))
    if args.data_root is None:
        shutil.rmtree(root, ignore_errors=True)  # the runs removed their nodes; the empty skeleton too


if __name__ == "__main__":
    main()
