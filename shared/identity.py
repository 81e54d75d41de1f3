"""An identity per environment: its nodes run as a Unix account of its own, made when its first
node is made and removed with the environment. Without root, nodes run as envclone's own user
(there is no one else to be), which `envclone up` says once."""

from __future__ import annotations

import logging
import os
import pwd
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_random

from shared import fence, filelock

log = logging.getLogger("envclone.identity")
USERADD_EXISTS, USERDEL_MISSING, PASSWD_BUSY = 9, 6, 10  # shadow-utils exit codes
ACCOUNTS_LOCK = "/run/lock/envclone-accounts.lock" if os.path.isdir("/run/lock") else "/tmp/envclone-accounts.lock"


def can_switch_users() -> bool:
    return os.geteuid() == 0


def uid_of(environment_id: str) -> int | None:
    try:
        return pwd.getpwnam(account_name(environment_id)).pw_uid
    except KeyError:
        return None


def account_name(environment_id: str) -> str:
    return f"ec-{environment_id[:24]}"  # useradd allows 32 characters


def ensure_account(environment_id: str) -> str | None:
    """The environment's account (made if missing); None when envclone cannot switch users."""
    if not can_switch_users():
        return None
    name = account_name(environment_id)
    try:
        pwd.getpwnam(name)
        return name
    except KeyError:
        pass
    argv = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", name]
    try:  # the account files are locked while another environment's account is made or removed
        with _accounts_locked():
            done = Retrying(retry=retry_if_result(lambda d: d.returncode == PASSWD_BUSY), stop=stop_after_delay(120),
                            wait=wait_random(0.05, 0.5))(subprocess.run, argv, capture_output=True, text=True,
                                                          check=False)
    except RetryError as exc:
        done = exc.last_attempt.result()
    if done.returncode not in (0, USERADD_EXISTS):  # another worker may have made it a moment ago
        raise RuntimeError(f"useradd {name} failed: {done.stderr.strip()}")
    return name


@contextmanager
def _accounts_locked() -> Iterator[None]:
    """One envclone process at a time changes the account files. shadow-utils' own lock names its
    holder by pid, and a useradd in another PID namespace (hosts on one machine) sees that pid as
    dead, takes the lock as stale and writes /etc/passwd over the other's change. flock is the
    kernel's, whatever the namespace."""
    with filelock.held(ACCOUNTS_LOCK):
        yield


def _kill_processes_of(uid: int) -> None:
    """What still runs as the account once its nodes are destroyed is a leftover (a server's child
    that outlived it): it goes with the account."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                os.kill(int(entry), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            continue


def remove_account(environment_id: str) -> None:
    """Remove the environment's account once its nodes are gone (a failure is logged, not raised:
    an account without files or processes gives no access)."""
    if not can_switch_users():
        return
    name = account_name(environment_id)
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    fence.remove(uid)  # the uid may be given to another environment next

    def attempt() -> subprocess.CompletedProcess[str]:
        _kill_processes_of(uid)
        return subprocess.run(["userdel", name], capture_output=True, text=True, check=False)

    try:  # a killed process may take a moment to be gone from the process table
        with _accounts_locked():
            Retrying(retry=retry_if_result(lambda done: done.returncode not in (0, USERDEL_MISSING)),
                     stop=stop_after_delay(120), wait=wait_random(0.05, 0.5))(attempt)
    except RetryError as exc:
        log.warning("userdel %s failed: %s", name, exc.last_attempt.result().stderr.strip())


def remove_account_named(name: str) -> None:
    """An environment's account known only by name (a host's sweep finds it on a leftover volume)."""
    if name.startswith("ec-"):
        remove_account(name[3:])
