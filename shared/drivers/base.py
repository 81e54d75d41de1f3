"""The driver interface. Every operation is idempotent and keyed by stable ids, so a step that runs
twice (redelivery, retry) finds what the first run made instead of making it again.

A Docker, LXD/Incus or cloud driver implements the same methods: "volume" becomes a disk or
dataset, "snapshot" a storage snapshot, "address" a NIC/IP assignment."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.leaks import DEFAULT_LIMITS, Needles, ScanLimits, ScanResult

ProgressFn = Callable[[int, int], None]  # (bytes_done, bytes_total)


class DriverError(Exception):
    """Base for driver failures; ``transient`` says whether a retry may help."""

    transient = False


class TransientDriverError(DriverError):
    transient = True


class PermanentDriverError(DriverError):
    transient = False


class ActionFailed(PermanentDriverError):
    """An on_clone action failed; ``done`` reports the actions of the call that ran before it."""

    def __init__(self, message: str, done: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.done = done


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    stack: str
    address: str
    port: int
    config: dict[str, str] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=dict)  # empty: the stack makes its own
    owner: str | None = None  # the account the node runs as (its environment's)


@dataclass(frozen=True)
class Health:
    running: bool
    healthy: bool
    detail: str = ""


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    method: str  # "reflink" | "copy" | "delta"
    size_bytes: int
    window_ms: int  # time spent inside the quiesce window


@dataclass(frozen=True)
class Rewrite:
    file: str  # path relative to the node's volume
    old: str
    new: str
    count: int
    secret: bool = False  # a credential: never shown, only counted


class Driver(ABC):
    @property
    @abstractmethod
    def reflink(self) -> bool:
        """Whether a snapshot shares its blocks with the volume (copy-on-write), as probed on the host."""

    @abstractmethod
    def create_node(self, spec: NodeSpec) -> None:
        """Make the node's volume and initialise its stack (not started)."""

    @abstractmethod
    def start(self, node_id: str) -> None:
        """Start the node's process if it is not running (does not wait for health)."""

    @abstractmethod
    def stop(self, node_id: str) -> None:
        """Stop the node gracefully; no-op if stopped."""

    @abstractmethod
    def health(self, node_id: str) -> Health: ...

    @abstractmethod
    def wait_healthy(self, node_id: str, timeout: float) -> None:
        """Block until healthy; TransientDriverError on timeout."""

    @abstractmethod
    def prepare_snapshot(self, node_id: str, snapshot_id: str) -> int:
        """Slow work done while the node still runs (pre-copy). Returns bytes pre-copied."""

    @abstractmethod
    def quiesce(self, node_id: str) -> None:
        """Stack-aware consistent quiesce: flush, then shut down -- or, for a stack that can, hold
        writes while reads go on (bounded by the server's own timer)."""

    @abstractmethod
    def quiesced(self, node_id: str) -> bool:
        """Whether the node is held still: stopped, or running with its writes paused."""

    @abstractmethod
    def snapshot(self, node_id: str, snapshot_id: str) -> SnapshotInfo:
        """Capture the quiesced node's volume as an immutable snapshot (the cheap in-window part)."""

    @abstractmethod
    def snapshot_online(self, node_id: str, snapshot_id: str) -> SnapshotInfo:
        """Capture a consistent copy while the node serves, refusing nothing (stacks that can)."""

    @abstractmethod
    def restart(self, node_id: str, timeout: float) -> None:
        """Resume writes or start the node, and wait until it is healthy."""

    @abstractmethod
    def provision(self, snapshot_id: str, node_id: str, progress: ProgressFn | None = None,
                  owner: str | None = None, consume: bool = False) -> int:
        """Make a new node's volume from a snapshot, owned by ``owner``. Returns bytes copied.
        ``consume``: the snapshot exists for this node alone (received from another host, or kept
        on this one by nothing): its files become the volume, and it is gone afterwards. Safe to
        repeat: a re-run after a crash finds the files where the last one moved them."""

    @abstractmethod
    def set_credentials(self, node_id: str, credentials: dict[str, str]) -> None:
        """Make a stopped node accept these credentials and no others (before a clone first starts)."""

    @abstractmethod
    def assign_address(self, node_id: str, address: str, port: int) -> None:
        """Write the node's own bind address into its launch config."""

    @abstractmethod
    def rewrite_config(self, node_id: str, address_map: dict[str, str],
                       secret_map: dict[str, str] | None = None) -> list[Rewrite]:
        """Replace every old address (and old credential) by its new one in the config files the
        node's stack declares."""

    @abstractmethod
    def run_clone_actions(self, node_id: str, actions: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
        """Run on_clone actions ((kind, payload), in order) on a stopped clone node before it first
        serves: on its files, or on a private start of its server reachable by no address (stopped
        again before this returns). Returns what each did; ActionFailed on the first failure."""

    @abstractmethod
    def scan_for_leaks(self, node_id: str, needles: Needles, limits: ScanLimits = DEFAULT_LIMITS) -> ScanResult:
        """Search the node's config files and the other text files of its volume for ``needles``."""

    @abstractmethod
    def destroy_node(self, node_id: str) -> None:
        """Stop the node and delete its volume; no-op if absent."""

    @abstractmethod
    def delete_snapshot(self, snapshot_id: str) -> None: ...

    @abstractmethod
    def node_ids(self) -> set[str]:
        """Every node volume this driver holds (for reconciliation and leak checks)."""

    @abstractmethod
    def snapshot_ids(self) -> set[str]: ...

    def partial_snapshot_ids(self) -> set[str]:
        """Snapshots begun or being received here and not finished."""
        return set()

    def node_owner(self, node_id: str) -> str | None:
        """The account a node runs as (None: the driver's default)."""
        return None

    @abstractmethod
    def volume_size(self, node_id: str) -> int:
        """Bytes of data a snapshot of this node would hold (0 if the node does not exist)."""

    @abstractmethod
    def url(self, node_id: str) -> str:
        """The connection URL clients use for the node."""
