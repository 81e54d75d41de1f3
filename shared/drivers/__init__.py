"""Node drivers: the interface every workflow step calls, and its implementations."""

from shared.drivers.base import (
    Driver,
    DriverError,
    Health,
    NodeSpec,
    PermanentDriverError,
    Rewrite,
    SnapshotInfo,
    TransientDriverError,
)


def get_driver() -> Driver:
    """The configured driver. Only the local driver exists today."""
    from shared.config import get_settings
    from shared.drivers.local import LocalDriver

    return LocalDriver(get_settings().data_dir, node_user=get_settings().node_user)


__all__ = [
    "Driver",
    "DriverError",
    "Health",
    "NodeSpec",
    "PermanentDriverError",
    "Rewrite",
    "SnapshotInfo",
    "TransientDriverError",
    "get_driver",
]
