"""The leak scan's rules: what counts as a trace of the source, and what the scan reads and leaves out."""

from __future__ import annotations

import os
from pathlib import Path

from shared.leaks import LeakKind, Needles, ScanLimits, literal_kinds, scan_tree
from shared.stacks import CATALOG

SOURCE = Needles.of([("127.80.0.1", 5432, {"username": "app", "password": "s3cret-password", "superuser": "pg",
                                           "superuser_password": "another-secret"}),
                     ("127.80.0.2", 6379, {"password": "valkey-secret-1"})])


def test_needles_are_addresses_host_ports_and_password_values_only() -> None:
    assert SOURCE.addresses == ("127.80.0.1", "127.80.0.2")
    assert SOURCE.host_ports == ("127.80.0.1:5432", "127.80.0.2:6379")
    assert set(SOURCE.secrets) == {"s3cret-password", "another-secret", "valkey-secret-1"}  # not "app", not "pg"
    assert Needles.of([("10.0.0.1", 1, {"password": "abc"})]).secrets == ()  # too short to mean anything


def test_find_names_line_and_kind_once_per_line() -> None:
    text = ("# nothing here: 127.80.0.10 127.80.0.100 1127.80.0.1 10.0.0.1\n"
            "host = 127.80.0.1\n"
            "url = postgresql://app:s3cret-password@127.80.0.1:5432/app\n"
            "both 127.80.0.2:6379 and 127.80.0.2 and 127.80.0.2\n"
            "port elsewhere 127.80.0.1:5433\n")
    assert SOURCE.find(text) == [(2, LeakKind.ADDRESS), (3, LeakKind.HOST_PORT), (3, LeakKind.SECRET),
                                 (4, LeakKind.ADDRESS), (4, LeakKind.HOST_PORT), (5, LeakKind.ADDRESS)]
    assert SOURCE.find("a=127.80.0.1.5 b=v127.80.0.1") == []


def test_literal_kinds_leave_templates_aside() -> None:
    assert literal_kinds("{{db.url}}", SOURCE) == set()
    assert literal_kinds("postgresql://{{db.address}}:5432", SOURCE) == set()
    assert literal_kinds("http://127.80.0.1:5432/ {{db.url}}", SOURCE) == {LeakKind.HOST_PORT}


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_scan_reads_text_files_and_counts_what_it_leaves_out(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "config/.env": b"DATABASE_URL=postgresql://127.80.0.9:5432/app\n",
        "config/extra.conf": b"x\nreplica = 127.80.0.1\n",
        "app/blob.bin": b"\0\x01127.80.0.1",
        "app/big.txt": b"127.80.0.1\n" * 20,
        "data/base/1": b"127.80.0.1",
        "run/node.log": b"127.80.0.1",
    })
    os.symlink("/etc/hostname", tmp_path / "config" / "link.conf")
    (tmp_path / "config" / "linked-dir").symlink_to(tmp_path / "app")
    os.mkfifo(tmp_path / "config" / "pipe")  # would block a reader that waits for a writer

    def skip(rel: str) -> str | None:
        return "runtime" if rel.startswith("run/") else ("server" if rel.startswith("data/base/") else None)

    result = scan_tree(tmp_path, SOURCE, first=("config/.env", "config/missing"), skip=skip,
                       limits=ScanLimits(max_bytes=100))
    assert result.findings == [{"file": "config/extra.conf", "line": 2, "kind": "address"}]
    assert result.files == 2 and result.complete
    assert result.skipped == {"binary": 1, "large": 1, "server": 1, "runtime": 1, "link": 2, "special": 1}


def test_scan_stops_at_its_file_limit_and_says_so(tmp_path: Path) -> None:
    _tree(tmp_path, {f"f{i:02d}.txt": b"ok\n" for i in range(10)} | {"z.txt": b"127.80.0.2\n"})
    result = scan_tree(tmp_path, SOURCE, limits=ScanLimits(max_files=5))
    assert result.files == 5 and not result.complete and result.findings == []
    assert result.summary()["complete"] is False


def test_what_each_server_owns_is_left_to_it() -> None:
    pg, valkey, web = CATALOG["postgres"], CATALOG["valkey"], CATALOG["webapp"]
    assert all(pg.server_owned(p) for p in ("data/base/", "data/global/", "data/pg_wal/", "data/postmaster.opts"))
    assert not any(pg.server_owned(p) for p in ("data/", "data/pg_hba.conf", "data/postgresql.auto.conf",
                                                "config/secrets.json"))
    assert valkey.server_owned("data/") and not valkey.server_owned("config/valkey.conf")
    assert not web.server_owned("data/") and not web.server_owned("config/.env")
