"""Files written as root inside a node's volume, which the node's account owns: that account could
have put a symbolic link (or a hard link) where root is about to write, pointing at any file of
the host. So a file is never opened there by its name for writing: it is written under a fresh
random name with O_EXCL | O_NOFOLLOW (which never follows a link) and renamed over the old name
(a rename replaces the link itself, not what it points to); a file there is read only if it is one
itself, not a link to one."""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path


def replace_file(path: Path, data: bytes, mode: int = 0o600, keep_owner: bool = True) -> None:
    """``path`` now holds ``data``, atomically, with ``mode``; ``keep_owner``: as root, owned as the
    file it replaces was. Everything by fd, in a parent directory opened without following a link
    (the account could swap the directory itself for a link between two calls by path)."""
    dfd = open_dir(path.parent)
    tmp = f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                os.fchmod(f.fileno(), mode & 0o777)
                if keep_owner and os.geteuid() == 0:
                    try:
                        st = os.stat(path.name, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        pass
                    else:
                        os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise
    finally:
        os.close(dfd)


def open_file(path: str | Path) -> int:
    """A file of a volume opened for reading, never through a link at its name (ELOOP): the
    volume's account could have made any name a link to a file of the host or of another tenant."""
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def open_dir(path: str | Path) -> int:
    """A directory of a volume opened as such, never a link in its place (ELOOP / ENOTDIR)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def read_bytes(path: Path) -> bytes:
    """A file of a volume read by root: never through a link at its name (ELOOP), never a FIFO
    that would block (O_NONBLOCK; only a regular file is read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        return f.read()


def read_text(path: Path) -> str:
    return read_bytes(path).decode()
