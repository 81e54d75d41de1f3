"""A node's account owns its volume and can run commands (a database superuser's COPY TO PROGRAM
does). Replayed here as that account, for real: links planted where root used to write (the pid
file's temporary, the log, the lock, a secrets file), a node.json naming root as the owner, a pid
file naming another process. Root must write nothing outside the volume, run nothing as root,
signal nothing that is not the node's own server."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
from pathlib import Path

import pytest
import redis

from shared.drivers import NodeSpec
from shared.drivers.base import PermanentDriverError
from shared.drivers.local import LocalDriver
from shared.drivers.process import running_pid
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="node accounts need root")]

ADDRESS = "127.118.254.1"


def as_node(driver: LocalDriver, node_id: str, script: str) -> None:
    """``script`` run by sh as the node's account, in its volume."""
    st = driver.volume(node_id).stat()
    subprocess.run(["setpriv", f"--reuid={st.st_uid}", f"--regid={st.st_gid}", "--clear-groups",
                    "sh", "-ec", script], cwd=driver.volume(node_id), check=True, timeout=30)


def server_uid(driver: LocalDriver, node_id: str) -> int:
    pid = running_pid(driver.pid_path(node_id))
    assert pid is not None
    return os.stat(f"/proc/{pid}").st_uid


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (reaped here when it was this process's child, as a node is)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
def node(driver: LocalDriver) -> str:
    driver.create_node(NodeSpec("n", "valkey", ADDRESS, 6379))
    assert server_uid(driver, "n") == pwd.getpwnam("nobody").pw_uid
    return "n"


def test_links_planted_in_a_volume_make_root_write_nothing_outside_it(driver: LocalDriver, node: str,
                                                                      data_root: Path) -> None:
    victims = {name: data_root / f"victim-{name}" for name in
               ("node.tmp", "node.log", "node.pid", "start.lock", "node.json", ".node.json.tmp",
                ".valkey.conf.tmp", ".secrets.json.tmp")}
    for victim in victims.values():
        victim.write_text("root's own\n")
        victim.chmod(0o644)
    where = {"node.tmp": "run", "node.log": "run", "node.pid": "run", "start.lock": "run",
             "node.json": ".", ".node.json.tmp": ".", ".valkey.conf.tmp": "config", ".secrets.json.tmp": "config"}
    as_node(driver, node, "".join(f"rm -f {where[n]}/{n}; ln -s {v} {where[n]}/{n}\n" for n, v in victims.items()))

    driver.stop(node)
    driver.restart(node, 30)  # spawn: pid file, log, start lock
    driver.assign_address(node, "127.118.254.2", 6379)  # node.json rewritten
    # The config and the secrets rewritten:
    driver.set_credentials(node, {"username": "default", "password": "new-password-of-the-node"})
    driver.restart(node, 30)
    for name, victim in victims.items():
        assert victim.read_text() == "root's own\n", f"root wrote through the link at {name}"
    client = redis.Redis(host="127.118.254.2", port=6379, password="new-password-of-the-node", socket_timeout=5)
    assert client.ping()
    client.close()


def test_a_volume_directory_swapped_for_a_link_gives_the_account_nothing(driver: LocalDriver, node: str,
                                                                        data_root: Path) -> None:
    """run/ and config/ swapped for links to a directory of root's: root neither chowns it (start
    used to chown run/ on every start) nor writes into it; it refuses to act on the node."""
    victim = data_root / "victim-dir"
    victim.mkdir(mode=0o755)
    (victim / "f").write_text("root's own\n")
    as_node(driver, node, f"mv run run.old; ln -s {victim} run; mv config config.old; ln -s {victim} config")
    driver.stop(node)
    with pytest.raises(PermanentDriverError, match="not a directory"):
        driver.restart(node, 30)
    with pytest.raises(PermanentDriverError, match="not a directory"):
        driver.set_credentials(node, {"username": "default", "password": "another-password"})
    assert victim.stat().st_uid == 0 and (victim / "f").stat().st_uid == 0
    assert sorted(os.listdir(victim)) == ["f"] and (victim / "f").read_text() == "root's own\n"


def test_a_node_json_naming_root_runs_nothing_as_root(driver: LocalDriver, node: str) -> None:
    meta = json.loads((driver.volume(node) / "node.json").read_text())
    forged = json.dumps({**meta, "owner": "root", "stack": "webapp"})
    as_node(driver, node, f"rm -f node.json; printf '%s' '{forged}' > node.json")
    driver.stop(node)
    driver.restart(node, 30)
    assert server_uid(driver, node) == pwd.getpwnam("nobody").pw_uid
    assert driver.node_owner(node) is None and driver._node(node)[0].name == "valkey"


def test_a_forged_pid_file_never_makes_root_signal_another_process(driver: LocalDriver, node: str) -> None:
    bystander = subprocess.Popen(["sleep", "600"])  # root's, like any other tenant's server
    try:
        start = Path(f"/proc/{bystander.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        as_node(driver, node, f"rm -f run/node.pid; echo '{bystander.pid} {start}' > run/node.pid")
        driver.stop(node)
        driver.destroy_node(node)
        assert bystander.poll() is None, "root signalled a process a forged pid file named"
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait(10)


def test_a_node_from_before_ctl_is_adopted_once_checked(driver: LocalDriver, node: str) -> None:
    """A node made before root kept its record apart (its pid file in run/, no ctl/ record) is
    adopted with its running server; one whose pid file names another process is not."""
    pid = running_pid(driver.pid_path(node))
    legacy = driver.volume(node) / "run" / "node.pid"
    legacy.write_text(driver.pid_path(node).read_text())
    for name in ("node.json", "node.pid", "start.lock", "node.log"):
        (driver.ctl_dir / node / name).unlink(missing_ok=True)
    assert driver.health(node).running and running_pid(driver.pid_path(node)) == pid  # adopted
    driver.stop(node)
    wait_for(lambda: gone(pid), timeout=10, what="the adopted server to stop")

    driver.restart(node, 30)
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        start = Path(f"/proc/{bystander.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        real = running_pid(driver.pid_path(node))
        for name in ("node.json", "node.pid"):
            (driver.ctl_dir / node / name).unlink()
        as_node(driver, node, f"rm -f run/node.pid; echo '{bystander.pid} {start}' > run/node.pid")
        assert not driver.health(node).running  # not adopted: the server it would name is not the node's
        assert bystander.poll() is None
        os.kill(real, signal.SIGTERM)  # the node's own server, left untracked by the forgery
        wait_for(lambda: gone(real), timeout=10, what="the untracked server to stop")
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait(10)
