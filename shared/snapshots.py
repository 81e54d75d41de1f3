"""Copying volumes: reflink when the filesystem can (detected at run time, per data root), else a
byte copy; plus the delta pass that keeps the in-window work O(changed files) after a pre-copy."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from shared import safefiles

FICLONE = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h
CHUNK = 64 * 1024 * 1024
# A file whose mtime is this close to the moment it was pre-copied may have changed within the
# same timestamp tick; it is copied again in the window rather than trusted.
MODIFY_WINDOW_NS = 2_000_000_000

Progress = Callable[[int], None]  # bytes just copied
Ignore = Callable[[str], bool]  # relative path -> skip?

# sync_file_range(2) flags (linux/fs.h); Python's os module has no sync_file_range.
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int


def write_behind_bytes() -> int:
    """ENVCLONE_COPY_WRITE_BEHIND_MIB in bytes (0: off, the copy leaves its dirty pages to the kernel)."""
    from shared.config import get_settings  # here: shared.config must not import this module's users

    return get_settings().copy_write_behind_mib * 1024 * 1024


def write_behind_windows(size: int, chunk: int) -> list[tuple[int, int]]:
    """The (offset, length) windows a ``size``-byte copy is written in, ``chunk`` bytes each."""
    return [(off, min(chunk, size - off)) for off in range(0, size, chunk)]


class WriteBehind:
    """Bounds the dirty pages one file copy leaves in the page cache: once a window is written its
    writeback is started, and the one before it is waited for. So at most two windows of the copy
    are dirty or in flight at a time, instead of gigabytes that a database's next fsync would queue
    behind (ext4 data=ordered: a journal commit writes out the ordered data first). Falls back to
    fdatasync per window where sync_file_range(2) is missing."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending: tuple[int, int] | None = None  # the window whose writeback was started last

    def _sync(self, offset: int, length: int, flags: int) -> None:
        if _sync_file_range is None:
            if flags & SYNC_FILE_RANGE_WAIT_AFTER:
                os.fdatasync(self.fd)
            return
        if _sync_file_range(self.fd, offset, length, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def wrote(self, offset: int, length: int) -> None:
        """[offset, offset + length) was just written."""
        self._sync(offset, length, SYNC_FILE_RANGE_WRITE)  # start it, don't wait
        self.finish()
        self.pending = (offset, length)

    def finish(self) -> None:
        """Wait until the window started last is on disk."""
        if self.pending is not None:
            offset, length = self.pending
            self._sync(offset, length, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)
            self.pending = None


def supports_reflink(root: Path) -> bool:
    """Try one FICLONE inside ``root``; the only trustworthy test (XFS without reflink=1 says no)."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".reflink-probe-") as tmp:
        src, dst = Path(tmp, "a"), Path(tmp, "b")
        src.write_bytes(b"x" * 4096)
        with open(src, "rb") as s, open(dst, "wb") as d:
            try:
                fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
            except OSError:
                return False
    return True


_REFLINK_BY_DEV: dict[int, bool] = {}


def reflink_at(where: Path) -> bool:
    """supports_reflink, probed once per filesystem (device): a data root's filesystem does not
    change under a running process."""
    dev = where.stat().st_dev
    if dev not in _REFLINK_BY_DEV:
        _REFLINK_BY_DEV[dev] = supports_reflink(where)
    return _REFLINK_BY_DEV[dev]


def reflink_fd(src: int, dst: int) -> bool:
    """Make ``dst`` a reflink of ``src`` (FICLONE); False where the filesystem cannot."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
            raise
        return False
    return True


def copy_bytes(src: int, dst: int, length: int | None = None, *, in_user_space: bool = False,
               progress: Progress | None = None) -> int:
    """Copy the first ``length`` bytes of ``src`` (to its end when None) into ``dst``, written back
    window by window (WriteBehind). ``in_user_space``: read and write here rather than with
    copy_file_range, which may reflink (XFS) -- and a reflink locks the source inode against a
    writer's appends for as long as it takes."""
    window = write_behind_bytes()
    chunk, behind = window or CHUNK, WriteBehind(dst) if window else None
    done = 0
    while length is None or done < length:
        want = chunk if length is None else min(chunk, length - done)
        n = (os.write(dst, os.pread(src, want, done)) if in_user_space
             else os.copy_file_range(src, dst, want, offset_src=done))
        if n == 0:
            if length is None:
                break
            raise RuntimeError(f"the source ended at {done} of {length} bytes")
        if behind is not None:
            behind.wrote(done, n)
        done += n
        if progress:
            progress(n)
    if behind is not None:
        behind.finish()
    return done


def copy_file(src: str, dst: str, reflink: bool, progress: Progress | None = None) -> int:
    """``src`` into a new ``dst``: a reflink when asked and the filesystem can, else a paced copy."""
    return _copy_from(safefiles.open_file(src), dst, reflink, progress)


def _copy_from(src_fd: int, dst: str, reflink: bool, progress: Progress | None) -> int:
    """The open ``src_fd`` (closed here) into a new ``dst``, as copy_file."""
    with open(src_fd, "rb") as s, open(dst, "wb") as d:
        if reflink and reflink_fd(s.fileno(), d.fileno()):
            size = os.fstat(s.fileno()).st_size
            if progress:
                progress(size)
            return size
        return copy_bytes(s.fileno(), d.fileno(), progress=progress)


def reflink_file(src: str, dst: str) -> bool:
    """A new ``dst``, a reflink of ``src`` with its owner, mode and times; False (and no ``dst``)
    where the filesystem cannot -- never a byte copy, which could tear a page written meanwhile."""
    st = os.stat(src, follow_symlinks=False)
    with open(safefiles.open_file(src), "rb") as s, open(dst, "xb") as d:
        done = reflink_fd(s.fileno(), d.fileno())
    if not done:
        os.unlink(dst)
        return False
    _copy_meta(dst, st)
    return True


class TreeFlusher:
    """Writes back, window by window, what other writers (pg_basebackup) leave dirty below a tree:
    each pass flushes every regular file from where the last pass stopped to its current end. Run
    passes while the writer writes (``running``) so its dirty data never piles up, and one after."""

    def __init__(self, root: Path, window: int) -> None:
        self.root, self.window = root, window
        self.flushed: dict[str, int] = {}  # path -> bytes known written back

    def flush_pass(self) -> int:
        """One pass over the tree; returns bytes written back."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not hang us
                except OSError:
                    continue  # gone, renamed or a symlink: nothing of ours to flush
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    size = st.st_size
                    start = self.flushed.get(path, 0)
                    if size <= start:
                        continue
                    behind = WriteBehind(fd)
                    for off, length in write_behind_windows(size - start, self.window):
                        behind.wrote(start + off, length)
                    behind.finish()
                    self.flushed[path] = size
                    total += size - start
                finally:
                    os.close(fd)
        return total

    @contextlib.contextmanager
    def running(self, pause_s: float = 0.05) -> Iterator[None]:
        """Passes in a thread while the block runs; a last one after it."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(pause_s):
                self.flush_pass()

        thread = threading.Thread(target=loop, name="tree-flusher", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        self.flush_pass()


def flush_tree(root: Path, window: int | None = None) -> int:
    """Write back what is dirty below ``root`` a window at a time (ENVCLONE_COPY_WRITE_BEHIND_MIB;
    nothing when that is 0). Returns bytes passed over."""
    window = write_behind_bytes() if window is None else window
    return TreeFlusher(root, window).flush_pass() if window else 0


def _copy_meta(dst: str, st: os.stat_result) -> None:
    if os.geteuid() == 0:
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _walk_at(root: Path, ignore: Ignore | None) -> Iterator[tuple[str, os.stat_result, int, str]]:
    """Yield (relpath, stat, dir fd, name) for everything below root, directories before their
    contents. Walked by directory fds (fwalk): a directory the volume's account swaps for a link
    while we walk is never entered, so every entry is one of the tree's own. The dir fd is open
    until the next entry: open an entry by (name, dir_fd=...), never by its path."""
    try:
        os.close(safefiles.open_dir(root))  # ELOOP on a link
    except FileNotFoundError:
        return
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        keep = []
        for name in sorted(dirnames):
            rel = os.path.join(rel_dir, name)
            if ignore and ignore(rel):
                continue
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we walked (a live tree during pre-copy)
            if not stat.S_ISLNK(st.st_mode):
                keep.append(name)  # a symlink to a directory is copied as a link, not followed
            yield rel, st, dirfd, name
        dirnames[:] = keep
        for name in sorted(filenames):
            rel = os.path.join(rel_dir, name)
            if ignore and ignore(rel):
                continue
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield rel, st, dirfd, name


def _walk(root: Path, ignore: Ignore | None) -> Iterator[tuple[str, os.stat_result]]:
    """(relpath, stat) of everything below root, as _walk_at."""
    for rel, st, _, _ in _walk_at(root, ignore):
        yield rel, st


def fingerprint(root: Path, ignore: Ignore | None = None) -> dict[str, tuple[int, int, int]]:
    """(type, size, mtime) of everything below root: equal before and after a copy of a live but
    write-paused tree means nothing changed under the copy."""
    # A directory's own times change when a file beside the copy comes and goes (an ignored one,
    # such as an online copy's RDB); what it holds is in the fingerprint entry by entry.
    return {rel: (stat.S_IFMT(st.st_mode), 0, 0) if stat.S_ISDIR(st.st_mode)
            else (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns) for rel, st in _walk(root, ignore)}


def tree_size(root: Path, ignore: Ignore | None = None) -> int:
    return sum(st.st_size for _, st in _walk(root, ignore) if stat.S_ISREG(st.st_mode))


def _copy_entry(dirfd: int, name: str, dst_root: Path, rel: str, st: os.stat_result, reflink: bool,
                progress: Progress | None) -> int:
    """The entry ``name`` of the directory open as ``dirfd`` (from _walk_at) to ``dst_root/rel``."""
    dst = os.path.join(dst_root, rel)
    if stat.S_ISDIR(st.st_mode):
        os.makedirs(dst, exist_ok=True)
        return 0
    if os.path.lexists(dst) and (stat.S_ISLNK(st.st_mode) or os.path.isdir(dst)):
        shutil.rmtree(dst) if os.path.isdir(dst) and not os.path.islink(dst) else os.unlink(dst)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=dirfd), dst)
        _copy_meta(dst, st)
        return 0
    if stat.S_ISREG(st.st_mode):
        n = _copy_from(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd), dst, reflink,
                       progress)
        _copy_meta(dst, st)
        return n
    return 0  # sockets, fifos: runtime artefacts, never part of a volume's data


