"""What a stack is: how to initialise, launch, health-check, quiesce and address one kind of server.
Stacks are operator-owned code; API callers only ever pick one by name."""

from __future__ import annotations

import json
import secrets
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from shared import safefiles
from shared.drivers.process import RunAs


@dataclass(frozen=True)
class NodeContext:
    """Everything a stack needs to act on one node of the local driver."""

    volume: Path
    address: str
    port: int
    run_as: RunAs | None

    @property
    def data_dir(self) -> Path:
        return self.volume / "data"

    @property
    def config_dir(self) -> Path:
        return self.volume / "config"

    @property
    def secrets_path(self) -> Path:
        return self.config_dir / "secrets.json"

    def secrets(self) -> dict[str, str]:
        try:
            return json.loads(safefiles.read_text(self.secrets_path))
        except FileNotFoundError:
            return {}


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (secrets, server configs holding them), atomically,
    and never through a link the node's account put there (shared/safefiles.py)."""
    safefiles.replace_file(path, text.encode(), 0o600)


Credentials = Mapping[str, str]
CopyTree = Callable[[Path, Path, Callable[[str], bool]], int]


@dataclass(frozen=True)
class OnlineCopy:
    """What an online copy did: ``method`` names a method of the stack's own that did not use the
    driver's tree copy for the data (it names the snapshot's method: ``online-<method>``);
    ``held_ms`` is how long the source's writes were held (a pause of a few ms), 0 when never."""

    method: str | None = None
    held_ms: int = 0


