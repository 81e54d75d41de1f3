"""A byte copy bounds its dirty data: each window's writeback is started as it is written and the
window before it waited for, so at most two windows of a copy are dirty or in flight; a flusher does
the same for files another writer (pg_basebackup) grows. The sync_file_range calls are recorded
through the real ones (the copies are real files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared import snapshots
from shared.config import get_settings

WRITE = snapshots.SYNC_FILE_RANGE_WRITE
WAIT = snapshots.SYNC_FILE_RANGE_WAIT_BEFORE | snapshots.SYNC_FILE_RANGE_WRITE | snapshots.SYNC_FILE_RANGE_WAIT_AFTER
MIB = 1024 * 1024


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """(offset, length, flags) of every sync_file_range a copy makes, passed on to the real one."""
    real = snapshots._sync_file_range
    assert real is not None, "glibc without sync_file_range"
    seen: list[tuple[int, int, int]] = []

    def recording(fd: int, offset: int, length: int, flags: int) -> int:
        seen.append((offset, length, flags))
        return real(fd, offset, length, flags)

    monkeypatch.setattr(snapshots, "_sync_file_range", recording)
    return seen


@pytest.fixture
def window_mib(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    def set_to(mib: int) -> None:
        monkeypatch.setenv("ENVCLONE_COPY_WRITE_BEHIND_MIB", str(mib))
        get_settings.cache_clear()

    yield set_to
    get_settings.cache_clear()


def at_most_two_windows_outstanding(calls: list[tuple[int, int, int]]) -> None:
    """Every window is started, then waited for before the one after next is started; all are
    waited for at the end."""
    started: list[tuple[int, int]] = []
    waited: set[tuple[int, int]] = set()
    for offset, length, flags in calls:
        if flags == WRITE:
            outstanding = [w for w in started if w not in waited]
            assert len(outstanding) <= 1, f"{len(outstanding) + 1} windows in flight at {offset}"
            started.append((offset, length))
        else:
            assert flags == WAIT and (offset, length) in started
            waited.add((offset, length))
    assert waited == set(started)


def test_windows_cover_the_file_once() -> None:
    assert snapshots.write_behind_windows(0, 4) == []
    assert snapshots.write_behind_windows(8, 4) == [(0, 4), (4, 4)]
    assert snapshots.write_behind_windows(9, 4) == [(0, 4), (4, 4), (8, 1)]
    assert snapshots.write_behind_windows(3, 4) == [(0, 3)]


def test_a_copy_writes_behind_window_by_window(tmp_path: Path, calls: list, window_mib) -> None:  # noqa: ANN001
    window_mib(1)
    data = os.urandom(5 * MIB + 12345)
    (tmp_path / "src").write_bytes(data)
    assert snapshots.copy_file(str(tmp_path / "src"), str(tmp_path / "dst"), False, None) == len(data)
    assert (tmp_path / "dst").read_bytes() == data
    windows = snapshots.write_behind_windows(len(data), MIB)
    assert [(o, n) for o, n, f in calls if f == WRITE] == windows  # each window started once, in order
    at_most_two_windows_outstanding(calls)


def test_write_behind_off_leaves_writeback_to_the_kernel(tmp_path: Path, calls: list, window_mib) -> None:  # noqa: ANN001
    window_mib(0)
    data = os.urandom(3 * MIB)
    (tmp_path / "src").write_bytes(data)
    assert snapshots.copy_file(str(tmp_path / "src"), str(tmp_path / "dst"), False, None) == len(data)
    assert (tmp_path / "dst").read_bytes() == data and calls == []


def test_copy_tree_paces_every_file(tmp_path: Path, calls: list, window_mib) -> None:  # noqa: ANN001
    window_mib(1)
    (tmp_path / "src" / "sub").mkdir(parents=True)
    sizes = {"a": 2 * MIB + 1, "sub/b": MIB, "sub/c": 0}
    for rel, size in sizes.items():
        (tmp_path / "src" / rel).write_bytes(os.urandom(size))
    snapshots.copy_tree(tmp_path / "src", tmp_path / "dst", reflink=False)
    for rel in sizes:
        assert (tmp_path / "dst" / rel).read_bytes() == (tmp_path / "src" / rel).read_bytes()
    assert sum(n for _, n, f in calls if f == WRITE) == sum(sizes.values())
    assert sum(n for _, n, f in calls if f == WAIT) == sum(sizes.values())


def test_the_flusher_writes_back_what_another_writer_added_since_its_last_pass(tmp_path: Path,
                                                                              calls: list) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "grows").write_bytes(os.urandom(3 * MIB))
    os.symlink("grows", tmp_path / "d" / "link")  # not followed: the file is flushed once
    flusher = snapshots.TreeFlusher(tmp_path, MIB)
    assert flusher.flush_pass() == 3 * MIB
    assert [(o, n) for o, n, f in calls if f == WRITE] == [(0, MIB), (MIB, MIB), (2 * MIB, MIB)]
    at_most_two_windows_outstanding(calls)
    calls.clear()
    with open(tmp_path / "d" / "grows", "ab") as f:
        f.write(os.urandom(MIB + 7))
    (tmp_path / "d" / "new").write_bytes(os.urandom(10))
    assert flusher.flush_pass() == MIB + 7 + 10
    assert sorted((o, n) for o, n, f in calls if f == WRITE) == [(0, 10), (3 * MIB, MIB), (4 * MIB, 7)]
    calls.clear()
    assert flusher.flush_pass() == 0 and calls == []  # nothing new: nothing to do


def test_the_flusher_runs_while_the_block_runs_and_once_after(tmp_path: Path, calls: list) -> None:
    flusher = snapshots.TreeFlusher(tmp_path, MIB)
    with flusher.running():
        (tmp_path / "f").write_bytes(os.urandom(2 * MIB))
    assert flusher.flushed == {str(tmp_path / "f"): 2 * MIB}  # the last pass, after the writer's end
    at_most_two_windows_outstanding(calls)
