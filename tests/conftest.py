"""Fixtures that start and stop real things: a data root, a fresh PostgreSQL database, the driver."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from tests.helpers import processes_under, wait_for

if TYPE_CHECKING:
    from tests.stack import Backend

PG_ADMIN_URL = os.environ.get("ENVCLONE_TEST_PG", "postgresql://root@127.0.0.1:5432/postgres")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked ``long`` first, each module's tests kept together and in order. xdist hands
    out whole files in collection order (``make test`` passes --no-loadscope-reorder; by default it
    orders files by their count of tests, which put the longest file, two tests, near the end),
    so the files left for the end are short ones and no worker idles while another runs a long one."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def make_data_root(prefix: str = "envclone-test-") -> Path:
    # Not pytest's tmp_path: it is 0700 under /tmp/pytest-of-root, and node processes run as an
    # unprivileged user that must reach its volume.
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    return root


def destroy_everything(root: Path) -> list[tuple[int, str]]:
    """Destroy every node through the driver, then return (and kill) any process that survived."""
    from shared.drivers.local import LocalDriver

    driver = LocalDriver(root)
    for node_id in driver.node_ids():
        driver.destroy_node(node_id)
    leftovers = processes_under(root)
    for pid, _cmd in leftovers:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    shutil.rmtree(root, ignore_errors=True)
    return leftovers


@pytest.fixture
def data_root() -> Iterator[Path]:
    root = make_data_root()
    yield root
    leftovers = destroy_everything(root)
    assert not leftovers, f"processes the driver failed to stop: {leftovers}"
    assert not root.exists()


def _xfs_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount an XFS loop image"
    if not shutil.which("mkfs.xfs"):
        return "mkfs.xfs not installed (apt-get install xfsprogs)"
    if "xfs" not in Path("/proc/filesystems").read_text():
        return "kernel has no XFS"
    return None


@pytest.fixture
def xfs_root() -> Iterator[Path]:
    """A 512 MiB XFS loop image with reflink, mounted for the test (skips where that cannot be)."""
    reason = _xfs_unavailable()
    if reason:
        pytest.skip(reason)
    work = make_data_root("envclone-xfs-")
    image, mnt = work / "xfs.img", work / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(512 * 1024 * 1024)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        shutil.rmtree(work)
        pytest.skip(f"cannot loop-mount here: {mounted.stderr.strip()}")
    mnt.chmod(0o755)
    try:
        yield mnt
    finally:
        destroy_everything(mnt / "var")
        subprocess.run(["umount", str(mnt)], check=True)
        shutil.rmtree(work)


@pytest.fixture
def driver(data_root: Path):
    from shared.drivers.local import LocalDriver

    return LocalDriver(data_root)


def create_database() -> tuple[str, str]:
    name = f"envclone_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return name, f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A real back end for the whole module: fresh state database, own Redis database, a real worker.
    A module shapes it with ``BACKEND = {...}`` (Backend's keyword arguments: pool, concurrency,
    extra_env...); ``BEAT = True`` also starts celery beat (the watchdog)."""
    from tests.stack import Backend

    with Backend(**getattr(request.module, "BACKEND", {})) as b:
        if getattr(request.module, "BEAT", False):
            b.start_beat()
        yield b


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database; dropped afterwards."""
    from shared.migrate import upgrade

    name, url = create_database()
    upgrade(url)
    yield url
    drop_database(name)


__all__ = ["wait_for"]
