"""The local driver: a node is a real server process on this machine, bound to its own loopback
address, with its volume in a directory under the data root named after the node's id.

Layout under the data root:
    nodes/<node_id>/{node.json, data/, config/, run/}     run/ (pid, log) is never snapshotted
    snapshots/<snapshot_id>/{meta.json, volume/}          complete once renamed into place
Work in progress lives in dot-prefixed staging dirs and is renamed into place when done, so a
step that dies half-way leaves nothing that looks finished and a re-run starts clean."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from shared import snapshots
from shared.drivers import process
from shared.drivers.base import (
    Driver,
    Health,
    NodeSpec,
    PermanentDriverError,
    ProgressFn,
    Rewrite,
    SnapshotInfo,
    TransientDriverError,
)
from shared.rewire import rewrite_text
from shared.stacks import NodeContext, Stack, get_stack

_ID = re.compile(r"^[a-z0-9]{1,64}$")
_REFLINK_BY_ROOT: dict[Path, bool] = {}


def _ignore_run(rel: str) -> bool:
    return rel == "run" or rel.startswith("run" + os.sep)


def _check_id(kind: str, value: str) -> str:
    if not _ID.match(value):
        raise PermanentDriverError(f"invalid {kind} id {value!r}")
    return value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    if path.exists():
        st = path.stat()
        os.chmod(tmp, st.st_mode & 0o7777)
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
    tmp.replace(path)


class LocalDriver(Driver):
    def __init__(self, data_dir: Path | str, node_user: str = "nobody", max_pause_s: float = 120.0) -> None:
        """``max_pause_s``: how long a server that quiesces online holds writes at most, on its own
        clock -- the bound holds even if every worker dies mid-window."""
        self.max_pause_s = max_pause_s
        self.root = Path(data_dir).resolve()
        self.nodes_dir = self.root / "nodes"
        self.snaps_dir = self.root / "snapshots"
        self.run_as = process.RunAs.for_user(node_user)
        self._reflink: bool | None = None

    # ---- helpers -------------------------------------------------------------------------------
    def _ensure_root(self) -> None:
        for d in (self.nodes_dir, self.snaps_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            for d in (self.root, self.nodes_dir, *self.root.parents):
                if not os.stat(d).st_mode & 0o001:
                    raise PermanentDriverError(
                        f"{d} is not searchable by others: node processes run as an unprivileged "
                        f"user and must reach their volumes under {self.root}")

    @property
    def reflink(self) -> bool:
        if self._reflink is None:
            # A data root's filesystem does not change under a running process: probe it once.
            if self.snaps_dir not in _REFLINK_BY_ROOT:
                self._ensure_root()
                _REFLINK_BY_ROOT[self.snaps_dir] = snapshots.supports_reflink(self.snaps_dir)
            self._reflink = _REFLINK_BY_ROOT[self.snaps_dir]
        return self._reflink

    def volume(self, node_id: str) -> Path:
        return self.nodes_dir / _check_id("node", node_id)

    def _snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snaps_dir / _check_id("snapshot", snapshot_id)

    def _meta(self, node_id: str) -> dict[str, object]:
        try:
            return json.loads((self.volume(node_id) / "node.json").read_text())
        except FileNotFoundError:
            raise PermanentDriverError(f"node {node_id} does not exist") from None

    def _node(self, node_id: str) -> tuple[Stack, NodeContext]:
        meta = self._meta(node_id)
        stack = get_stack(str(meta["stack"]))
        ctx = NodeContext(self.volume(node_id), str(meta["address"]), int(meta["port"]), self.run_as)  # type: ignore[call-overload]
        return stack, ctx

    def _pid_path(self, node_id: str) -> Path:
        return self.volume(node_id) / "run" / "node.pid"

    def _log_tail(self, node_id: str, limit: int = 600) -> str:
        try:
            return (self.volume(node_id) / "run" / "node.log").read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def _chown(self, path: Path) -> None:
        if self.run_as is not None:
            self.run_as.chown_tree(path)

    @contextmanager
    def _exclusive(self, node_id: str) -> Iterator[Path]:
        """Creating and destroying one node exclude each other, across processes: a destroy while a
        creation is half-way would remove files under it, and could miss the process it then starts.
        Yields the lock file; a destroy unlinks it, so a waiter re-checks that it locked the file
        still at that path."""
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        path = locks / f"{_check_id('node', node_id)}.lock"
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield path
        finally:
            os.close(fd)

    # ---- lifecycle -----------------------------------------------------------------------------
    def create_node(self, spec: NodeSpec) -> None:
        """Make the volume, initialise the stack, start it and run its first-start setup."""
        with self._exclusive(spec.node_id):
            self._create_node(spec)

    def _create_node(self, spec: NodeSpec) -> None:
        self._ensure_root()
        stack = get_stack(spec.stack)
        final = self.volume(spec.node_id)
        if not final.exists():
            staging = self.nodes_dir / f".{spec.node_id}.creating"
            shutil.rmtree(staging, ignore_errors=True)
            for sub in ("data", "config", "run"):
                (staging / sub).mkdir(parents=True)
            self._chown(staging)
            meta = {"stack": spec.stack, "address": spec.address, "port": spec.port}
            (staging / "node.json").write_text(json.dumps(meta))
            try:
                stack.init(NodeContext(staging, spec.address, spec.port, self.run_as), spec.config)
            except (OSError, RuntimeError) as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise PermanentDriverError(f"initialising {spec.stack} failed: {exc}") from exc
            self._chown(staging)
            staging.rename(final)
        self.start(spec.node_id)
        self.wait_healthy(spec.node_id, 60.0)
        _, ctx = self._node(spec.node_id)
        try:
            stack.first_start(ctx)
        except Exception as exc:  # the stack's client library decides what it raises
            raise TransientDriverError(f"first-start setup of {spec.stack} failed: {exc}") from exc

    def start(self, node_id: str) -> None:
        stack, ctx = self._node(node_id)
        pid_path = self._pid_path(node_id)
        if process.running_pid(pid_path) is not None:
            return
        argv, extra_env = stack.command(ctx)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(ctx.volume),
               "LANG": "C.UTF-8", **extra_env}
        (ctx.volume / "run").mkdir(exist_ok=True)
        self._chown(ctx.volume / "run")
        run_as = self.run_as
        if run_as is not None and not run_as.can_execute(argv[0]) and not stack.refuses_root:
            # e.g. the webapp's interpreter lives in a venv under /root: run it as ourselves rather
            # than not at all. PostgreSQL never gets here (it refuses root and its binaries are public).
            run_as = None
        process.spawn(argv, cwd=ctx.volume, log_path=ctx.volume / "run" / "node.log",
                      pid_path=pid_path, env=env, run_as=run_as)

    def stop(self, node_id: str) -> None:
        if not self.volume(node_id).exists():
            return
        stack, _ = self._node(node_id)
        process.terminate(self._pid_path(node_id), stack.stop_signal, timeout=60.0)

    def health(self, node_id: str) -> Health:
        if not self.volume(node_id).exists():
            return Health(False, False, "no such node")
        stack, ctx = self._node(node_id)
        if process.running_pid(self._pid_path(node_id)) is None:
            return Health(False, False, "not running")
        try:
            return Health(True, True, stack.check(ctx))
        except Exception as exc:  # any client error means "not healthy yet"
            return Health(True, False, f"{type(exc).__name__}: {exc}")

    def wait_healthy(self, node_id: str, timeout: float) -> None:
        """Poll until healthy (the server gives no readiness notification); a process that exited
        fails at once rather than at the deadline."""

        def exited(health: Health) -> bool:
            if not health.running:
                raise TransientDriverError(f"node {node_id} exited during start: {self._log_tail(node_id)!r}")
            return not health.healthy

        try:
            Retrying(retry=retry_if_result(exited), stop=stop_after_delay(timeout), wait=wait_fixed(0.02),
                     reraise=True)(self.health, node_id)
        except RetryError as exc:
            health = exc.last_attempt.result()
            raise TransientDriverError(f"node {node_id} not healthy after {timeout:.0f}s: {health.detail}") from None

    def restart(self, node_id: str, timeout: float) -> None:
        stack, ctx = self._node(node_id)
        if stack.online_quiesce and process.running_pid(self._pid_path(node_id)) is not None:
            try:
                stack.resume_writes(ctx)
            except Exception as exc:
                raise TransientDriverError(f"resuming writes on {stack.name} failed: {exc}") from exc
        self.start(node_id)
        self.wait_healthy(node_id, timeout)

    # ---- snapshots -----------------------------------------------------------------------------
    def prepare_snapshot(self, node_id: str, snapshot_id: str) -> int:
        stack, ctx = self._node(node_id)
        final = self._snapshot_dir(snapshot_id)
        staging = self.snaps_dir / f".{snapshot_id}.staging"
        if final.exists():
            return 0
        if process.running_pid(self._pid_path(node_id)) is not None:
            try:
                stack.settle(ctx)
            except Exception as exc:
                raise TransientDriverError(f"{stack.name} did not settle before the snapshot: {exc}") from exc
        if self.reflink or not stack.precopy:
            return 0
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return snapshots.precopy_tree(self.volume(node_id), staging / "volume", ignore=_ignore_run)

    def quiesce(self, node_id: str) -> None:
        stack, ctx = self._node(node_id)
        pid_path = self._pid_path(node_id)
        if process.running_pid(pid_path) is None:
            return  # already down: a re-run of quiesce after it succeeded
        if stack.online_quiesce:
            try:
                stack.pause_writes(ctx, self.max_pause_s)
            except Exception as exc:
                raise TransientDriverError(f"pausing writes on {stack.name} failed: {exc}") from exc
            return
        try:
            asked = stack.quiesce(ctx)
        except Exception as exc:
            raise TransientDriverError(f"quiesce of {stack.name} failed: {exc}") from exc
        if not asked:
            pid = process.running_pid(pid_path)
            if pid is not None:
                os.kill(pid, stack.stop_signal)
        if not process.wait_exit(pid_path, 60.0):
            raise TransientDriverError(f"{stack.name} did not stop within 60s after quiesce")
        pid_path.unlink(missing_ok=True)

    def quiesced(self, node_id: str) -> bool:
        stack, ctx = self._node(node_id)
        if process.running_pid(self._pid_path(node_id)) is None:
            return True
        return stack.online_quiesce and stack.writes_paused(ctx)

    def snapshot(self, node_id: str, snapshot_id: str) -> SnapshotInfo:
        final = self._snapshot_dir(snapshot_id)
        if (final / "meta.json").exists():
            return SnapshotInfo(**json.loads((final / "meta.json").read_text()))
        stack, ctx = self._node(node_id)
        volume = self.volume(node_id)
        if not self.quiesced(node_id):
            raise PermanentDriverError(f"node {node_id} is running: a snapshot needs a quiesced node")
        online = process.running_pid(self._pid_path(node_id)) is not None
        before = snapshots.fingerprint(volume, _ignore_run) if online else None
        started = time.monotonic()
        staging = self.snaps_dir / f".{snapshot_id}.staging"
        if self.reflink:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            snapshots.copy_tree(volume, staging / "volume", reflink=True, ignore=_ignore_run)
            method = "reflink"
        elif (staging / "volume").exists():
            snapshots.sync_tree(volume, staging / "volume", ignore=_ignore_run)
            method = "delta"
        else:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            snapshots.copy_tree(volume, staging / "volume", reflink=False, ignore=_ignore_run)
            method = "copy"
        if online:
            # Writes held all along and no file changed: the copy is one consistent moment.
            if not stack.writes_paused(ctx) or snapshots.fingerprint(volume, _ignore_run) != before:
                shutil.rmtree(staging, ignore_errors=True)
                raise PermanentDriverError(f"node {node_id} took writes while its snapshot was taken "
                                           f"(pause ended after {self.max_pause_s:.0f}s?)")
        elif process.running_pid(self._pid_path(node_id)) is not None:
            shutil.rmtree(staging, ignore_errors=True)
            raise PermanentDriverError(f"node {node_id} was started while its snapshot was taken")
        window_ms = int((time.monotonic() - started) * 1000)
        info = SnapshotInfo(snapshot_id, method, snapshots.tree_size(staging / "volume"), window_ms)
        (staging / "meta.json").write_text(json.dumps(info.__dict__))
        staging.rename(final)
        return info

    def snapshot_info(self, snapshot_id: str) -> SnapshotInfo | None:
        meta = self._snapshot_dir(snapshot_id) / "meta.json"
        return SnapshotInfo(**json.loads(meta.read_text())) if meta.exists() else None

    def provision(self, snapshot_id: str, node_id: str, progress: ProgressFn | None = None) -> int:
        info = self.snapshot_info(snapshot_id)
        if info is None:
            raise PermanentDriverError(f"snapshot {snapshot_id} does not exist")
        final = self.volume(node_id)
        if (final / "node.json").exists():
            if progress:
                progress(info.size_bytes, info.size_bytes)
            return info.size_bytes
        self._ensure_root()
        staging = self.nodes_dir / f".{node_id}.provisioning"
        shutil.rmtree(staging, ignore_errors=True)
        done = 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, info.size_bytes)

        try:
            copied = snapshots.copy_tree(self._snapshot_dir(snapshot_id) / "volume", staging,
                                         reflink=self.reflink, progress=step)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise PermanentDriverError(f"provisioning from snapshot failed: {exc}") from exc
        (staging / "run").mkdir(exist_ok=True)
        self._chown(staging)
        staging.rename(final)
        return copied

    def assign_address(self, node_id: str, address: str, port: int) -> None:
        meta = self._meta(node_id)
        if meta["address"] == address and meta["port"] == port:
            return
        self.stop(node_id)  # a running process is bound to the old address
        meta.update(address=address, port=port)
        _atomic_write(self.volume(node_id) / "node.json", json.dumps(meta))

    def rewrite_config(self, node_id: str, address_map: dict[str, str]) -> list[Rewrite]:
        stack, ctx = self._node(node_id)
        rewrites: list[Rewrite] = []
        for rel in stack.config_files:
            path = ctx.volume / rel
            if not path.exists():
                continue
            text = path.read_text()
            new_text, counts = rewrite_text(text, address_map)
            if counts:
                _atomic_write(path, new_text)
                rewrites += [Rewrite(rel, old, address_map[old], n) for old, n in sorted(counts.items())]
        return rewrites

    # ---- teardown ------------------------------------------------------------------------------
    def destroy_node(self, node_id: str) -> None:
        volume = self.volume(node_id)
        with self._exclusive(node_id) as lock:
            if (volume / "node.json").exists():
                self.stop(node_id)
            for path in (volume, self.nodes_dir / f".{node_id}.creating",
                         self.nodes_dir / f".{node_id}.provisioning"):
                shutil.rmtree(path, ignore_errors=True)
            lock.unlink(missing_ok=True)

    def delete_snapshot(self, snapshot_id: str) -> None:
        shutil.rmtree(self._snapshot_dir(snapshot_id), ignore_errors=True)
        shutil.rmtree(self.snaps_dir / f".{snapshot_id}.staging", ignore_errors=True)

    def node_ids(self) -> set[str]:
        if not self.nodes_dir.exists():
            return set()
        return {p.name for p in self.nodes_dir.iterdir() if not p.name.startswith(".")}

    def snapshot_ids(self) -> set[str]:
        if not self.snaps_dir.exists():
            return set()
        return {p.name for p in self.snaps_dir.iterdir() if not p.name.startswith(".")}

    def running_node_ids(self) -> set[str]:
        return {n for n in self.node_ids() if process.running_pid(self._pid_path(n)) is not None}

    def volume_size(self, node_id: str) -> int:
        volume = self.volume(node_id)
        return snapshots.tree_size(volume, _ignore_run) if volume.exists() else 0

    def url(self, node_id: str) -> str:
        stack, ctx = self._node(node_id)
        return stack.url(ctx)