class Stack(ABC):
    name: str
    default_port: int
    stop_signal: int = signal.SIGTERM
    # Config files (relative to the volume) that may hold other nodes' addresses.
    config_files: tuple[str, ...] = ()
    # Worth a pre-copy before the window (on filesystems without reflink): many rarely changed files.
    precopy: bool = True
    # The server will not run as root (PostgreSQL): it must get the unprivileged node user.
    refuses_root: bool = False
    # Quiesce without stopping: the server holds every write while it keeps answering reads, and
    # the restart is a resume -- no dataset to reload, so the window is as short as the copy.
    online_quiesce: bool = False
    # Can be copied while it serves, refusing nothing (``online_copy``): a clone's default.
    online_copy_supported: bool = False
    # Its online copy must run alone at the node: two of them, or one beside another job's held
    # window, get in each other's way. Others run side by side, just never inside a held window.
    online_copy_exclusive: bool = False
    # Files the server writes beside its state, which a held copy neither needs nor may see change
    # (globs on volume-relative paths).
    side_files: tuple[str, ...] = ()
    # What the server owns (globs on volume-relative paths; a directory's ends in "/"): its database
    # files and what it rewrites at every start. The leak scan leaves them out.
    server_files: tuple[str, ...] = ()
    # on_clone actions it runs before a clone first serves: on its stopped files ("config"), or on
    # a private start of its server that listens on no address ("sql", "delete_keys").
    file_actions: frozenset[str] = frozenset()
    server_actions: frozenset[str] = frozenset()

    def new_credentials(self, previous: Credentials | None = None, rename_users: bool = False) -> dict[str, str]:
        """Fresh credentials for a node of this stack (a clone's differ from ``previous`` in every
        secret; ``rename_users`` also renames the application user). Pure: plans call it."""
        return {}

    def url(self, address: str, port: int, credentials: Credentials, secret: bool = True) -> str:
        """The connection URL; ``secret=False`` leaves the password out (what responses show)."""
        return f"tcp://{address}:{port}"

    def init(self, ctx: NodeContext, config: dict[str, str], credentials: Credentials) -> None:
        """Create the stack's files in a fresh volume (runs once, before the first start)."""
        ctx.data_dir.mkdir(parents=True, exist_ok=True)
        ctx.config_dir.mkdir(parents=True, exist_ok=True)
        if credentials:
            write_private(ctx.secrets_path, json.dumps(dict(credentials)))

    def apply_credentials(self, ctx: NodeContext, credentials: Credentials) -> None:
        """Make a stopped node accept ``credentials`` and nothing else (a clone's, before its first
        start: no client can connect in between). Idempotent."""
        if credentials:
            write_private(ctx.secrets_path, json.dumps(dict(credentials)))

    def first_start(self, ctx: NodeContext) -> None:
        """One-time setup that needs the server running (e.g. create the application database)."""

    @abstractmethod
    def command(self, ctx: NodeContext) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment to launch the server in the foreground."""

    @abstractmethod
    def check(self, ctx: NodeContext) -> str:
        """A real protocol check; returns a short detail, raises on failure."""

    def quiesce(self, ctx: NodeContext) -> bool:
        """Begin a consistent shutdown. True: the server was asked to stop itself (the driver waits
        for it to exit); False: the driver sends ``stop_signal``."""
        return False

    def settle(self, ctx: NodeContext) -> None:
        """Before the window, while serving: let background work that would otherwise be waited
        for inside the window finish first (e.g. a rewrite of the persistence files)."""

    def pause_writes(self, ctx: NodeContext, hold_s: float) -> None:
        """(online_quiesce) Hold writes for at most ``hold_s`` -- the server lets them go by itself
        after that, so a lost worker can never leave a source held -- and return once everything
        acknowledged before the pause is in the volume's files."""
        raise NotImplementedError

    def writes_paused(self, ctx: NodeContext) -> bool:
        """(online_quiesce) Whether writes are held right now."""
        return False

    def online_copy(self, ctx: NodeContext, dest: Path, copy: CopyTree) -> OnlineCopy:
        """(online_copy_supported) Copy the serving node's volume into ``dest`` so that the copy
        starts as one consistent moment. ``copy(src, dst, ignore)`` copies a tree (reflink when it
        can)."""
        copy(ctx.volume, dest, lambda rel: rel == "run" or rel.startswith("run/"))
        return OnlineCopy()

    def resume_writes(self, ctx: NodeContext) -> None:
        """(online_quiesce) Let writes through again; harmless when they are not held."""


    def server_owned(self, rel: str) -> bool:
        return any(fnmatchcase(rel, pattern) for pattern in self.server_files)

    def file_action(self, ctx: NodeContext, kind: str, payload: Any) -> dict[str, Any]:
        """Run an on_clone action on the stopped node's files; returns what to report (no secret)."""
        raise NotImplementedError(f"{self.name} runs no {kind!r} action")

    def private_command(self, ctx: NodeContext, sockdir: Path) -> tuple[list[str], dict[str, str]]:
        """argv and environment of a private start: no TCP listener, a Unix socket in ``sockdir``
        (0700, the node account's) the only way in. Files it needs go into ``sockdir``."""
        raise NotImplementedError(f"{self.name} has no private start")

    def private_check(self, ctx: NodeContext, sockdir: Path) -> None:
        """Raises until the private server answers on its socket."""
        raise NotImplementedError

    def server_action(self, ctx: NodeContext, sockdir: Path, kind: str, payload: Any) -> dict[str, Any]:
        """Run an on_clone action against the private server; returns what to report (no secret)."""
        raise NotImplementedError(f"{self.name} runs no {kind!r} action")


class DatabaseStack(Stack):
    """A database server with a superuser and an application user that owns database ``app``; its
    URL is ``scheme://user:password@address:port/app``."""

    scheme: str
    superuser: str
    app_user = app_db = "app"

    def new_credentials(self, previous: Credentials | None = None, rename_users: bool = False) -> dict[str, str]:
        user = (previous or {}).get("username", self.app_user)
        if rename_users:
            user = f"{self.app_user}_{secrets.token_hex(4)}"
        return {"username": user, "password": secrets.token_hex(16),
                "superuser": self.superuser, "superuser_password": secrets.token_hex(16)}

    def url(self, address: str, port: int, credentials: Credentials, secret: bool = True) -> str:
        user = credentials.get("username", self.app_user)
        auth = f"{user}:{credentials['password']}" if secret and credentials.get("password") else user
        return f"{self.scheme}://{auth}@{address}:{port}/{self.app_db}"
