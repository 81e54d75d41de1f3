"""The sending side: a small HTTP server on a host's agent serving finished snapshots, their
manifests and their files' bytes (sendfile, straight from the page cache to the socket)."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shared.transfer import auth
from shared.transfer.manifest import ID_RE, Entry, Manifest, load_or_build, safe_relpath

SLICE = 8 * 1024 * 1024  # sendfile per call; smaller under a rate limit


class _HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _open_beneath(root: Path, rel: str) -> int:
    """Open root/rel without following any symlink on the way (a manifest path can't escape)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        *dirs, name = rel.split("/")
        for part in dirs:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection for a whole pull
    timeout = 120  # an idle or stuck client frees its thread
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # the caller logs transfers; no per-request stderr noise

    def do_GET(self) -> None:  # noqa: N802
        self._body_started = False
        try:
            path = urlsplit(self.path).path
            why = auth.verify(self.server.owner.secret, "GET", path, self.headers.get("Authorization"))
            if why:
                raise _HTTPError(401, "unauthorized", why)
            parts = path.split("/", 5)
            if len(parts) < 5 or parts[:3] != ["", "v1", "snapshots"]:
                raise _HTTPError(404, "not_found", "no such endpoint")
            snap_id = parts[3]
            if not ID_RE.match(snap_id):
                raise _HTTPError(400, "bad_snapshot_id", "snapshot ids match ^[a-z0-9]{1,64}$")
            if parts[4] == "manifest" and len(parts) == 5:
                self._send_json(200, self._manifest(snap_id)[0].to_json().encode())
            elif parts[4] == "files" and len(parts) == 6:
                self._send_file(snap_id, unquote(parts[5]))
            else:
                raise _HTTPError(404, "not_found", "no such endpoint")
        except _HTTPError as exc:
            self._send_error(exc.status, exc.code, exc.message)
        except Exception as exc:  # one JSON shape for every error, never a traceback page
            if self._body_started:
                self.close_connection = True  # the client sees a short body and fails that file
            else:
                self._send_error(500, "internal", f"{type(exc).__name__}: {exc}")

    def _send_error(self, status: int, code: str, message: str) -> None:
        self._send_json(status, json.dumps({"error": {"code": code, "message": message}}).encode())

    def _manifest(self, snap_id: str) -> tuple[Manifest, dict[str, Entry]]:
        snap_dir = self.server.owner.snaps_dir / snap_id
        # Finished snapshots only: a real directory with meta.json (staging dirs are dot-named).
        try:
            if not stat.S_ISDIR(os.lstat(snap_dir).st_mode) or not (snap_dir / "meta.json").is_file():
                raise FileNotFoundError
        except FileNotFoundError:
            raise _HTTPError(404, "snapshot_not_found", f"no finished snapshot {snap_id}") from None
        return self.server.owner._manifest(snap_dir)

    def _send_file(self, snap_id: str, rel: str) -> None:
        if not safe_relpath(rel):
            raise _HTTPError(400, "bad_path", "a file path is relative, without '.', '..' or empty parts")
        entry = self._manifest(snap_id)[1].get(rel)
        if entry is None:
            raise _HTTPError(404, "file_not_found", f"{rel!r} is not a file of snapshot {snap_id}")
        try:
            fd = _open_beneath(self.server.owner.snaps_dir / snap_id / "volume", rel)
        except OSError as exc:
            code = 404 if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR) else 500
            raise _HTTPError(code, "file_unreadable", f"{rel!r}: {exc.strerror}") from None
        with os.fdopen(fd, "rb", buffering=0) as f:
            if os.fstat(fd).st_size != entry.size:
                raise _HTTPError(409, "snapshot_changed", f"{rel!r} no longer has its manifest size")
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(entry.size))
            self.end_headers()
            self._body_started = True
            self._sendfile(f, entry.size)

    def _sendfile(self, f: object, size: int) -> None:
        owner, offset = self.server.owner, 0
        while offset < size:
            rate = owner.max_rate
            count = min(size - offset, SLICE if not rate else max(64 * 1024, rate // 20))
            started = time.monotonic()
            sent = self.connection.sendfile(f, offset, count)  # type: ignore[arg-type]
            if sent == 0:
                raise ConnectionError("file shrank while sent")
            offset += sent
            owner._count(sent)
            if rate:
                time.sleep(max(0.0, sent / rate - (time.monotonic() - started)))  # pacing, not synchronisation

    def _send_json(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: TransferServer


class TransferServer:
    """Serves ``snaps_dir``'s finished snapshots to pullers that sign with ``secret``.
    ``max_rate``: bytes/s per file stream, None for as fast as it goes (a cap for shared links)."""

    def __init__(self, snaps_dir: Path, secret: str, host: str = "127.0.0.1", port: int = 0,
                 max_rate: int | None = None) -> None:
        if not secret:
            raise ValueError("a cluster secret is required")
        self.snaps_dir = Path(snaps_dir).resolve()
        self.secret = secret
        self.max_rate = max_rate
        self.bytes_sent = 0  # file body bytes, for tests and metrics
        self._lock = threading.Lock()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self._thread: threading.Thread | None = None
        self._manifests: dict[tuple[str, int], tuple[Manifest, dict[str, Entry]]] = {}

    def _manifest(self, snap_dir: Path) -> tuple[Manifest, dict[str, Entry]]:
        # Parsed once per snapshot (keyed by its directory's inode: an id deleted and made again is
        # another snapshot); a pull asks for it once per file.
        key = (snap_dir.name, os.lstat(snap_dir).st_ino)
        if key not in self._manifests:
            if len(self._manifests) >= 64:
                self._manifests.clear()  # a bound, not an LRU: an agent serves a handful at a time
            manifest = load_or_build(snap_dir)
            self._manifests[key] = (manifest, {e.path: e for e in manifest.files})
        return self._manifests[key]

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n

    def start(self) -> TransferServer:
        # A short poll interval: stop() waits for the loop to notice, and tests stop many servers.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="transfer-server",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> TransferServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
