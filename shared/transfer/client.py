"""The receiving side: pull a snapshot from another host's transfer server into a local snapshots
dir, landing it exactly as a local snapshot (``<id>/{meta.json, manifest.json, volume/}``).

Work happens in a staging dir ``.<id>.incoming/`` renamed into place once everything verified.
Each file streams into ``parts/`` hashing as it goes, is renamed into ``volume/`` on a checksum
match and then recorded in an append-only, fsync'd journal; a pull after a kill skips what the
journal lists, so a kill -9 costs at most the file in flight."""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from shared.transfer import auth
from shared.transfer.manifest import ID_RE, MANIFEST, ChecksumMismatch, Entry, Manifest, TransferError, sha256_file

BUF = 4 * 1024 * 1024
JOURNAL = "journal"
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class PullResult:
    bytes_received: int
    bytes_total: int
    files_fetched: int
    files_skipped: int


def incoming_dir(dest_snaps_dir: Path, snapshot_id: str) -> Path:
    return Path(dest_snaps_dir) / f".{snapshot_id}.incoming"


def _boot_id() -> str:
    # The journal trusts hashes across a process kill (the page cache survives it), not a reboot.
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def read_journal(staging: Path) -> tuple[str | None, dict[str, str]]:
    """(boot id it was written under, {relpath: sha256}) of the verified files; a torn last line
    (a kill mid-append) is ignored."""
    boot, verified = None, {}
    try:
        lines = (staging / JOURNAL).read_text().splitlines()
    except FileNotFoundError:
        return None, {}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "boot_id" in rec:
            boot = rec["boot_id"]
        elif "path" in rec and "sha256" in rec:
            verified[rec["path"]] = rec["sha256"]
    return boot, verified


class _Conn:
    """One keep-alive connection; every request signed. Network failures are retryable errors."""

    def __init__(self, base_url: str, secret: str, timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise TransferError(f"unsupported transfer URL {base_url!r} (http://host:port)")
        self.base_url, self.secret = base_url, secret
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout,
                                               blocksize=BUF)
        self.prefix = parts.path.rstrip("/")

    def get(self, path: str) -> http.client.HTTPResponse:
        full = self.prefix + path
        try:
            # A kept-alive connection the server dropped fails on first use: reconnect once.
            for attempt in Retrying(stop=stop_after_attempt(2), reraise=True, retry=retry_if_exception_type(
                    (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError))):
                with attempt:
                    resp = self._request(full)
        except (OSError, http.client.HTTPException) as exc:
            raise TransferError(f"GET {full} on {self.base_url} failed: {exc!r}", retryable=True) from exc
        if resp.status != 200:
            with self.network(f"GET {full}"):
                body = resp.read()
            try:
                err = json.loads(body)["error"]
                detail = f"{err['code']}: {err['message']}"
            except (ValueError, KeyError, TypeError):
                detail = body[:200].decode(errors="replace")
            raise TransferError(f"GET {full} on {self.base_url}: HTTP {resp.status} {detail}",
                                retryable=resp.status >= 500, status=resp.status)
        return resp

    def _request(self, full: str) -> http.client.HTTPResponse:
        try:
            self.conn.request("GET", full, headers={"Authorization": auth.sign(self.secret, "GET", full)})
            return self.conn.getresponse()
        except BaseException:
            self.conn.close()  # the next request opens a fresh connection
            raise

    @contextmanager
    def network(self, what: str) -> Iterator[None]:
        try:
            yield
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            raise TransferError(f"{what} on {self.base_url} failed: {exc!r}", retryable=True) from exc

    def close(self) -> None:
        self.conn.close()


def _fetch(conn: _Conn, snapshot_id: str, entry: Entry, part: Path, step: Callable[[int], None]) -> None:
    path = f"/v1/snapshots/{snapshot_id}/files/{quote(entry.path, safe='/')}"
    resp = conn.get(path)
    if resp.length != entry.size:
        conn.close()
        raise TransferError(f"{entry.path}: server sends {resp.length} bytes, manifest says {entry.size}")
    h, buf = hashlib.sha256(), bytearray(BUF)
    view = memoryview(buf)
    with open(part, "wb", buffering=0) as f:
        left = entry.size
        while left:
            with conn.network(f"reading {path}"):
                n = resp.readinto(view[:min(BUF, left)])
            if not n:
                conn.close()
                raise TransferError(f"{path}: connection closed {left} bytes short", retryable=True)
            h.update(view[:n])  # hashlib and write drop the GIL on big buffers
            chunk = view[:n]
            while chunk:
                chunk = chunk[f.write(chunk):]
            left -= n
            step(n)
    with conn.network(f"reading {path}"):
        resp.read()  # marks the response done (an empty body is never read otherwise): the connection is reused
    if h.hexdigest() != entry.sha256:
        part.unlink()
        raise ChecksumMismatch(f"{entry.path}: sha256 {h.hexdigest()} != manifest {entry.sha256}")


