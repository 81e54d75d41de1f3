"""The leak scan: after a clone's configs are rewritten and before it first starts, its files are
searched for anything of its source -- a source node's address, its ``host:port``, a source
password. A finding names the file, the line and the kind, never the value.

Bounded: declared config files first, then the volume's other regular files (no symlinks, never
``run/``, not what the stack's server owns such as its database files), text only (no NUL byte in
the first 8 KiB), up to ``max_bytes`` each and ``max_files`` in all; what was left out is counted."""

from __future__ import annotations

import bisect
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from shared import templates
from shared.rewire import address_pattern

SNIFF_BYTES = 8192  # a NUL byte in these makes a file binary (what git and grep decide by)
MIN_SECRET_LEN = 6  # shorter values would match everywhere; generated secrets are far longer


class LeakKind(StrEnum):
    ADDRESS = "address"
    HOST_PORT = "host_port"
    SECRET = "secret"


@dataclass(frozen=True)
class Needles:
    """What must not survive into a clone: its source nodes' addresses, host:ports and passwords."""

    addresses: tuple[str, ...] = ()
    host_ports: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()

    @classmethod
    def of(cls, nodes: Iterable[tuple[str, int, Mapping[str, object]]]) -> Needles:
        """``nodes``: (address, port, credentials) of every source node."""
        addresses, host_ports, secrets = set(), set(), set()
        for address, port, credentials in nodes:
            addresses.add(address)
            host_ports.add(f"{address}:{port}")
            secrets.update(str(v) for k, v in credentials.items()
                           if k.endswith("password") and v and len(str(v)) >= MIN_SECRET_LEN)
        return cls(tuple(sorted(addresses)), tuple(sorted(host_ports)), tuple(sorted(secrets)))

    def __bool__(self) -> bool:
        return bool(self.addresses or self.secrets)

    def find(self, text: str) -> list[tuple[int, LeakKind]]:
        """(line number, kind) of every line that holds a needle, once per kind and line. An address
        that is part of a host:port counts as the host:port."""
        hits: set[tuple[int, LeakKind]] = set()
        newlines: list[int] | None = None

        def line_of(pos: int) -> int:
            nonlocal newlines
            if newlines is None:
                newlines = [m.start() for m in re.finditer("\n", text)]
            return bisect.bisect_left(newlines, pos) + 1

        starts: set[int] = set()
        if self.host_ports:
            for m in _host_port_pattern(self.host_ports).finditer(text):
                starts.add(m.start())
                hits.add((line_of(m.start()), LeakKind.HOST_PORT))
        if self.addresses:
            for m in address_pattern(list(self.addresses)).finditer(text):
                if m.start() not in starts:
                    hits.add((line_of(m.start()), LeakKind.ADDRESS))
        for secret in self.secrets:
            at = text.find(secret)
            while at >= 0:
                hits.add((line_of(at), LeakKind.SECRET))
                at = text.find(secret, at + 1)
        return sorted(hits)


def _host_port_pattern(host_ports: Sequence[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(h) for h in sorted(host_ports, key=len, reverse=True))
    return re.compile(rf"(?<![\w.])(?:{alternatives})(?!\d)")


def literal_kinds(value: str, needles: Needles) -> set[LeakKind]:
    """What a config value names of the source literally, templates ({{db.url}}) left aside: what a
    dry run predicts from declared configs."""
    return {kind for _, kind in needles.find(templates.REF.sub("", value))}


@dataclass(frozen=True)
class ScanLimits:
    max_files: int = 2000
    max_bytes: int = 1024 * 1024


DEFAULT_LIMITS = ScanLimits()


@dataclass
class ScanResult:
    findings: list[dict[str, object]] = field(default_factory=list)  # {file, line, kind}
    files: int = 0  # text files read
    skipped: Counter[str] = field(default_factory=Counter)  # binary | large | link | what skip() said
    complete: bool = True  # False: max_files stopped the scan

    def summary(self) -> dict[str, object]:
        return {"files": self.files, "skipped": dict(self.skipped), "complete": self.complete}


Skip = Callable[[str], str | None]  # relative path (a directory's ends in "/") -> why it is left out, or None


def _candidates(root: Path, first: Sequence[str], skip: Skip) -> Iterator[tuple[str, str | None]]:
    """(relative path, why skipped or None) of each entry to consider: ``first`` (the stack's
    config files), then the rest of the tree in a stable order. A skipped directory is not entered."""
    seen = set()
    for rel in first:
        seen.add(rel)
        yield rel, None
    for dirpath, dirnames, filenames in os.walk(root):
        base = os.path.relpath(dirpath, root)
        base = "" if base == "." else base.replace(os.sep, "/") + "/"
        kept = []
        for d in sorted(dirnames):
            why = skip(f"{base}{d}/")
            if why:
                yield f"{base}{d}/", why
            elif os.path.islink(os.path.join(dirpath, d)):
                yield f"{base}{d}/", "link"
            else:
                kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            rel = base + name
            if rel not in seen:
                yield rel, skip(rel)


def scan_tree(root: Path, needles: Needles, first: Sequence[str] = (), skip: Skip = lambda _: None,
              limits: ScanLimits = DEFAULT_LIMITS) -> ScanResult:
    result = ScanResult()
    if not needles:
        return result
    for rel, why in _candidates(root, first, skip):
        if why is not None:
            result.skipped[why] += 1
            continue
        # Never through a symlink, never blocking on a FIFO: the volume belongs to the node's account.
        try:
            fd = os.open(root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            continue
        except OSError:  # ELOOP: a symlink
            result.skipped["link"] += 1
            continue
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                result.skipped["special"] += 1
                continue
            if st.st_size > limits.max_bytes:
                result.skipped["large"] += 1
                continue
            if result.files >= limits.max_files:
                result.complete = False
                break
            head = f.read(SNIFF_BYTES)
            if b"\0" in head:
                result.skipped["binary"] += 1
                continue
            data = head + f.read(limits.max_bytes)
        result.files += 1
        for line, kind in needles.find(data.decode("utf-8", errors="replace")):
            result.findings.append({"file": rel, "line": line, "kind": str(kind)})
    return result