def _fix_dir_meta(src_root: Path, dst_root: Path, dirs: list[tuple[str, os.stat_result]]) -> None:
    # Directory mtimes change as their contents are written, so set them last, deepest first.
    for rel, st in sorted(dirs, key=lambda item: item[0].count(os.sep), reverse=True):
        _copy_meta(os.path.join(dst_root, rel), st)
    _copy_meta(str(dst_root), os.lstat(src_root))


def copy_tree(src_root: Path, dst_root: Path, *, reflink: bool, progress: Progress | None = None,
              ignore: Ignore | None = None, live: bool = False) -> int:
    """Copy ``src_root`` to a new ``dst_root`` preserving modes, owners and times. Returns bytes.
    ``live``: the tree is in use (pre-copy), so a file may vanish under us; skip it, the delta pass
    inside the window settles what the stopped tree holds."""
    dst_root.mkdir(parents=True, exist_ok=False)
    total, dirs = 0, []
    for rel, st, dirfd, name in _walk_at(src_root, ignore):
        try:
            total += _copy_entry(dirfd, name, dst_root, rel, st, reflink, progress)
        except FileNotFoundError:
            if not live:
                raise
            continue
        if stat.S_ISDIR(st.st_mode):
            dirs.append((rel, st))
    if live:
        dirs = [(rel, st) for rel, st in dirs if os.path.isdir(os.path.join(src_root, rel))]
    _fix_dir_meta(src_root, dst_root, dirs)
    return total


