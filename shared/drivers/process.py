"""Detached node processes: spawn in their own session, track by pid file, stop with a deadline.

The pid file holds "pid starttime" so a recycled pid is never mistaken for our node."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from shared import safefiles

_children: list[subprocess.Popen[bytes]] = []


@dataclass(frozen=True)
class RunAs:
    uid: int
    gid: int
    home: str

    @classmethod
    def for_user(cls, name: str) -> RunAs | None:
        """The account node processes run as: ``name`` when we are root, else ourselves (None)."""
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise LookupError(f"no account {name!r} to run the node as") from None
        return cls(entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def chown_tree(self, root: Path) -> None:
        """Everything below ``root`` becomes the account's. Never through a link: the tree may be
        the account's already (a volume), and a directory it swapped for a link to /etc must not
        give it /etc. ``root`` itself must be a directory (ELOOP or ENOTDIR otherwise)."""
        fd = safefiles.open_dir(root)
        try:
            os.fchown(fd, self.uid, self.gid)
        finally:
            os.close(fd)
        for _dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
            for name in dirnames + filenames:
                try:
                    os.chown(name, self.uid, self.gid, dir_fd=dirfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed meanwhile by the account itself


def _reap() -> None:
    # Nodes we started are our children until we exit; collect the ones that ended.
    for child in list(_children):
        if child.poll() is not None:
            _children.remove(child)


def start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # zombie or dead: not running, whoever must reap it
        return None
    return fields[19]


def spawn(argv: list[str], *, cwd: Path, log_path: Path, pid_path: Path, env: dict[str, str],
          run_as: RunAs | None) -> int:
    """Start ``argv`` detached (own session, no controlling terminal) and record its pid file."""
    _reap()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        kwargs: dict[str, object] = {}
        if run_as is not None:
            kwargs = {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}
        child = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, umask=0o077, **kwargs,  # type: ignore[arg-type]
        )
    _children.append(child)
    record_pid(pid_path, child.pid)
    return child.pid


def record_pid(pid_path: Path, pid: int) -> None:
    """Write "pid starttime" to ``pid_path`` (in a directory only root writes), atomically."""
    tmp = pid_path.with_suffix(".tmp")
    tmp.write_text(f"{pid} {start_time(pid) or ''}\n")
    tmp.replace(pid_path)


def belongs_to(pid: int, uid: int, volume: Path) -> bool:
    """Whether ``pid`` runs as ``uid`` with its working directory in ``volume``: a node's own
    server, not a process a forged pid file names."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    real_uid = next((line.split()[1] for line in status.splitlines() if line.startswith("Uid:")), None)
    return real_uid == str(uid) and (cwd == str(volume) or cwd.startswith(f"{volume}/"))


def running_pid(pid_path: Path) -> int | None:
    """The pid recorded in ``pid_path`` if that very process is still alive."""
    _reap()
    try:
        pid_text, _, start = pid_path.read_text().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    current = start_time(pid)
    if current is None or (start and current != start):
        return None
    return pid


def wait_exit(pid_path: Path, timeout: float) -> bool:
    """Whether the process ended within ``timeout`` (a non-child's exit cannot be waited on: poll)."""
    try:
        Retrying(retry=retry_if_result(lambda pid: pid is not None), stop=stop_after_delay(timeout),
                 wait=wait_fixed(0.02))(running_pid, pid_path)
    except RetryError:
        return False
    return True


def terminate(pid_path: Path, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Send ``sig``, wait up to ``timeout``, then SIGKILL the whole session. Removes the pid file."""
    pid = running_pid(pid_path)
    if pid is not None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        if not wait_exit(pid_path, timeout):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_exit(pid_path, 5.0)
    pid_path.unlink(missing_ok=True)