def _apply_meta(volume: Path, entries: list[Entry]) -> None:
    root = os.geteuid() == 0
    dirs = [e for e in entries if e.kind == "dir"]
    # Directory mtimes change as their contents are written: directories last, deepest first.
    ordered = [e for e in entries if e.kind != "dir"] + sorted(
        dirs, key=lambda e: -1 if e.path == "." else e.path.count("/"), reverse=True)
    for e in ordered:
        p = volume / e.path
        if root:
            os.chown(p, e.uid, e.gid, follow_symlinks=False)
        if e.kind != "symlink":
            os.chmod(p, e.mode)  # after chown, which clears set-id bits
        os.utime(p, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def _verified(staging: Path, manifest: Manifest) -> set[str]:
    boot, journal = read_journal(staging)
    same_boot = boot == _boot_id()
    ok = set()
    for e in manifest.files:
        p = staging / "volume" / e.path
        if journal.get(e.path) == e.sha256 and p.is_file() and not p.is_symlink() and p.stat().st_size == e.size:
            if same_boot or sha256_file(p) == e.sha256:
                ok.add(e.path)
    return ok


@contextmanager
def _pull_lock(dest: Path, snapshot_id: str) -> Iterator[None]:
    lock = dest / f".{snapshot_id}.incoming.lock"
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TransferError(f"another pull of {snapshot_id} into {dest} is running", retryable=True) from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # safe: whoever locks it next finds the snapshot in place


def _done(final: Path) -> PullResult:
    try:
        m = Manifest.from_json((final / MANIFEST).read_text())
        return PullResult(0, m.total_bytes, 0, len(m.files))
    except (FileNotFoundError, TransferError):
        return PullResult(0, 0, 0, 0)


def pull(base_url: str, secret: str, snapshot_id: str, dest_snaps_dir: Path,
         progress: Progress | None = None, timeout: float = 60.0) -> PullResult:
    """Pull ``snapshot_id`` from the transfer server at ``base_url`` into ``dest_snaps_dir``.
    Raises TransferError (``retryable`` says whether the same call may succeed later), of which
    ChecksumMismatch when a file's bytes do not hash to the manifest's SHA-256."""
    if not ID_RE.match(snapshot_id):
        raise TransferError(f"invalid snapshot id {snapshot_id!r}")
    dest = Path(dest_snaps_dir)
    final = dest / snapshot_id
    if (final / "meta.json").exists():
        return _done(final)
    dest.mkdir(parents=True, exist_ok=True)
    with _pull_lock(dest, snapshot_id):
        if (final / "meta.json").exists():
            return _done(final)
        conn = _Conn(base_url, secret, timeout)
        try:
            return _pull_locked(conn, snapshot_id, dest, progress)
        finally:
            conn.close()


def _pull_locked(conn: _Conn, snapshot_id: str, dest: Path, progress: Progress | None) -> PullResult:
    resp = conn.get(f"/v1/snapshots/{snapshot_id}/manifest")
    with conn.network("reading the manifest"):
        text = resp.read().decode()
    manifest = Manifest.from_json(text)
    if manifest.snapshot_id != snapshot_id:
        raise TransferError(f"asked for snapshot {snapshot_id}, got {manifest.snapshot_id}")
    staging = incoming_dir(dest, snapshot_id)
    try:
        resume = (staging / MANIFEST).read_text() == text
    except FileNotFoundError:
        resume = False
    if not resume:  # nothing, or a different snapshot's leftovers: start clean
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        (staging / MANIFEST).write_text(text)
    (staging / "parts").mkdir(exist_ok=True)
    volume = staging / "volume"
    for e in manifest.entries:
        if e.kind == "dir":
            (volume / e.path).mkdir(parents=True, exist_ok=True)
            os.chmod(volume / e.path, 0o700)  # writable while we fill it; its own mode comes last
    for e in manifest.entries:
        if e.kind == "symlink":
            (volume / e.path).unlink(missing_ok=True)
            os.symlink(e.target or "", volume / e.path)
    verified = _verified(staging, manifest) if resume else set()
    total = manifest.total_bytes
    done = sum(e.size for e in manifest.files if e.path in verified)
    received = 0

    def step(n: int) -> None:
        nonlocal done, received
        done, received = done + n, received + n
        if progress:
            progress(done, total)

    if progress:
        progress(done, total)
    with open(staging / JOURNAL, "a") as journal:
        if not resume:
            journal.write(json.dumps({"boot_id": _boot_id()}) + "\n")
        for i, e in enumerate(manifest.files):
            if e.path in verified:
                continue
            part = staging / "parts" / f"{i}.part"
            _fetch(conn, snapshot_id, e, part, step)
            os.replace(part, volume / e.path)
            journal.write(json.dumps({"path": e.path, "sha256": e.sha256}) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
    _apply_meta(volume, list(manifest.entries))
    (staging / "meta.json").write_text(manifest.meta_json)
    (staging / JOURNAL).unlink()
    shutil.rmtree(staging / "parts")
    staging.rename(dest / snapshot_id)
    return PullResult(received, total, len(manifest.files) - len(verified), len(verified))