def precopy_tree(src_root: Path, dst_root: Path, *, ignore: Ignore | None = None) -> int:
    """Copy a live tree ahead of the window; files touched too recently are left for the delta pass."""
    started_ns = time.time_ns()
    n = copy_tree(src_root, dst_root, reflink=False, ignore=ignore, live=True)
    for rel, st in _walk(dst_root, None):
        if stat.S_ISREG(st.st_mode) and st.st_mtime_ns > started_ns - MODIFY_WINDOW_NS:
            os.unlink(os.path.join(dst_root, rel))  # untrusted: copy again inside the window
    return n


def sync_tree(src_root: Path, dst_root: Path, *, ignore: Ignore | None = None) -> int:
    """Make ``dst_root`` equal to ``src_root`` copying only files whose size or mtime differ,
    and deleting what the source no longer has. Returns bytes copied."""
    seen: set[str] = set()
    total, dirs = 0, []
    for rel, st, dirfd, name in _walk_at(src_root, ignore):
        seen.add(rel)
        dst = os.path.join(dst_root, rel)
        if stat.S_ISDIR(st.st_mode):
            if os.path.lexists(dst) and not os.path.isdir(dst):
                os.unlink(dst)
            os.makedirs(dst, exist_ok=True)
            dirs.append((rel, st))
            continue
        try:
            dst_st = os.lstat(dst)
            same = (stat.S_IFMT(dst_st.st_mode) == stat.S_IFMT(st.st_mode)
                    and dst_st.st_size == st.st_size and dst_st.st_mtime_ns == st.st_mtime_ns)
        except FileNotFoundError:
            same = False
        if not same:
            if os.path.lexists(dst) and not os.path.isdir(dst):
                os.unlink(dst)
            total += _copy_entry(dirfd, name, dst_root, rel, st, False, None)
    for rel, _st in sorted(_walk(dst_root, None), key=lambda item: item[0], reverse=True):
        if rel not in seen:
            path = os.path.join(dst_root, rel)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
    _fix_dir_meta(src_root, dst_root, dirs)
    return total
