"""Snapshot transfer between two agents over HTTP: a real server (threads in this process, or its
own process), pulls in this process or in a subprocess killed with SIGKILL half-way."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.transfer import ChecksumMismatch, Manifest, TransferError, TransferServer, auth, pull
from shared.transfer.client import incoming_dir, read_journal
from shared.transfer.manifest import load_or_build
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

SECRET = "test-cluster-secret"
REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
ROOT = os.geteuid() == 0


def make_snapshot(snaps: Path, snap_id: str, files: dict[str, bytes]) -> Path:
    snap = snaps / snap_id
    for rel, data in files.items():
        (snap / "volume" / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / "volume" / rel).write_bytes(data)
    (snap / "meta.json").write_text(json.dumps({"snapshot_id": snap_id, "method": "copy", "size_bytes": 0}))
    return snap


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a faithful copy keeps, entry by entry (contents as SHA-256)."""
    out = {}
    for rel in [".", *sorted(str(p.relative_to(root)) for p in root.rglob("*"))]:
        p, st = root / rel, os.lstat(root / rel)
        if stat.S_ISLNK(st.st_mode):
            what: Any = ("link", os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            what = ("dir", stat.S_IMODE(st.st_mode))
        else:
            what = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
        out[rel] = (*what, st.st_mtime_ns, *((st.st_uid, st.st_gid) if ROOT else ()))
    return out


@pytest.fixture
def snaps(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    return tmp_path / "src"


@pytest.fixture
def server(snaps: Path) -> Iterator[TransferServer]:
    with TransferServer(snaps, SECRET) as srv:
        yield srv


def get(server: TransferServer, path: str, authorization: str | None = None) -> tuple[int, dict[str, Any]]:
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path, headers={"Authorization": authorization} if authorization else {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, json.loads(body) if resp.getheader("Content-Type") == "application/json" else {}


def test_round_trip_keeps_contents_modes_times_and_owners(snaps: Path, server: TransferServer,
                                                          tmp_path: Path) -> None:
    snap = make_snapshot(snaps, "snap1", {
        "a/b/c/deep.txt": b"deep\n", "empty": b"", "secret.key": b"k" * 100, "big.bin": os.urandom(5 * MIB + 17),
        "a/other": b"x"})
    vol = snap / "volume"
    os.symlink("a/b/c/deep.txt", vol / "link")
    os.symlink("/nonexistent/outside", vol / "a" / "dangling")
    (vol / "secret.key").chmod(0o600)
    (vol / "a" / "b").chmod(0o750)
    if ROOT:
        os.chown(vol / "a" / "other", 65534, 65534)
        os.chown(vol / "link", 65534, 65534, follow_symlinks=False)
    for i, p in enumerate(sorted(vol.rglob("*"), key=lambda p: -len(p.parts))):
        os.utime(p, ns=(1_600_000_000_000_000_000 + i * 1_000_003, 1_600_000_000_000_000_000 + i * 1_000_003),
                 follow_symlinks=False)
    os.utime(vol, ns=(1_500_000_000_123_456_789,) * 2)
    before = tree(vol)
    dest = tmp_path / "dst"
    seen: list[tuple[int, int]] = []

    result = pull(server.url, SECRET, "snap1", dest, progress=lambda d, t: seen.append((d, t)))
    total = sum((vol / f).stat().st_size for f in ("a/b/c/deep.txt", "empty", "secret.key", "big.bin", "a/other"))
    assert (result.bytes_received, result.bytes_total, result.files_fetched, result.files_skipped) == (
        total, total, 5, 0)
    assert server.bytes_sent == total
    assert seen[-1] == (total, total)
    assert tree(dest / "snap1" / "volume") == before == tree(vol)  # the source is untouched too
    assert (dest / "snap1" / "meta.json").read_bytes() == (snap / "meta.json").read_bytes()
    assert (dest / "snap1" / "manifest.json").read_text() == (snap / "manifest.json").read_text()
    assert sorted(os.listdir(dest)) == ["snap1"]  # no staging dir, journal or lock left behind
    assert sorted(os.listdir(dest / "snap1")) == ["manifest.json", "meta.json", "volume"]

    again = pull(server.url, SECRET, "snap1", dest)
    assert (again.bytes_received, again.files_fetched, again.files_skipped) == (0, 0, 5)
    assert server.bytes_sent == total


def test_refuses_unsigned_wrong_and_expired_requests(snaps: Path, server: TransferServer, tmp_path: Path) -> None:
    make_snapshot(snaps, "snap1", {"f": b"data"})
    path = "/v1/snapshots/snap1/manifest"
    for header in (None, auth.sign("wrong-secret", "GET", path), auth.sign(SECRET, "GET", path, ttl_s=-5),
                   auth.sign(SECRET, "GET", "/v1/snapshots/snap1/files/f"), "Bearer abc", f"Envclone x:{'0' * 64}"):
        status, body = get(server, path, header)
        assert status == 401, header
        assert body["error"]["code"] == "unauthorized" and body["error"]["message"]
    assert get(server, path, auth.sign(SECRET, "GET", path))[0] == 200

    dest = tmp_path / "dst"
    with pytest.raises(TransferError) as err:
        pull(server.url, "wrong-secret", "snap1", dest)
    assert err.value.status == 401 and not err.value.retryable
    assert os.listdir(dest) == []
    assert server.bytes_sent == 0


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/v1/snapshots/snap1/files/nothere", 404, "file_not_found"),
    ("/v1/snapshots/snap1/files/dir", 404, "file_not_found"),  # a directory entry is not a file
    ("/v1/snapshots/snap1/files/link", 404, "file_not_found"),  # nor is a symlink
    ("/v1/snapshots/snap1/files/../meta.json", 400, "bad_path"),
    ("/v1/snapshots/snap1/files/dir/%2e%2e/%2e%2e/meta.json", 400, "bad_path"),
    ("/v1/snapshots/snap1/files//etc/passwd", 400, "bad_path"),
    ("/v1/snapshots/nosuch/manifest", 404, "snapshot_not_found"),
    ("/v1/snapshots/.snap2.staging/manifest", 400, "bad_snapshot_id"),
    ("/v1/snapshots/snap2/manifest", 404, "snapshot_not_found"),  # no meta.json: not finished
    ("/v1/other", 404, "not_found"),
])
def test_serves_only_manifest_files_of_finished_snapshots(snaps: Path, server: TransferServer, path: str,
                                                          status: int, code: str) -> None:
    make_snapshot(snaps, "snap1", {"dir/f": b"data"})
    os.symlink("/etc/passwd", snaps / "snap1" / "volume" / "link")
    (snaps / "snap2" / "volume").mkdir(parents=True)
    got, body = get(server, path, auth.sign(SECRET, "GET", path))
    assert (got, body["error"]["code"]) == (status, code)
    assert server.bytes_sent == 0


def test_corrupt_source_file_fails_checksum_and_lands_nothing(snaps: Path, server: TransferServer,
                                                             tmp_path: Path) -> None:
    snap = make_snapshot(snaps, "snap1", {"a": b"first" * 1000, "b": os.urandom(2 * MIB), "c": b"last"})
    load_or_build(snap)  # cached, as after an earlier pull
    target = snap / "volume" / "b"
    st = target.stat()
    with open(target, "r+b") as f:  # same size, one byte flipped, mtime kept: only the hash can tell
        f.seek(MIB)
        byte = f.read(1)
        f.seek(MIB)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    dest = tmp_path / "dst"
    with pytest.raises(ChecksumMismatch):
        pull(server.url, SECRET, "snap1", dest)
    assert not (dest / "snap1").exists()
    staging = incoming_dir(dest, "snap1")
    assert os.listdir(staging / "parts") == []  # the bad part was discarded
    assert not (staging / "volume" / "b").exists()
    assert set(read_journal(staging)[1]) == {"a"}


def test_resumes_after_receiver_killed(snaps: Path, server: TransferServer, tmp_path: Path) -> None:
    block = os.urandom(16 * MIB)  # one random block, made distinct per file: cheaper than 8
    snap = make_snapshot(snaps, "big", {f"d{i % 2}/f{i}": bytes([i]) + block[1:] for i in range(8)})
    before = tree(snap / "volume")
    sizes = {f"d{i % 2}/f{i}": 16 * MIB for i in range(8)}
    total, largest = sum(sizes.values()), max(sizes.values())
    server.max_rate = 64 * MIB  # ~2 s for all: the kill lands half-way, whatever the machine's speed
    dest = tmp_path / "dst"
    staging = incoming_dir(dest, "big")
    env = {**os.environ, "ENVCLONE_CLUSTER_SECRET": SECRET, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "shared.transfer", "pull", "--url", server.url,
                             "--snapshot", "big", "--dest", str(dest)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(read_journal(staging)[1]) >= 2, timeout=30, what="two files verified")
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -9
    assert not (dest / "big").exists()
    verified = read_journal(staging)[1]
    assert len(verified) >= 2

    server.max_rate = None
    result = pull(server.url, SECRET, "big", dest)
    assert result.files_skipped >= len(verified) >= 2
    assert result.bytes_received <= total - sum(sizes[p] for p in verified) + largest
    assert result.bytes_received + result.files_skipped * 16 * MIB == total
    after = tree(dest / "big" / "volume")
    assert after == before
    # tree() hashed every landed file: each matches the manifest's checksum.
    assert all(after[e.path][2] == e.sha256 for e in load_or_build(dest / "big").files)
    assert not staging.exists()


def test_serve_as_a_process_with_the_secret_from_the_environment(snaps: Path, tmp_path: Path) -> None:
    make_snapshot(snaps, "snap1", {"f": b"hello"})
    env = {**os.environ, "ENVCLONE_CLUSTER_SECRET": SECRET, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "shared.transfer", "serve", "--snaps-dir", str(snaps),
                             "--bind", "127.0.0.1:0"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())  # printed once it listens
        assert SECRET not in " ".join(proc.args)  # type: ignore[arg-type]
        result = pull(line["url"], SECRET, "snap1", tmp_path / "dst")
        assert result.files_fetched == 1
        assert (tmp_path / "dst" / "snap1" / "volume" / "f").read_bytes() == b"hello"
    finally:
        proc.kill()
        proc.communicate()


def test_connection_refused_is_a_retryable_transfer_error(tmp_path: Path) -> None:
    with TransferServer(tmp_path, SECRET) as srv:
        url = srv.url
    with pytest.raises(TransferError) as err:
        pull(url, SECRET, "snap1", tmp_path / "dst")
    assert err.value.retryable and url in str(err.value)


def test_source_file_changed_in_size_is_refused_by_the_server(snaps: Path, server: TransferServer,
                                                              tmp_path: Path) -> None:
    snap = make_snapshot(snaps, "snap1", {"a": b"0123456789"})
    load_or_build(snap)
    (snap / "volume" / "a").write_bytes(b"01234")
    with pytest.raises(TransferError) as err:
        pull(server.url, SECRET, "snap1", tmp_path / "dst")
    assert err.value.status == 409 and not err.value.retryable and "snapshot_changed" in str(err.value)
    assert not (tmp_path / "dst" / "snap1").exists()


def test_a_manifest_writing_through_a_symlink_or_outside_is_refused(snaps: Path) -> None:
    snap = make_snapshot(snaps, "snap1", {"d/f": b"x"})
    good = json.loads(load_or_build(snap).to_json())
    link = {"path": "link", "kind": "symlink", "mode": 0o777, "uid": 0, "gid": 0, "mtime_ns": 0, "target": "/etc"}
    through = {"path": "link/passwd", "kind": "file", "mode": 0o644, "uid": 0, "gid": 0, "mtime_ns": 0,
               "size": 1, "sha256": "0" * 64}
    for entries in ([*good["entries"], link, through], [*good["entries"], {**through, "path": "../escape"}],
                    [*good["entries"], {**through, "path": "nodir/f"}], good["entries"][1:],
                    [*good["entries"], good["entries"][1]]):
        with pytest.raises(TransferError, match="invalid manifest"):
            Manifest.from_json(json.dumps({**good, "entries": entries}))
    assert Manifest.from_json(json.dumps(good)) == load_or_build(snap)
