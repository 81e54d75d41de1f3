"""Root reads a node's volume by name only where no link the node's account planted is followed."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from shared import snapshots
from shared.stacks.base import NodeContext
from shared.stacks.valkey import _open_cut
from shared.stacks.webapp import WebappStack


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


def test_a_directory_swapped_for_a_link_during_a_copy_is_not_followed(tmp_path: Path) -> None:
    """The race replayed without timing: the copy's own ignore callback, which runs as the walk
    reaches ``x/f``, swaps ``x`` for a link to a directory holding another ``f``. The copy must
    read the tree's own ``x/f``."""
    other = tmp_path / "another-tenant"
    other.mkdir()
    (other / "f").write_text("another tenant's")
    src = tmp_path / "volume"
    (src / "x").mkdir(parents=True)
    (src / "x" / "f").write_text("mine")

    def swap_then_keep(rel: str) -> bool:
        if rel == "x/f" and not (src / "x").is_symlink():
            (src / "x").rename(src / "x.real")
            (src / "x").symlink_to(other)
        return False

    snapshots.copy_tree(src, tmp_path / "copy", reflink=False, ignore=swap_then_keep, live=True)
    assert (tmp_path / "copy" / "x" / "f").read_text() == "mine"


def test_the_webapps_code_is_not_written_through_a_link(tmp_path: Path) -> None:
    """Init writes the app's code into a volume its account already owns: an ``app`` link there
    (to a directory of the host) must fail the init, not put a file where it points."""
    elsewhere = tmp_path / "host-dir"
    elsewhere.mkdir()
    volume = tmp_path / "volume"
    for sub in ("data", "config", "run"):
        (volume / sub).mkdir(parents=True)
    (volume / "app").symlink_to(elsewhere)
    with pytest.raises(OSError):
        WebappStack().init(NodeContext(volume, "127.0.0.1", 8080, None), {}, {})
    assert list(elsewhere.iterdir()) == []
