"""Masking throughput on one PostgreSQL node: the email rule's UPDATE (a fake from md5(seed ||
value), foreign keys and triggers off for the transaction, as a clone runs it) beside a plain
``UPDATE users SET email = email || ''`` of the same column on the same data, same server, same run.
Each run works on a fresh copy of the table (CREATE TABLE AS from a template, then CHECKPOINT), so
neither side pays for the other's dead rows. Also timed: the whole masking as a clone runs it --
the private start (no TCP listener) + the transaction + the clean stop.

    python -m bench.masking --rows 200000
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from bench.common import median, timed
from shared.clone.masking import Rule, payload
from shared.drivers import NodeSpec
from shared.drivers.local import LocalDriver
from shared.stacks.postgres import mask_statement

ADDRESS, PORT = "127.110.0.9", 5432
FAST_EMAIL = ("UPDATE users SET email = 'user_' || to_hex(hashtextextended(email, %(seed)s)) || '@example.invalid' "
              "WHERE email IS NOT NULL")


def _reset(conn: psycopg.Connection) -> None:
    conn.execute("DROP TABLE IF EXISTS users")
    conn.execute("CREATE TABLE users AS SELECT * FROM users_template")
    conn.execute("VACUUM ANALYZE users")
    conn.execute("CHECKPOINT")


def _in_transaction(conn: psycopg.Connection, statement: Any, params: dict[str, str] | None = None) -> int:
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        return conn.execute(statement, params).rowcount


def run(rows: int = 200_000, repeats: int = 3, root: Path | None = None) -> dict[str, Any]:
    own_root = root is None
    root = root or Path(tempfile.mkdtemp(prefix="envclone-bench-mask-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    driver = LocalDriver(root)
    node_id = "maskbench"
    driver.create_node(NodeSpec(node_id, "postgres", ADDRESS, PORT))
    ours, plain, whole, fast = [], [], [], []
    try:
        _, ctx = driver._node(node_id)
        creds = ctx.secrets()
        connect = lambda: psycopg.connect(host=ADDRESS, port=PORT, dbname="app", user=creds["superuser"],  # noqa: E731
                                          password=creds["superuser_password"], autocommit=True)
        with connect() as conn:
            conn.execute("CREATE TABLE users_template (id int, email text, name text)")
            conn.execute("INSERT INTO users_template SELECT i, 'person' || i || '@mail.example.com', 'Person ' || i "
                         "FROM generate_series(1, %s) i", (rows,))
            seed = secrets.token_hex(16)
            statement, params = mask_statement("users", "email", "email", seed)
            for _ in range(repeats):
                _reset(conn)
                ms, n = timed(lambda: _in_transaction(conn, statement, params))  # noqa: B023
                assert n == rows, n
                ours.append(ms)
                _reset(conn)
                ms, n = timed(lambda: _in_transaction(conn, "UPDATE users SET email = email || ''"))
                assert n == rows, n
                plain.append(ms)
                _reset(conn)  # for comparison only: a keyed 64-bit non-cryptographic hash (not used)
                ms, n = timed(lambda: _in_transaction(conn, FAST_EMAIL, {"seed": 1234567}))
                fast.append(ms)
            _reset(conn)
        rule = Rule("db", "users", "email", "email")
        for _ in range(repeats):
            ms, done = timed(lambda: driver.run_clone_actions(node_id, [("mask", payload([rule], seed))]))
            assert done[0]["masked"] == [rows], done
            whole.append(ms)
    finally:
        driver.destroy_node(node_id)
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
    o, b, w, f = median(ours), median(plain), median(whole), median(fast)
    r = {"rows": rows, "mask_ms": o, "plain_update_ms": b, "whole_ms": w, "fast_hash_ms": f,
         "fast_hash_ratio": b / f,
         "mask_rows_s": rows / (o / 1000), "plain_rows_s": rows / (b / 1000), "whole_rows_s": rows / (w / 1000),
         "runs_mask_ms": ours, "runs_plain_ms": plain, "runs_whole_ms": whole}
    r["ratio"] = r["mask_rows_s"] / r["plain_rows_s"]
    print(f"masking {rows} emails: {r['mask_rows_s']:.0f} rows/s ({o:.0f} ms); plain UPDATE email = email || '': "
          f"{r['plain_rows_s']:.0f} rows/s ({b:.0f} ms); ratio {r['ratio']:.2f} (target >= 0.5); "
          f"as a clone runs it (private start + transaction + stop): {r['whole_rows_s']:.0f} rows/s ({w:.0f} ms); "
          f"for comparison, a keyed 64-bit hashtextextended fake instead of md5: {f:.0f} ms "
          f"(ratio {r['fast_hash_ratio']:.2f})",
          flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run(args.rows, args.repeats)


if __name__ == "__main__":
    main()
