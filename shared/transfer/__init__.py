"""Moving a finished snapshot from one host's agent straight to another's over HTTP: signed with
the per-cluster secret, verified file by file with SHA-256, resumable after the receiver dies.

    server = TransferServer(snaps_dir, secret, host, port).start()      # on the source host
    pull(server.url, secret, snapshot_id, dest_snaps_dir)                # on the destination host
"""

from shared.transfer.client import PullResult, pull
from shared.transfer.manifest import ChecksumMismatch, Entry, Manifest, TransferError
from shared.transfer.server import TransferServer

__all__ = ["ChecksumMismatch", "Entry", "Manifest", "PullResult", "TransferError", "TransferServer", "pull"]
