"""This agent's end of snapshot transfers between hosts (shared.transfer does the moving): serving
its snapshots to other agents, and fetching a snapshot that lives on another host into its own
snapshot store, so provisioning is always a local copy or reflink."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.config import Settings, get_settings
from shared.drivers import PermanentDriverError, ProgressFn, TransientDriverError
from shared.drivers.local import LocalDriver

if TYPE_CHECKING:
    from shared.transfer import PullResult, TransferServer


def _secret(settings: Settings) -> str:
    if not settings.cluster_secret:
        raise PermanentDriverError("ENVCLONE_CLUSTER_SECRET is not set: agents cannot move snapshots between hosts")
    return settings.cluster_secret


def serve_snapshots(settings: Settings | None = None) -> TransferServer:
    from shared.transfer import TransferServer

    settings = settings or get_settings()
    host, _, port = settings.transfer_bind.rpartition(":")
    server = TransferServer(LocalDriver(settings.data_dir).snaps_dir, _secret(settings), host, int(port),
                            max_rate=settings.transfer_max_rate or None)
    server.start()
    return server


def fetch_snapshot(snapshot_id: str, source_url: str, progress: ProgressFn | None = None) -> PullResult:
    """Pull ``snapshot_id`` from the agent at ``source_url`` into this host's snapshot store. Files
    already received and verified by an earlier attempt are not sent again."""
    from shared.transfer import ChecksumMismatch, TransferError, pull

    settings = get_settings()
    try:
        return pull(source_url, _secret(settings), snapshot_id, LocalDriver(settings.data_dir).snaps_dir, progress)
    except ChecksumMismatch as exc:
        raise TransientDriverError(f"snapshot {snapshot_id} arrived damaged: {exc}") from exc
    except TransferError as exc:
        error = TransientDriverError if exc.retryable else PermanentDriverError
        raise error(f"fetching snapshot {snapshot_id} from {source_url} failed: {exc}") from exc
