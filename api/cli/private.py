"""What envclone keeps under its data dir is for envclone alone: files 0600, directories 0700
(umask 077), secrets written 0600 from their first byte. Only the data root and its ``nodes/``
stay 0711 -- traversable, not listable -- because node processes run as another account and must
reach their volumes."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077
TRAVERSABLE = 0o711

TOKEN_FILE = "token"
FLOWER_AUTH_FILE = "flower-auth"
BROKER_CONF = Path("broker") / "valkey.conf"
FLOWER_USER = "envclone"


def lock_down(data_dir: Path) -> None:
    """umask 077 for this process and every process it starts; the data root and ``nodes/`` 0711;
    and what an older envclone left readable at the top of the data dir or of ``nodes/`` is closed
    (group and other bits dropped). What is inside a node volume is its node's and keeps its modes."""
    os.umask(PRIVATE_UMASK)
    nodes = data_dir / "nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    for d in (data_dir, nodes):
        d.chmod(TRAVERSABLE)
    me = os.geteuid()
    for parent in (data_dir, nodes):
        for entry in parent.iterdir():
            if entry == nodes:
                continue
            st = entry.lstat()
            if stat.S_ISLNK(st.st_mode) or (st.st_uid != me and me != 0):
                continue
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                entry.chmod(mode & 0o700)


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a file that is 0600 from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_private(path: Path) -> str | None:
    """The stripped content of a secret file, or None when it is missing or empty."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def to_terminal(text: str) -> bool:
    """Write ``text`` straight to the controlling terminal -- not to stdout or stderr, which may be a
    log file. False when there is no terminal (the text is then shown nowhere)."""
    try:
        fd = os.open("/dev/tty", os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        return False
    with os.fdopen(fd, "w") as tty:
        tty.write(text)
    return True


def broker_password(data_dir: Path) -> str:
    """The bundled broker's password, kept in its 0600 config file (valkey reads it from there, so
    it never appears on a command line); generated on first use, the same on every start after."""
    conf = data_dir / BROKER_CONF
    password = None
    for line in (read_private(conf) or "").splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "requirepass" and value.strip():
            password = value.strip()
    password = password or secrets.token_urlsafe(32)
    write_private(conf, "# written by `envclone up`: the bundled broker's password (0600)\n"
                        f"requirepass {password}\n")
    return password


def flower_credentials(data_dir: Path) -> tuple[str, bool]:
    """(``user:password`` for Flower's basic auth, whether it was generated just now). Kept in
    ``<data-dir>/flower-auth`` (0600) and the same on every start after the first."""
    path = data_dir / FLOWER_AUTH_FILE
    existing = read_private(path)
    if existing:
        return existing, False
    credentials = f"{FLOWER_USER}:{secrets.token_urlsafe(24)}"
    write_private(path, credentials + "\n")
    return credentials, True
