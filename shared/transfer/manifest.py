"""The manifest of a finished snapshot: every entry of its volume/ tree with what it takes to
recreate it elsewhere (kind, mode, owner, mtime, size, SHA-256 or link target), plus meta.json's
text. Snapshots are immutable once in place, so it is computed once and cached beside them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.snapshots import _walk

ID_RE = re.compile(r"^[a-z0-9]{1,64}$")
MANIFEST = "manifest.json"
VERSION = 1
READ_CHUNK = 4 * 1024 * 1024
_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


class TransferError(Exception):
    """A transfer failed. ``retryable``: the same call may succeed later (connection lost,
    server error); otherwise something must change first (auth, missing snapshot)."""

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class ChecksumMismatch(TransferError):
    pass


@dataclass(frozen=True)
class Entry:
    path: str  # relative to volume/, "." for volume/ itself
    kind: str  # file | dir | symlink
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    sha256: str | None = None
    target: str | None = None


@dataclass(frozen=True)
class Manifest:
    snapshot_id: str
    meta_json: str  # meta.json's exact text, so the receiver writes the same file
    entries: tuple[Entry, ...]

    @property
    def files(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "file"]

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files)

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "snapshot_id": self.snapshot_id, "meta_json": self.meta_json,
                           "entries": [{k: v for k, v in asdict(e).items() if v is not None} for e in self.entries]})

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and validate: a manifest from another host decides which paths we write to."""
        try:
            data: dict[str, Any] = json.loads(text)
            if data.get("version") != VERSION or not ID_RE.match(data["snapshot_id"]):
                raise ValueError("unknown version or bad snapshot id")
            entries = tuple(Entry(**e) for e in data["entries"])
            manifest = cls(data["snapshot_id"], str(data["meta_json"]), entries)
        except (ValueError, KeyError, TypeError) as exc:
            raise TransferError(f"invalid manifest: {exc}") from None
        # Every entry sits in a directory listed before it: a path through a symlink (link -> /etc,
        # then link/passwd) would have the receiver write outside its volume.
        dirs: set[str] = set()
        for e in entries:
            parent = e.path.rpartition("/")[0] or "."
            if e.kind not in ("file", "dir", "symlink") or (e.path != "." and not safe_relpath(e.path)) or (
                    (e.path == ".") != (not dirs) or (dirs and parent not in dirs) or e.path in dirs
                    or (e.path == "." and e.kind != "dir")):
                raise TransferError(f"invalid manifest entry {e.path!r} ({e.kind})")
            if e.kind == "dir":
                dirs.add(e.path)
            if e.kind == "file" and (e.size < 0 or not re.fullmatch(r"[0-9a-f]{64}", e.sha256 or "")):
                raise TransferError(f"invalid manifest entry {e.path!r}: size or sha256")
        return manifest


def safe_relpath(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\0" not in rel and all(p not in ("", ".", "..") for p in parts)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _entry(rel: str, path: Path, st: os.stat_result) -> Entry | None:
    common = {"path": rel, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
              "mtime_ns": st.st_mtime_ns}
    if stat.S_ISDIR(st.st_mode):
        return Entry(kind="dir", **common)
    if stat.S_ISLNK(st.st_mode):
        return Entry(kind="symlink", target=os.readlink(path), **common)
    if stat.S_ISREG(st.st_mode):
        return Entry(kind="file", size=st.st_size, sha256=sha256_file(path), **common)
    return None  # sockets, fifos: runtime artefacts, never part of a volume's data (as in copy_tree)


def build(snap_dir: Path) -> Manifest:
    volume = snap_dir / "volume"
    entries = [_entry(".", volume, os.lstat(volume))]
    entries += [_entry(rel, volume / rel, st) for rel, st in _walk(volume, None)]
    return Manifest(snap_dir.name, (snap_dir / "meta.json").read_text(), tuple(e for e in entries if e))


def load_or_build(snap_dir: Path) -> Manifest:
    """The cached manifest, computing it (once, even under concurrent requests) when absent."""
    cached = snap_dir / MANIFEST
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(snap_dir, threading.Lock())
    with lock:
        try:
            return Manifest.from_json(cached.read_text())
        except FileNotFoundError:
            pass
        manifest = build(snap_dir)
        tmp = snap_dir / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(manifest.to_json())
        tmp.replace(cached)  # atomic: a reader never sees half a manifest
        return manifest
