"""The webapp's .env reader: one line per "\n", whatever else a value holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.stacks.webapp_server import read_env

SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r"]


@pytest.mark.parametrize("sep", SEPARATORS, ids=[f"U+{ord(c):04X}" for c in SEPARATORS])
def test_a_value_cannot_add_a_line(tmp_path: Path, sep: str) -> None:
    env = tmp_path / ".env"
    env.write_bytes(f"DATABASE_URL=postgresql://app@127.80.0.1/app\nZZ=x{sep}DATABASE_URL=postgresql://evil/db\n"
                    .encode())
    assert read_env(env) == {"DATABASE_URL": "postgresql://app@127.80.0.1/app",
                             "ZZ": f"x{sep}DATABASE_URL=postgresql://evil/db"}


def test_plain_files_still_read(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_bytes(b"# comment\r\n A = 1 \r\n\nB=x=y\nnot a pair\n")
    assert read_env(env) == {"A": "1", "B": "x=y"}
    assert read_env(tmp_path / "missing") == {}
