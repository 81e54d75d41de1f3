"""Root reads a node's volume by name only where no link the node's account planted is followed."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from shared import snapshots
from shared.stacks.valkey import _open_cut


def test_a_copy_never_reads_through_a_link(tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("root's alone")
    (tmp_path / "volume").mkdir()
    (tmp_path / "volume" / "dump.rdb").symlink_to(secret)
    with pytest.raises(OSError) as raised:
        snapshots.copy_file(str(tmp_path / "volume" / "dump.rdb"), str(tmp_path / "copy"), reflink=True)
    assert raised.value.errno == errno.ELOOP
    assert not (tmp_path / "copy").exists()


@pytest.mark.parametrize("name", ["../host-secret", "link.incr.aof"])
def test_an_append_only_manifest_naming_a_file_elsewhere_is_refused(tmp_path: Path, name: str) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("root's alone")
    aof = tmp_path / "appendonlydir"
    aof.mkdir()
    (aof / "link.incr.aof").symlink_to(secret)
    (aof / "appendonly.aof.manifest").write_text(f"file {name} seq 1 type i\n")
    with pytest.raises((RuntimeError, OSError)):
        _open_cut(aof)
