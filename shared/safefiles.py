"""Files written as root inside a node's volume, which the node's account owns: that account could
have put a symbolic link (or a hard link) where root is about to write, pointing at any file of
the host. So a file is never opened there by its name for writing: it is written under a fresh
random name with O_EXCL | O_NOFOLLOW (which never follows a link) and renamed over the old name
(a rename replaces the link itself, not what it points to)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def replace_file(path: Path, data: bytes, mode: int = 0o600, keep_owner: bool = True) -> None:
    """``path`` now holds ``data``, atomically, with ``mode``; ``keep_owner``: as root, owned as the
    file it replaces was (never through a link: that owner is the link's own, its account's)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # the umask may have taken bits the caller asked for
        if keep_owner and os.geteuid() == 0:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                pass
            else:
                os.chown(tmp, st.st_uid, st.st_gid, follow_symlinks=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
