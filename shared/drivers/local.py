"""The local driver: a node is a real server process on this machine, bound to its own loopback
address, with its volume in a directory under the data root named after the node's id.

Layout under the data root:
    nodes/<node_id>/{node.json, data/, config/, run/}     the node's account's; run/ is never snapshotted
    ctl/<node_id>/{node.json, node.pid, node.log, start.lock}   root's alone: what the driver trusts
    snapshots/<snapshot_id>/{meta.json, volume/}          complete once renamed into place
A volume belongs to its node's account, which can replace any file in it (a server's superuser
runs commands as that account). So what the driver acts on as root -- the node's stack, address
and account, the pid it signals, the log its output goes to -- lives in ctl/, never in the volume;
the volume's node.json is only what a snapshot carries (its stack).
Work in progress lives in dot-prefixed staging dirs and is renamed into place when done, so a
step that dies half-way leaves nothing that looks finished and a re-run starts clean."""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from shared import safefiles, snapshots
from shared.drivers import process
from shared.drivers.base import (
    ActionFailed,
    Driver,
    Health,
    NodeSpec,
    PermanentDriverError,
    ProgressFn,
    Rewrite,
    SnapshotInfo,
    TransientDriverError,
)
from shared.leaks import DEFAULT_LIMITS, Needles, ScanLimits, ScanResult, scan_tree
from shared.rewire import replace_secrets, rewrite_text
from shared.stacks import NodeContext, Stack, get_stack

_ID = re.compile(r"^[a-z0-9]{1,64}$")


def _held_copy_ignore(stack: Stack) -> snapshots.Ignore:
    """What a held (stop-mode) copy leaves out: run/, and files the server writes on the side that
    its held state does not depend on (an online copy's RDB beside Valkey's append-only files)."""
    return lambda rel: _ignore_run(rel) or any(fnmatch.fnmatch(rel, g) for g in stack.side_files)


def _ignore_run(rel: str) -> bool:
    return rel == "run" or rel.startswith("run" + os.sep)


def _check_id(kind: str, value: str) -> str:
    if not _ID.match(value):
        raise PermanentDriverError(f"invalid {kind} id {value!r}")
    return value


def _atomic_write(path: Path, text: str) -> None:
    """A file of a volume rewritten in place, keeping its mode and owner, never through a link."""
    try:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else 0o600
    except FileNotFoundError:
        mode = 0o600
    safefiles.replace_file(path, text.encode(), mode)


def _check_volume(node_id: str, volume: Path) -> None:
    """The volume's own directories must be directories: every path root acts on goes through one,
    and the volume's account could have swapped one for a link to anywhere (or a snapshot carried
    such a link into a clone)."""
    for sub in ("data", "config", "run"):
        try:
            st = os.lstat(volume / sub)
        except FileNotFoundError:
            continue  # made when needed (run/), or a stack without it
        if not stat.S_ISDIR(st.st_mode):
            raise PermanentDriverError(f"node {node_id}: {sub}/ in its volume is not a directory (a link?): "
                                       "refusing to act through it")


