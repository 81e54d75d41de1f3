"""Which pg_basebackup relay directories a sweep removes: those whose owner is gone."""

from __future__ import annotations

import os
import time
from pathlib import Path

from shared import filelock
from shared.stacks.postgres import RELAY_DIR_GRACE_S, RELAY_DIR_PREFIX, _sweep_relay_dirs


def _dir(root: Path, name: str, age_s: float = 0.0, lock: bool = True) -> Path:
    path = root / f"{RELAY_DIR_PREFIX}{name}"
    path.mkdir()
    if lock:
        (path / "lock").touch()
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_only_directories_no_live_backup_holds_are_removed(tmp_path: Path) -> None:
    live = _dir(tmp_path, "live")
    dead = _dir(tmp_path, "dead")
    unlocked_young = _dir(tmp_path, "young", lock=False)  # its owner may be about to lock it
    unlocked_old = _dir(tmp_path, "old", age_s=RELAY_DIR_GRACE_S + 5, lock=False)
    other = tmp_path / "something-else"
    other.mkdir()
    with filelock.held(live / "lock"):
        removed = _sweep_relay_dirs(tmp_path)
    assert sorted(removed) == sorted([dead, unlocked_old])
    assert live.exists() and unlocked_young.exists() and other.exists()
    assert not dead.exists() and not unlocked_old.exists()
