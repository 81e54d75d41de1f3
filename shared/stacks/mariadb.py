"""MariaDB: the system's mariadbd, its datadir in the volume, TCP only on the node's address (no
Unix socket at all, so no socket path can outgrow the 107-byte limit). Accounts are password-only:
``root`` and the application user, both ``@'%'``; no anonymous or passwordless login exists.

Quiesce (stop mode): ``FLUSH TABLES``, then SIGTERM -- a normal shutdown (innodb_fast_shutdown=1)
writes every dirty page and a full checkpoint, so the stopped datadir opens without crash recovery
(=0, a slow shutdown that also purges and merges buffered changes, is for upgrades; it would only
lengthen the window). The 32 MB buffer pool bounds what that shutdown has to write. (Flushing dirty
pages ahead of the window is not worth it: InnoDB's page cleaner writes them at innodb_io_capacity
per second, far slower than the shutdown itself does.)

New credentials are set in bootstrap mode, which reads SQL from stdin and opens neither a port nor
a socket: no client can connect in between."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pymysql

from shared import snapshots
from shared.config import get_settings
from shared.stacks import mariadb_reflink
from shared.stacks.base import CopyTree, Credentials, DatabaseStack, NodeContext, OnlineCopy, write_private
from shared.stacks.mariadb_hold import CommitHold

SUPERUSER = "root"
APP_USER = APP_DB = "app"
# Where Debian, Fedora and MariaDB's own packages put the server; PATH first.
_SERVER_DIRS = ("/usr/sbin", "/usr/libexec", "/usr/local/mysql/bin", "/usr/local/sbin", "/usr/bin")


def mariadb_binaries() -> tuple[str, str]:
    """(mariadbd, mariadb-install-db) of the system; FileNotFoundError saying what to install."""
    server = shutil.which("mariadbd") or next(
        (str(Path(d, "mariadbd")) for d in _SERVER_DIRS if os.access(Path(d, "mariadbd"), os.X_OK)), None)
    if server is None:
        raise FileNotFoundError("no mariadbd: install the MariaDB server (apt-get install mariadb-server)")
    beside = Path(os.path.realpath(server)).parent
    for name in ("mariadb-install-db", "mysql_install_db"):
        for cand in (shutil.which(name), str(beside / name), str(beside.parent / "bin" / name),
                     str(beside.parent / "scripts" / name)):
            if cand and os.access(cand, os.X_OK):
                return server, cand
    raise FileNotFoundError(f"no mariadb-install-db beside {server}: install the MariaDB server package")


def mariadb_backup() -> str | None:
    """The system's mariadb-backup (Debian's mariadb-backup package), or None."""
    found = shutil.which("mariadb-backup") or shutil.which("mariabackup")
    if found:
        return found
    try:
        beside = Path(os.path.realpath(mariadb_binaries()[0])).parent
    except FileNotFoundError:
        return None
    for cand in (beside / "mariadb-backup", beside.parent / "bin" / "mariadb-backup"):
        if os.access(cand, os.X_OK):
            return str(cand)
    return None


def _lit(value: str) -> str:
    """A SQL string literal. Bootstrap mode reads one statement per line: no line breaks allowed."""
    if any(ord(c) < 32 for c in value):
        raise ValueError("credentials must not contain control characters")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _account(user: str) -> str:
    return f"{_lit(user)}@'%'"


def _run_as_node(ctx: NodeContext, argv: list[str], stdin: str | None = None, timeout: float = 120,
                 on_line: Callable[[str], None] | None = None) -> str:
    """Run as the node's account in its volume; its output. ``on_line`` sees each line of it as it
    is written (stdout and stderr together)."""
    kwargs: dict[str, Any] = {"text": True, "umask": 0o077, "cwd": ctx.volume, "env": {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin", "LC_ALL": "C", "HOME": str(ctx.volume)}}
    if ctx.run_as:
        kwargs |= {"user": ctx.run_as.uid, "group": ctx.run_as.gid, "extra_groups": []}
    if on_line is not None and stdin is not None:
        raise ValueError("a streamed command reads no stdin")
    try:
        if on_line is not None:
            return _stream(argv, timeout, on_line, kwargs)
        out = subprocess.run(argv, check=True, capture_output=True, input=stdin, timeout=timeout, **kwargs)
    except subprocess.CalledProcessError as exc:
        errors = [ln for ln in ((exc.stderr or "") + (exc.stdout or "")).splitlines() if "ERROR" in ln]
        tail = (exc.stderr or exc.stdout or "")[-500:]  # stderr's, or the streamed output's
        raise RuntimeError(f"{Path(argv[0]).name} failed: {' | '.join(errors)[-500:] or tail}") from exc
    return out.stdout + out.stderr


def _stream(argv: list[str], timeout: float, on_line: Callable[[str], None], kwargs: dict[str, Any]) -> str:
    lines: list[str] = []
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          **kwargs) as proc:
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            proc.kill()

        killer = threading.Timer(timeout, expire)  # subprocess.run's timeout, while we read here
        killer.start()
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                on_line(line)
                lines.append(line)
            proc.wait()
        except BaseException:
            proc.kill()
            raise
        finally:
            killer.cancel()
    output = "".join(lines)
    if proc.returncode and timed_out.is_set():
        raise subprocess.TimeoutExpired(argv, timeout, output)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, argv, output, "")
    return output


def mask_statement(table: str, column: str, kind: str, seed: str) -> tuple[str, tuple[str, ...]]:
    """UPDATE table SET column = <fake> for one masking rule (``shared.clone.masking``), as the
    PostgreSQL stack's: a fake derived from MD5(seed || value). Table and column were checked to be
    identifiers when the request was made; backquoted here all the same."""
    col = f"`{column}`"
    target = ".".join(f"`{part}`" for part in table.split("."))
    digest = f"MD5(CONCAT(%s, CAST({col} AS CHAR)))"
    derived = {
        "email": f"CONCAT('user_', LEFT({digest}, 12), '@example.invalid')",
        "name": f"CONCAT('Person ', UPPER(LEFT({digest}, 8)))",
        "phone": f"CONCAT('+1-555-', LPAD(CONV(LEFT({digest}, 7), 16, 10) MOD 10000000, 7, '0'))",
        "hash": f"SHA2(CONCAT(%s, CAST({col} AS CHAR)), 256)",
        "redact": "'********'",
    }
    if kind in derived:
        params: tuple[str, ...] = (seed,) if "%s" in derived[kind] else ()
        return f"UPDATE {target} SET {col} = {derived[kind]} WHERE {col} IS NOT NULL", params
    if kind == "null":
        return f"UPDATE {target} SET {col} = NULL", ()
    if kind.startswith("constant:"):
        return f"UPDATE {target} SET {col} = %s", (kind[len("constant:"):],)
    raise ValueError(f"unknown mask {kind!r}")


class MariaDBStack(DatabaseStack):
    scheme, superuser = "mysql", SUPERUSER
    name = "mariadb"
    default_port = 3306
    refuses_root = True  # mariadbd will not run as root without --user=root
    server_actions = frozenset({"mask"})

    # ---- files and processes -------------------------------------------------------------------
    @staticmethod
    def _options(ctx: NodeContext) -> list[str]:
        """Server options shared by the bootstrap runs and the server itself (the same redo log
        size everywhere, or each start would resize it). Small memory: a node is a test copy."""
        return [
            f"--datadir={ctx.data_dir}", "--socket=", f"--tmpdir={ctx.volume / 'run'}",
            "--skip-name-resolve", "--skip-log-bin", "--performance-schema=OFF",
            "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=8M", "--innodb-log-buffer-size=4M",
            "--innodb-fast-shutdown=1",
            "--key-buffer-size=1M", "--aria-pagecache-buffer-size=8M", "--query-cache-size=0",
            "--max-connections=40", "--table-open-cache=200", "--open-files-limit=1024",
            "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
        ]

    def init(self, ctx: NodeContext, config: dict[str, str], credentials: Credentials) -> None:
        """mariadb-install-db, then, in the same bootstrap: every account but root@localhost (and
        the locked ``mariadb.sys`` that owns the system views) dropped, root moved to ``'%'`` with
        its password. The script holding the password is 0600 and removed at once."""
        credentials = credentials or self.new_credentials()
        server, install_db = mariadb_binaries()
        super().init(ctx, config, credentials)
        (ctx.volume / "run").mkdir(exist_ok=True)
        root = credentials.get("superuser", SUPERUSER)
        script = ctx.config_dir / ".init.sql"
        write_private(script, "\n".join([
            "DELETE FROM mysql.global_priv WHERE NOT ((User = 'root' AND Host = 'localhost') OR User = 'mariadb.sys');",
            "DELETE FROM mysql.proxies_priv WHERE NOT (User = 'root' AND Host = 'localhost');",
            "DELETE FROM mysql.db WHERE User NOT IN ('root', 'mariadb.sys');",
            "FLUSH PRIVILEGES;",
            f"RENAME USER 'root'@'localhost' TO {_account(root)};",
            f"ALTER USER {_account(root)} IDENTIFIED BY {_lit(credentials['superuser_password'])};",
        ]) + "\n")
        if ctx.run_as:
            for path in (script, ctx.data_dir, ctx.volume / "run"):
                os.chown(path, ctx.run_as.uid, ctx.run_as.gid)
        try:
            _run_as_node(ctx, [install_db, "--no-defaults", f"--basedir={Path(os.path.realpath(server)).parent.parent}",
                               "--auth-root-authentication-method=normal", "--skip-test-db",
                               f"--extra-file={script}", *self._options(ctx)])
        finally:
            script.unlink(missing_ok=True)

    def command(self, ctx: NodeContext) -> tuple[list[str], dict[str, str]]:
        server, _ = mariadb_binaries()
        argv = [server, "--no-defaults", *self._options(ctx), f"--bind-address={ctx.address}",
                f"--port={ctx.port}", f"--pid-file={ctx.volume / 'run' / 'mariadbd.pid'}"]
        return argv, {"LC_ALL": "C"}

    # ---- clients -------------------------------------------------------------------------------
    @contextmanager
    def _connect(self, ctx: NodeContext, timeout: int = 2) -> Iterator[pymysql.cursors.Cursor]:
        creds = ctx.secrets()
        conn = pymysql.connect(host=ctx.address, port=ctx.port, user=creds.get("superuser", SUPERUSER),
                               password=creds["superuser_password"], connect_timeout=timeout,
                               read_timeout=max(timeout, 30), write_timeout=max(timeout, 30), autocommit=True)
        try:
            with conn.cursor() as cur:
                yield cur
        finally:
            conn.close()

    def first_start(self, ctx: NodeContext) -> None:
        creds = ctx.secrets()
        user = _account(creds.get("username", APP_USER))
        with self._connect(ctx, timeout=10) as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{APP_DB}`")
            cur.execute(f"CREATE USER IF NOT EXISTS {user} IDENTIFIED BY {_lit(creds['password'])}")
            cur.execute(f"GRANT ALL PRIVILEGES ON `{APP_DB}`.* TO {user}")

    def apply_credentials(self, ctx: NodeContext, credentials: Credentials) -> None:
        """In bootstrap mode (no port, no socket): root and the application user get their new
        passwords, the application user its new name, before the server first listens. A repeat
        with the same credentials does nothing; a repeat after a half-done run finishes it."""
        before = ctx.secrets()
        if before == dict(credentials):
            return
        server, _ = mariadb_binaries()
        root = credentials.get("superuser", SUPERUSER)
        old, new = before.get("username", APP_USER), credentials["username"]
        exists = "EXISTS (SELECT 1 FROM mysql.global_priv WHERE User = {} AND Host = '%')"
        statements = ["FLUSH PRIVILEGES;",
                      f"ALTER USER {_account(root)} IDENTIFIED BY {_lit(credentials['superuser_password'])};"]
        if old != new:
            statements.append(f"BEGIN NOT ATOMIC IF {exists.format(_lit(old))} AND NOT {exists.format(_lit(new))} "
                              f"THEN RENAME USER {_account(old)} TO {_account(new)}; END IF; END;")
        statements.append(f"ALTER USER {_account(new)} IDENTIFIED BY {_lit(credentials['password'])};")
        _run_as_node(ctx, [server, "--no-defaults", "--bootstrap", "--skip-networking", *self._options(ctx)],
                     stdin="\n".join(statements) + "\n")
        super().apply_credentials(ctx, credentials)

    # ---- the private start: no TCP at all, a Unix socket in the driver's 0700 directory ---------
    def private_command(self, ctx: NodeContext, sockdir: Path) -> tuple[list[str], dict[str, str]]:
        server, _ = mariadb_binaries()
        argv = [server, "--no-defaults", *self._options(ctx), "--skip-networking", f"--socket={sockdir / 'm.sock'}",
                f"--pid-file={sockdir / 'mariadbd.pid'}"]
        return argv, {"LC_ALL": "C"}

    @contextmanager
    def _private_connect(self, ctx: NodeContext, sockdir: Path, timeout: int = 2) -> Iterator[pymysql.Connection]:
        creds = ctx.secrets()  # the clone's own, set before
        conn = pymysql.connect(unix_socket=str(sockdir / "m.sock"), user=creds.get("superuser", SUPERUSER),
                               password=creds["superuser_password"], database=APP_DB, connect_timeout=timeout,
                               read_timeout=3600, write_timeout=3600, autocommit=False,
                               client_flag=pymysql.constants.CLIENT.FOUND_ROWS)  # rows matched, not changed
        try:
            yield conn
        finally:
            conn.close()

    def private_check(self, ctx: NodeContext, sockdir: Path) -> None:
        with self._private_connect(ctx, sockdir) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")

    def server_action(self, ctx: NodeContext, sockdir: Path, kind: str, payload: Any) -> dict[str, Any]:
        """``mask``: the node's masking rules, one transaction (InnoDB tables), foreign key checks off
        for it (a key and the columns referencing it are masked alike, each by its own rule)."""
        if kind != "mask":
            return super().server_action(ctx, sockdir, kind, payload)
        masked: list[int] = []
        with self._private_connect(ctx, sockdir, timeout=10) as conn:
            try:
                with conn.cursor() as cur:
                    cur.execute("SET SESSION foreign_key_checks = 0")
                    cur.execute("START TRANSACTION")
                    for rule in payload["rules"]:
                        statement, params = mask_statement(rule["table"], rule["column"], rule["with"],
                                                           payload["seed"])
                        masked.append(max(cur.execute(statement, params or None), 0))
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        return {"masked": masked}

    def check(self, ctx: NodeContext) -> str:
        with self._connect(ctx) as cur:
            cur.execute("SELECT 1")
            cur.fetchone()
        return "accepting connections"

    online_copy_exclusive = True  # a server runs one BACKUP STAGE at a time

    @property
    def online_copy_supported(self) -> bool:  # type: ignore[override]
        """Copied while serving when mariadb-backup is installed (it must match the server's version,
        as Debian's package does)."""
        return mariadb_backup() is not None

    @staticmethod
    def online_method(where: Path) -> str:
        """The online copy method for a snapshot made under ``where`` (ENVCLONE_MARIADB_ONLINE_METHOD):
        auto reflinks where that filesystem can (bench/results/results.md: it holds no commit,
        where mariadb-backup reads every InnoDB page beside the server), else mariadb-backup."""
        method = get_settings().mariadb_online_method
        if method != "auto":
            return method
        return "reflink" if snapshots.reflink_at(where) else "backup"

    def online_copy(self, ctx: NodeContext, dest: Path, copy: CopyTree) -> OnlineCopy:
        """The reflink copy (shared/stacks/mariadb_reflink.py) where the method is reflink and it
        applies: it holds no commit. Else mariadb-backup, which holds commits for its last step."""
        if self.online_method(dest.parent) == "reflink":
            try:
                self._reflink_copy(ctx, dest, copy)
                return OnlineCopy("reflink")
            except (mariadb_reflink.CheckpointMoved, mariadb_reflink.NotReflinkable):
                shutil.rmtree(dest, ignore_errors=True)  # a checkpoint each time, or EXDEV: the backup takes it
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise
        return OnlineCopy("backup", self._backup(ctx, dest, copy))

    def _reflink_copy(self, ctx: NodeContext, dest: Path, copy: CopyTree) -> None:
        """Every file reflinked under BACKUP STAGE BLOCK_DDL, which this session holds: a worker
        that dies here leaves no stage behind (the server ends it with the connection)."""
        with self._connect(ctx, timeout=10) as cur:
            # A DDL statement running now is waited for this long, not lock_wait_timeout's day.
            cur.execute("SET SESSION lock_wait_timeout = 20")
            for stage in ("START", "FLUSH", "BLOCK_DDL"):
                cur.execute(f"BACKUP STAGE {stage}")
            copy(ctx.volume, dest, lambda rel: rel.split(os.sep)[0] in ("run", "data"))
            mariadb_reflink.copy_data_dir(ctx.data_dir, dest / "data", copy)
            cur.execute("BACKUP STAGE END")

    def _backup(self, ctx: NodeContext, dest: Path, copy: CopyTree) -> int:
        """mariadb-backup while the server serves: InnoDB files are copied as they change while the
        redo log is followed, and writes wait only while it holds BACKUP STAGE BLOCK_COMMIT (the
        non-InnoDB tables and the tail of the redo log); ``--prepare`` then applies the redo, so the
        copy opens as that one moment without crash recovery. It runs as the node's account, into
        the volume's run/ (never copied), with root's password in a 0600 file there, not in argv.
        Returns how long commits were held (mariadb_hold)."""
        tool = mariadb_backup()
        if tool is None:
            raise FileNotFoundError("no mariadb-backup: install it (apt-get install mariadb-backup)")
        creds = ctx.secrets()
        run = ctx.volume / "run"
        work, cnf = run / "backup", run / "backup.cnf"
        shutil.rmtree(work, ignore_errors=True)  # what a killed attempt left
        write_private(cnf, "\n".join([
            "[mysqld]", f"datadir={ctx.data_dir}",
            "[mariadb-backup]", f"host={ctx.address}", f"port={ctx.port}",
            f"user={creds.get('superuser', SUPERUSER)}", f"password={creds['superuser_password']}",
        ]) + "\n")
        if ctx.run_as:
            os.chown(cnf, ctx.run_as.uid, ctx.run_as.gid)
        window, hold = snapshots.write_behind_bytes(), CommitHold()
        try:
            # What it writes is written back while it writes, a window at a time, so the served
            # node's commits never queue behind gigabytes of its dirty pages.
            with snapshots.TreeFlusher(work, window).running() if window else nullcontext():
                # The redo log is followed every 10 ms, not every second: BLOCK_COMMIT waits for it.
                _run_as_node(ctx, [tool, f"--defaults-file={cnf}", "--backup", f"--target-dir={work}",
                                   "--log-copy-interval=10", f"--tmpdir={run}"], timeout=3600, on_line=hold.seen)
                hold.done()
                _run_as_node(ctx, [tool, f"--defaults-file={cnf}", "--prepare", f"--target-dir={work}",
                                   f"--tmpdir={run}"], timeout=3600)
            copy(ctx.volume, dest, lambda rel: rel.split(os.sep)[0] in ("run", "data"))
            os.rename(work, dest / "data")  # one filesystem: the data root
            return hold.held_ms
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            cnf.unlink(missing_ok=True)

    def quiesce(self, ctx: NodeContext) -> bool:
        # Close and flush every table (Aria system tables included); SIGTERM then shuts down cleanly.
        with self._connect(ctx, timeout=10) as cur:
            cur.execute("FLUSH TABLES")
        return False