class LocalDriver(Driver):
    def __init__(self, data_dir: Path | str, node_user: str = "nobody", max_pause_s: float = 120.0) -> None:
        """``node_user``: the account of a node made without an owner (an environment's nodes run as
        the environment's own account). ``max_pause_s``: how long a server that quiesces online
        holds writes at most, on its own clock -- the bound holds even if every worker dies mid-window."""
        self.max_pause_s = max_pause_s
        self.root = Path(data_dir).resolve()
        self.nodes_dir = self.root / "nodes"
        self.snaps_dir = self.root / "snapshots"
        self.ctl_dir = self.root / "ctl"
        self.node_user = node_user
        self._reflink: bool | None = None

    # ---- helpers -------------------------------------------------------------------------------
    def _ensure_root(self) -> None:
        # Node accounts may pass through the root and nodes/ to their own volume, and list nothing.
        for d, mode in ((self.nodes_dir, 0o711), (self.snaps_dir, 0o700), (self.ctl_dir, 0o700)):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(mode)
        if self.root.stat().st_uid == os.geteuid():
            self.root.chmod(self.root.stat().st_mode | 0o111)
        if os.geteuid() == 0:
            for d in (self.root, self.nodes_dir, *self.root.parents):
                if not os.stat(d).st_mode & 0o001:
                    raise PermanentDriverError(
                        f"{d} is not searchable by others: node processes run as an unprivileged "
                        f"user and must reach their volumes under {self.root}")

    @property
    def reflink(self) -> bool:
        if self._reflink is None:
            self._ensure_root()
            self._reflink = snapshots.reflink_at(self.snaps_dir)
        return self._reflink

    def volume(self, node_id: str) -> Path:
        return self.nodes_dir / _check_id("node", node_id)

    def _snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snaps_dir / _check_id("snapshot", snapshot_id)

    def _ctl(self, node_id: str) -> Path:
        return self.ctl_dir / _check_id("node", node_id)

    def _meta(self, node_id: str) -> dict[str, object]:
        path = self._ctl(node_id) / "node.json"
        if not path.exists():
            self._adopt(node_id)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise PermanentDriverError(f"node {node_id} does not exist") from None

    def _write_meta(self, node_id: str, meta: dict[str, object], volume: Path | None = None) -> None:
        """The trusted record (ctl/) and the copy a snapshot of the volume carries; ``volume``: the
        staging directory that is about to become the node's volume."""
        ctl = self._ctl(node_id)
        ctl.mkdir(mode=0o700, parents=True, exist_ok=True)
        safefiles.replace_file(ctl / "node.json", json.dumps(meta).encode(), keep_owner=False)
        _atomic_write((volume or self.volume(node_id)) / "node.json", json.dumps(meta))

    def _adopt(self, node_id: str) -> None:
        """A node made before ctl/ existed (its record and pid file in its volume) is taken over
        once, checked against what its account cannot fake: the volume's owner must be the account
        the record names, and the pid it records a process of that account inside the volume."""
        volume = self.volume(node_id)
        try:
            carried = json.loads(safefiles.read_text(volume / "node.json"))
            meta = {"stack": get_stack(str(carried["stack"])).name, "address": str(carried["address"]),
                    "port": int(carried["port"]), "owner": carried.get("owner")}
            owner_uid = os.lstat(volume).st_uid
        except (OSError, ValueError, KeyError, TypeError):
            return
        run_as = self._run_as(meta["owner"])
        if run_as is not None and run_as.uid != owner_uid:
            raise PermanentDriverError(f"node {node_id}: its volume's record names another account")
        try:
            pid_text, _, start = safefiles.read_text(volume / "run" / "node.pid").strip().partition(" ")
            pid: int | None = int(pid_text)
        except (OSError, ValueError):
            pid = None
        ctl = self._ctl(node_id)
        ctl.mkdir(mode=0o700, parents=True, exist_ok=True)
        if (pid is not None and process.start_time(pid) == start
                and process.belongs_to(pid, owner_uid if run_as else os.geteuid(), volume)):
            process.record_pid(ctl / "node.pid", pid)
        safefiles.replace_file(ctl / "node.json", json.dumps(meta).encode(), keep_owner=False)

    def _run_as(self, owner: object) -> process.RunAs | None:
        try:
            return process.RunAs.for_user(str(owner or self.node_user))
        except LookupError as exc:
            raise PermanentDriverError(str(exc)) from None

    def _node(self, node_id: str) -> tuple[Stack, NodeContext]:
        meta = self._meta(node_id)
        stack = get_stack(str(meta["stack"]))
        ctx = NodeContext(self.volume(node_id), str(meta["address"]), int(meta["port"]),  # type: ignore[call-overload]
                          self._run_as(meta.get("owner")))
        _check_volume(node_id, ctx.volume)
        return stack, ctx

    def pid_path(self, node_id: str) -> Path:
        """Where the pid of the node's server is recorded (root's alone)."""
        if not (self._ctl(node_id) / "node.json").exists():
            self._adopt(node_id)
        return self._ctl(node_id) / "node.pid"

    def log_path(self, node_id: str) -> Path:
        """Where the node's server writes its output (root opens it; the server inherits it)."""
        return self._ctl(node_id) / "node.log"

    def _log_tail(self, node_id: str, limit: int = 600) -> str:
        try:
            return self.log_path(node_id).read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    @staticmethod
    def _own(path: Path, run_as: process.RunAs | None) -> None:
        """The volume is its account's alone: owned by it, 0700."""
        if run_as is not None:
            run_as.chown_tree(path)
        path.chmod(0o700)

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
            run_as = self._run_as(spec.owner)
            for sub in ("data", "config", "run"):
                (staging / sub).mkdir(parents=True)
            meta = {"stack": spec.stack, "address": spec.address, "port": spec.port, "owner": spec.owner}
            # The record before the volume is in place: a node is never found without one.
            self._write_meta(spec.node_id, meta, staging)
            self._own(staging, run_as)
            try:
                stack.init(NodeContext(staging, spec.address, spec.port, run_as), spec.config, spec.credentials)
            except (OSError, RuntimeError) as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise PermanentDriverError(f"initialising {spec.stack} failed: {exc}") from exc
            self._own(staging, run_as)
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
        pid_path, run = self.pid_path(node_id), ctx.volume / "run"
        run.mkdir(exist_ok=True)
        if ctx.run_as is not None:
            ctx.run_as.chown_tree(run)
        # Checked and started under a lock, across processes: a step and the watchdog may start one
        # node at once, and two spawns orphaned one server (the other's pid file won) holding the address.
        fd = os.open(self._ctl(node_id) / "start.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if process.running_pid(pid_path) is not None:
                return
            try:
                argv, extra_env = stack.command(ctx)
            except RuntimeError as exc:
                raise PermanentDriverError(f"{stack.name} cannot start: {exc}") from exc
            process.spawn(argv, cwd=ctx.volume, log_path=self.log_path(node_id), pid_path=pid_path,
                          env=self._env(ctx, extra_env), run_as=ctx.run_as)
        finally:
            os.close(fd)

    def stop(self, node_id: str) -> None:
        if not (self.volume(node_id).exists() or (self._ctl(node_id) / "node.json").exists()):
            return
        # Only the stack is needed: a node whose account is already gone can still be stopped.
        stack = get_stack(str(self._meta(node_id)["stack"]))
        process.terminate(self.pid_path(node_id), stack.stop_signal, timeout=60.0)

    def health(self, node_id: str) -> Health:
        if not self.volume(node_id).exists():
            return Health(False, False, "no such node")
        stack, ctx = self._node(node_id)
        if process.running_pid(self.pid_path(node_id)) is None:
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
        if stack.online_quiesce and process.running_pid(self.pid_path(node_id)) is not None:
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
        if process.running_pid(self.pid_path(node_id)) is not None:
            try:
                stack.settle(ctx)
            except Exception as exc:
                raise TransientDriverError(f"{stack.name} did not settle before the snapshot: {exc}") from exc
        if self.reflink or not stack.precopy:
            return 0
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return snapshots.precopy_tree(self.volume(node_id), staging / "volume", ignore=_held_copy_ignore(stack))

    def quiesce(self, node_id: str) -> None:
        stack, ctx = self._node(node_id)
        pid_path = self.pid_path(node_id)
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
        if process.running_pid(self.pid_path(node_id)) is None:
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
        online = process.running_pid(self.pid_path(node_id)) is not None
        ignore = _held_copy_ignore(stack)
        before = snapshots.fingerprint(volume, ignore) if online else None
        started = time.monotonic()
        staging = self.snaps_dir / f".{snapshot_id}.staging"
        if self.reflink:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            snapshots.copy_tree(volume, staging / "volume", reflink=True, ignore=ignore)
            method = "reflink"
        elif (staging / "volume").exists():
            snapshots.sync_tree(volume, staging / "volume", ignore=ignore)
            method = "delta"
        else:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            snapshots.copy_tree(volume, staging / "volume", reflink=False, ignore=ignore)
            method = "copy"
        if online:
            # Writes held all along and no file changed: the copy is one consistent moment.
            if not stack.writes_paused(ctx) or snapshots.fingerprint(volume, ignore) != before:
                shutil.rmtree(staging, ignore_errors=True)
                raise PermanentDriverError(f"node {node_id} took writes while its snapshot was taken "
                                           f"(pause ended after {self.max_pause_s:.0f}s?)")
        elif process.running_pid(self.pid_path(node_id)) is not None:
            shutil.rmtree(staging, ignore_errors=True)
            raise PermanentDriverError(f"node {node_id} was started while its snapshot was taken")
        window_ms = int((time.monotonic() - started) * 1000)
        info = SnapshotInfo(snapshot_id, method, snapshots.tree_size(staging / "volume"), window_ms)
        (staging / "meta.json").write_text(json.dumps(info.__dict__))
        staging.rename(final)
        return info

    def snapshot_online(self, node_id: str, snapshot_id: str) -> SnapshotInfo:
        """A consistent copy taken while the node serves and refuses nothing (its stack's backup
        method); the window is how long the stack held writes (0 for most, a few ms for a pause)."""
        final = self._snapshot_dir(snapshot_id)
        if (final / "meta.json").exists():
            return SnapshotInfo(**json.loads((final / "meta.json").read_text()))
        stack, ctx = self._node(node_id)
        if not stack.online_copy_supported:
            raise PermanentDriverError(f"{stack.name} cannot be copied online")
        self._ensure_root()
        staging = self.snaps_dir / f".{snapshot_id}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)

        def copy(src: Path, dst: Path, ignore: snapshots.Ignore) -> int:
            return snapshots.copy_tree(src, dst, reflink=self.reflink, ignore=ignore, live=True)

        try:
            done = stack.online_copy(ctx, staging / "volume", copy)
            if not self.reflink:
                # What the copy left dirty (a stack's own tool writes unsynced) goes to disk a window at
                # a time now, not in one burst when the clone's first start syncs its data directory.
                snapshots.flush_tree(staging / "volume")
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise TransientDriverError(f"online copy of {stack.name} failed: {exc}") from exc
        # A stack that makes its own copy names it (PostgreSQL's pg_basebackup: "stream"); at
        # most 16 characters, as the snapshot's method column.
        method = f"online-{done.method}" if done.method else "online-reflink" if self.reflink else "online-copy"
        info = SnapshotInfo(snapshot_id, method, snapshots.tree_size(staging / "volume"), done.held_ms)
        (staging / "meta.json").write_text(json.dumps(info.__dict__))
        staging.rename(final)
        return info

    def snapshot_info(self, snapshot_id: str) -> SnapshotInfo | None:
        meta = self._snapshot_dir(snapshot_id) / "meta.json"
        return SnapshotInfo(**json.loads(meta.read_text())) if meta.exists() else None

    def provision(self, snapshot_id: str, node_id: str, progress: ProgressFn | None = None,
                  owner: str | None = None, consume: bool = False) -> int:
        info = self.snapshot_info(snapshot_id)
        final = self.volume(node_id)
        if final.exists():
            # Made by an earlier run; a consumed snapshot is gone with it (it became this volume).
            size = info.size_bytes if info is not None else snapshots.tree_size(final, _ignore_run)
            if progress:
                progress(size, size)
            return size
        if info is None:
            raise PermanentDriverError(f"snapshot {snapshot_id} does not exist")
        self._ensure_root()
        staging = self.nodes_dir / f".{node_id}.provisioning"
        done = 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, info.size_bytes)

        source = self._snapshot_dir(snapshot_id) / "volume"
        if consume and (source.exists() or staging.exists()):
            # A snapshot that exists for this node alone (received from another host, or one of this
            # host's that nothing retains): moved, not copied. A re-run finds it in staging.
            if source.exists():
                shutil.rmtree(staging, ignore_errors=True)
                source.rename(staging)
            copied = info.size_bytes
            step(copied)
        else:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                copied = snapshots.copy_tree(source, staging, reflink=self.reflink, progress=step)
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise PermanentDriverError(f"provisioning from snapshot failed: {exc}") from exc
        (staging / "run").mkdir(exist_ok=True)
        carried = json.loads(safefiles.read_text(staging / "node.json"))  # the source's account could write it
        meta = {"stack": get_stack(str(carried["stack"])).name, "address": carried["address"],
                "port": int(carried["port"]), "owner": owner}
        self._write_meta(node_id, meta, staging)  # the record before the volume is in place
        self._own(staging, self._run_as(owner))  # the clone's account, not its source's
        staging.rename(final)
        if consume:
            self.delete_snapshot(snapshot_id)
        return copied

    def assign_address(self, node_id: str, address: str, port: int) -> None:
        meta = self._meta(node_id)
        if meta["address"] == address and meta["port"] == port:
            return
        self.stop(node_id)  # a running process is bound to the old address
        meta.update(address=address, port=port)
        self._write_meta(node_id, meta)

    def set_credentials(self, node_id: str, credentials: dict[str, str]) -> None:
        stack, ctx = self._node(node_id)
        if ctx.secrets() == credentials:
            return  # set already (a step run twice)
        if process.running_pid(self.pid_path(node_id)) is not None:
            raise PermanentDriverError(f"node {node_id} is running: credentials change only while it is stopped")
        try:
            stack.apply_credentials(ctx, credentials)
        except (OSError, RuntimeError) as exc:
            raise PermanentDriverError(f"new credentials for {stack.name} failed: {exc}") from exc
        if ctx.run_as is not None:
            ctx.run_as.chown_tree(ctx.config_dir)

    def rewrite_config(self, node_id: str, address_map: dict[str, str],
                       secret_map: dict[str, str] | None = None) -> list[Rewrite]:
        stack, ctx = self._node(node_id)
        rewrites: list[Rewrite] = []
        for rel in stack.config_files:
            path = ctx.volume / rel
            if not path.exists():
                continue
            text = safefiles.read_text(path)
            # Secrets first: a whole connection URL (credentials, address and renamed user at once),
            # then any secret left on its own; addresses last.
            text, secret_counts = replace_secrets(text, secret_map or {})
            new_text, counts = rewrite_text(text, address_map)
            if counts or secret_counts:
                _atomic_write(path, new_text)
                rewrites += [Rewrite(rel, old, (secret_map or {})[old], n, secret=True)
                             for old, n in secret_counts.items()]
                rewrites += [Rewrite(rel, old, address_map[old], n) for old, n in sorted(counts.items())]
        return rewrites

    # ---- safety: on_clone actions and the leak scan ------------------------------------------------
    def _env(self, ctx: NodeContext, extra: dict[str, str]) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(ctx.volume), "LANG": "C.UTF-8", **extra}

    @contextmanager
    def _private_server(self, node_id: str) -> Iterator[Path]:
        """Start the node's server where only root and the node's account can reach it -- no TCP
        listener, a Unix socket in a fresh 0700 directory -- and stop it cleanly afterwards."""
        stack, ctx = self._node(node_id)
        self.stop(node_id)  # a step run again after the first start works on a stopped node as well
        # Under /tmp: a socket path must fit in 107 bytes, a data root's need not.
        sockdir = Path(tempfile.mkdtemp(prefix="envclone-sock-", dir="/tmp"))
        pid_path = self._ctl(node_id) / "private.pid"
        try:
            argv, extra = stack.private_command(ctx, sockdir)
            if ctx.run_as is not None:
                ctx.run_as.chown_tree(sockdir)
            sockdir.chmod(0o700)
            process.spawn(argv, cwd=ctx.volume, log_path=self.log_path(node_id), pid_path=pid_path,
                          env=self._env(ctx, extra), run_as=ctx.run_as)

            def answers() -> bool:
                if process.running_pid(pid_path) is None:
                    raise TransientDriverError(f"{stack.name} exited during its private start: "
                                               f"{self._log_tail(node_id)!r}")
                try:
                    stack.private_check(ctx, sockdir)
                except Exception:  # any client error means "not up yet"
                    return False
                return True

            try:  # polled, as wait_healthy: the server gives no readiness notification
                Retrying(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(60.0), wait=wait_fixed(0.02),
                         reraise=True)(answers)
            except RetryError:
                raise TransientDriverError(f"{stack.name} did not answer on its private socket within 60s") from None
            yield sockdir
        finally:
            process.terminate(pid_path, stack.stop_signal, timeout=60.0)
            shutil.rmtree(sockdir, ignore_errors=True)

    def run_clone_actions(self, node_id: str, actions: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
        stack, ctx = self._node(node_id)
        done: list[dict[str, Any]] = []
        with ExitStack() as private:
            sockdir: Path | None = None
            for kind, payload in actions:
                try:
                    if kind in stack.file_actions:
                        done.append(stack.file_action(ctx, kind, payload))
                        continue
                    if kind not in stack.server_actions:
                        raise NotImplementedError(f"{stack.name} runs no {kind!r} action")
                    if sockdir is None:
                        sockdir = private.enter_context(self._private_server(node_id))
                    done.append(stack.server_action(ctx, sockdir, kind, payload))
                except TransientDriverError:
                    raise
                except Exception as exc:  # the server's client library decides what it raises
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    what = "masking" if kind == "mask" else f"on_clone {kind}"
                    raise ActionFailed(f"{what} on {stack.name} failed: {first}", done) from exc
        if ctx.run_as is not None:
            ctx.run_as.chown_tree(ctx.config_dir)
        return done

    def scan_for_leaks(self, node_id: str, needles: Needles, limits: ScanLimits = DEFAULT_LIMITS) -> ScanResult:
        stack, ctx = self._node(node_id)

        def skip(rel: str) -> str | None:
            if _ignore_run(rel.rstrip("/")):
                return "runtime"
            return "server" if stack.server_owned(rel) else None

        return scan_tree(ctx.volume, needles, first=stack.config_files, skip=skip, limits=limits)

    # ---- teardown ------------------------------------------------------------------------------
    def destroy_node(self, node_id: str) -> None:
        volume = self.volume(node_id)
        with self._exclusive(node_id) as lock:
            if volume.exists() or (self._ctl(node_id) / "node.json").exists():
                self.stop(node_id)
            for path in (volume, self.nodes_dir / f".{node_id}.creating",
                         self.nodes_dir / f".{node_id}.provisioning", self._ctl(node_id)):
                shutil.rmtree(path, ignore_errors=True)
            lock.unlink(missing_ok=True)

    def delete_snapshot(self, snapshot_id: str) -> None:
        shutil.rmtree(self._snapshot_dir(snapshot_id), ignore_errors=True)
        for partial in (f".{snapshot_id}.staging", f".{snapshot_id}.incoming"):
            shutil.rmtree(self.snaps_dir / partial, ignore_errors=True)

    def node_ids(self) -> set[str]:
        if not self.nodes_dir.exists():
            return set()
        return {p.name for p in self.nodes_dir.iterdir() if not p.name.startswith(".")}

    def snapshot_ids(self) -> set[str]:
        if not self.snaps_dir.exists():
            return set()
        return {p.name for p in self.snaps_dir.iterdir() if not p.name.startswith(".")}

    def partial_snapshot_ids(self) -> set[str]:
        """Snapshots half-made or half-received here (staging and incoming dirs of steps that died)."""
        if not self.snaps_dir.exists():
            return set()
        return {p.name[1:].split(".")[0] for p in self.snaps_dir.iterdir()
                if p.name.startswith(".") and not p.name.startswith(".reflink-probe")}

    def node_owner(self, node_id: str) -> str | None:
        try:
            return str(self._meta(node_id).get("owner") or "") or None
        except (PermanentDriverError, ValueError):
            return None

    def running_node_ids(self) -> set[str]:
        return {n for n in self.node_ids() if process.running_pid(self.pid_path(n)) is not None}

    def volume_size(self, node_id: str) -> int:
        volume = self.volume(node_id)
        return snapshots.tree_size(volume, _ignore_run) if volume.exists() else 0

    def url(self, node_id: str) -> str:
        stack, ctx = self._node(node_id)
        return stack.url(ctx.address, ctx.port, ctx.secrets())
