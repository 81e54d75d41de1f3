"""Kernel file locks (flock): held by an open file, released when its holder exits however it ends,
and the same in every PID namespace -- unlike a pid written in a file."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def held(path: str | Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created 0600) for the block, waiting for it if need be."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def free(path: str | Path) -> bool:
    """Whether no one holds ``path``'s lock right now (it must exist)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True
