"""Node drivers: the interface every workflow step calls, and its implementations."""

from shared.drivers.base import (
    ActionFailed,
    Driver,
    DriverError,
    Health,
    NodeSpec,
    PermanentDriverError,
    ProgressFn,
    Rewrite,
    SnapshotInfo,
    TransientDriverError,
)


def get_driver() -> Driver:
    """The configured driver. Only the local driver exists today."""
    from shared.config import get_settings
    from shared.drivers.local import LocalDriver

    settings = get_settings()
    return LocalDriver(settings.data_dir, node_user=settings.node_user, max_pause_s=settings.max_downtime_s)


__all__ = [
    "ActionFailed",
    "Driver",
    "DriverError",
    "Health",
    "NodeSpec",
    "PermanentDriverError",
    "ProgressFn",
    "Rewrite",
    "SnapshotInfo",
    "TransientDriverError",
    "get_driver",
]
