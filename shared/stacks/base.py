"""What a stack is: how to initialise, launch, health-check, quiesce and address one kind of server.
Stacks are operator-owned code; API callers only ever pick one by name."""

from __future__ import annotations

import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

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

    def init(self, ctx: NodeContext, config: dict[str, str]) -> None:
        """Create the stack's files in a fresh volume (runs once, before the first start)."""
        ctx.data_dir.mkdir(parents=True, exist_ok=True)
        ctx.config_dir.mkdir(parents=True, exist_ok=True)

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

    def resume_writes(self, ctx: NodeContext) -> None:
        """(online_quiesce) Let writes through again; harmless when they are not held."""

    @abstractmethod
    def url(self, ctx: NodeContext) -> str: ...
