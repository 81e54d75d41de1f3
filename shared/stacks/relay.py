"""A relay from a Unix socket to a node's TCP port that connects *from the node's own address*.

A client library that cannot choose its source address (libpq: pg_basebackup) reaches a node on a
loopback alias from 127.0.0.1; through this relay the node sees the connection come from its own
address, so its access rules can admit exactly that address and nothing wider. The relay lives in
the calling process: when that process dies, every relayed connection dies with it."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from types import TracebackType

_CHUNK = 256 * 1024


class SourceBoundRelay:
    """Listens on the Unix socket ``path``; each connection accepted there is relayed to
    (address, port) over TCP from (address, any port). Use as a context manager."""

    def __init__(self, path: Path, address: str, port: int) -> None:
        self.path, self.address, self.port = path, address, port
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        path.chmod(0o600)
        self._listener.listen(8)
        self._listener.settimeout(0.1)  # the accept loop checks its stop flag this often
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="relay-accept", daemon=True)

    def __enter__(self) -> SourceBoundRelay:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection((self.address, self.port), timeout=10,
                                                    source_address=(self.address, 0))
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), name="relay-pump", daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        try:
            while n := src.recv_into(buf):
                dst.sendall(view[:n])
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv
                except OSError:
                    pass
                sock.close()
            self._sockets.clear()
        self.path.unlink(missing_ok=True)
