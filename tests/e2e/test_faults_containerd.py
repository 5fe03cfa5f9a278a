"""Faults of containerd and of its restart command on a node.

containerd missing, stopped or at another socket stops the config step
before config.toml changes. A restart command that fails, hangs, or exits 0
without a working CRI plugin gets config.toml rolled back, and the node keeps
running the previous file with the CRI plugin ok.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.faults import (
    RESTART_TIMEOUT,
    assert_unchanged,
    containerd_pid,
    failed_apply_line,
    fault_config,
    free_port,
    once,
    runs_current_config,
    snapshot,
    start_containerd,
    state_files,
    stop_containerd,
    wait_until,
)
from tests.e2e.lab import Lab, cri_plugin_status


def _assert_converged(stack: Stack, lab: Lab, config: dict) -> dict:
    run = stack.up(config)
    node = lab.node("node-a")
    report = run.outputs["nodes"]["node-a"]
    assert report["criPlugin"] == "ok"
    assert report["configPath"] == str(node.certs_dir)
    assert (node.certs_dir / "docker.io" / "hosts.toml").is_file()
    assert runs_current_config(node)
    assert "restart-pending" not in state_files(node)
    return report


def _assert_rolled_back(lab: Lab, before_config: bytes) -> None:
    node = lab.node("node-a")
    assert node.config.read_bytes() == before_config
    assert cri_plugin_status(node) == "ok"
    assert "restart-pending" not in state_files(node)
    assert not (node.certs_dir / "docker.io").exists()


# --- containerd itself ---------------------------------------------------------


def test_bin_dir_without_containerd(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    node = lab.node("node-a")
    before = snapshot(node)
    empty = tmp_path / "bin"
    empty.mkdir()
    config = fault_config(stack)
    config["nodes"][0]["containerd"]["binDir"] = str(empty)

    line = failed_apply_line(stack, config)

    assert line.startswith(
        f"nexus-mirror: node node-a: find containerd: {empty}/containerd is not an executable file"
    )
    assert "nexus-mirror:containerd.binDir" in line
    assert_unchanged(node, before)
    config["nodes"][0]["containerd"]["binDir"] = "/usr/bin"
    _assert_converged(stack, lab, config)


@pytest.fixture
def sshd_without_containerd(lab: Lab, tmp_path: Path) -> Iterator[int]:
    """An sshd on a free port whose sessions see no containerd or ctr binaries.

    It runs in its own mount namespace, where /dev/null is mounted over
    /usr/bin/containerd and /usr/bin/ctr, so the node looks as if containerd
    were not installed while the lab's containerd keeps running.
    """
    port = free_port()
    config = tmp_path / "sshd_config"
    lines = (lab.dir / "sshd_config").read_text().splitlines()
    config.write_text(
        "\n".join(
            f"ListenAddress 127.0.0.1:{port}" if line.startswith("ListenAddress") else line
            for line in lines
        )
        + "\n"
    )
    hide = "mount --bind /dev/null /usr/bin/containerd && mount --bind /dev/null /usr/bin/ctr"
    sshd = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"{hide} && exec /usr/sbin/sshd -D -e -f {config}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "sshd.log").open("w"),
    )
    try:

        def listening() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                assert sshd.poll() is None, (tmp_path / "sshd.log").read_text()
                return False

        wait_until(listening, 20, "sshd without containerd to listen")
        yield port
    finally:
        sshd.terminate()
        sshd.wait(timeout=20)


def test_containerd_not_installed(stack: Stack, lab: Lab, sshd_without_containerd: int) -> None:
    node = lab.node("node-a")
    before = snapshot(node)
    config = fault_config(stack)
    config["nodes"][0]["port"] = sshd_without_containerd

    line = failed_apply_line(stack, config)

    assert line.startswith("nexus-mirror: node node-a: find containerd: containerd is not on PATH")
    assert "Install containerd" in line
    assert_unchanged(node, before)
    config["nodes"][0]["port"] = lab.ssh_port
    _assert_converged(stack, lab, config)


def test_containerd_not_running(stack: Stack, lab: Lab) -> None:
    node = lab.node("node-a")
    before_config = node.config.read_bytes()
    stop_containerd(node)
    try:
        line = failed_apply_line(stack, fault_config(stack))
    finally:
        start_containerd(node)

    assert line.startswith(
        f"nexus-mirror: node node-a: check containerd: containerd does not respond on {node.socket}"
    )
    assert line.endswith("config.toml was not changed")
    assert node.config.read_bytes() == before_config
    assert state_files(node) == ["lock"]
    _assert_converged(stack, lab, fault_config(stack))


def test_containerd_stopped_mirror_change(stack: Stack, lab: Lab) -> None:
    """A mirror-only change needs no containerd: the files wait for its start."""
    node = lab.node("node-a")
    stack.up(fault_config(stack))
    stop_containerd(node)
    try:
        config = fault_config(stack)
        config["registries"]["quay.io"] = {"nexus": {"port": lab.mirror_port}}
        report = stack.up(config).outputs["nodes"]["node-a"]
    finally:
        start_containerd(node)

    assert report["criPlugin"] is None
    assert (node.certs_dir / "quay.io" / "hosts.toml").is_file()
    assert cri_plugin_status(node) == "ok"


def test_socket_elsewhere(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    node = lab.node("node-a")
    before = snapshot(node)
    config = fault_config(stack)
    wrong = tmp_path / "containerd.sock"
    config["nodes"][0]["containerd"]["address"] = str(wrong)

    line = failed_apply_line(stack, config)

    assert line.startswith(
        f"nexus-mirror: node node-a: check containerd: containerd does not respond on {wrong}"
    )
    assert "nexus-mirror:containerd.address" in line
    assert_unchanged(node, before)
    _assert_converged(stack, lab, fault_config(stack))


# --- the restart command ---------------------------------------------------------


def test_restart_command_fails(stack: Stack, lab: Lab) -> None:
    node = lab.node("node-a")
    before = node.config.read_bytes()
    pid = containerd_pid(node)
    config = fault_config(stack)
    config["nodes"][0]["containerd"]["restartCommand"] = "echo 'unit not found' >&2; exit 5"

    line = failed_apply_line(stack, config)

    assert line.startswith(
        "nexus-mirror: node node-a: restart containerd: the restart command failed with exit status 5"
    )
    assert "containerd, which was not restarted, still runs the previous configuration" in line
    _assert_rolled_back(lab, before)
    assert containerd_pid(node) == pid
    _assert_converged(stack, lab, fault_config(stack))


def test_restart_fails_after_restarting(stack: Stack, lab: Lab) -> None:
    """A restart command that restarts containerd but exits 1, both times."""
    node = lab.node("node-a")
    before = node.config.read_bytes()
    config = fault_config(stack)
    config["nodes"][0]["containerd"]["restartCommand"] = f"{node.restart_command}; exit 1"

    line = failed_apply_line(stack, config)

    assert line.startswith(
        "nexus-mirror: node node-a: restart containerd: the restart command failed"
    )
    assert "containerd restarted with the restored file and the CRI plugin is ok" in line
    _assert_rolled_back(lab, before)
    assert runs_current_config(node)
    _assert_converged(stack, lab, fault_config(stack))


def test_restart_hangs_ignoring_sigterm(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    node = lab.node("node-a")
    before = node.config.read_bytes()
    flag = tmp_path / "hang-once"
    flag.touch()
    config = fault_config(stack, ["node-a", "node-b"])
    config["nodes"][0]["containerd"]["restartCommand"] = once(
        flag, "trap '' TERM; sleep 60", node.restart_command
    )
    started = time.monotonic()

    line = failed_apply_line(stack, config)

    elapsed = time.monotonic() - started
    assert line.startswith(
        "nexus-mirror: node node-a: restart containerd: the restart command did not finish "
        f"within {RESTART_TIMEOUT} s and was stopped"
    )
    assert "after the restart command ran again the CRI plugin is ok" in line
    # The hung command gets SIGKILL 3 s after the limit, and the roll-back
    # takes a few seconds more.
    assert elapsed < RESTART_TIMEOUT + 3 + 10
    _assert_rolled_back(lab, before)
    # node-b restarts in the same batch and is not held back by node-a.
    [other] = stack.executions("create", "node-b-config")
    assert other.returncode == 0
    assert other.finished - other.started < RESTART_TIMEOUT
    _assert_converged(stack, lab, fault_config(stack, ["node-a", "node-b"]))


def test_restart_leaves_output_open(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    """A process that the restart command leaves behind with its output open."""
    node = lab.node("node-a")
    pid_file = tmp_path / "lingering.pid"
    config = fault_config(stack)
    config["nodes"][0]["containerd"]["restartCommand"] = (
        f"sleep 30 & echo $! > {pid_file}; {node.restart_command}"
    )
    try:
        report = _assert_converged(stack, lab, config)
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)

    assert report["restarted"] is True
    [run] = stack.executions("create", "node-a-config")
    assert run.finished - run.started < 15


def test_restart_exits_zero_with_cri_down(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    node = lab.node("node-a")
    before = node.config.read_bytes()
    flag = tmp_path / "stop-once"
    flag.touch()
    config = fault_config(stack)
    stop = f"sh {lab.env['NODE_SCRIPT']} stop {node.dir}"
    config["nodes"][0]["containerd"]["restartCommand"] = once(flag, stop, node.restart_command)

    line = failed_apply_line(stack, config)

    assert line.startswith(
        f"nexus-mirror: node node-a: wait for CRI: containerd did not respond on {node.socket} "
        f"within {RESTART_TIMEOUT} s after the restart"
    )
    assert "after the restart command ran again the CRI plugin is ok" in line
    _assert_rolled_back(lab, before)
    _assert_converged(stack, lab, fault_config(stack))


def test_restart_command_does_nothing(stack: Stack, lab: Lab) -> None:
    node = lab.node("node-a")
    before = node.config.read_bytes()
    pid = containerd_pid(node)
    config = fault_config(stack)
    config["nodes"][0]["containerd"]["restartCommand"] = "true"

    line = failed_apply_line(stack, config)

    assert line.startswith(
        "nexus-mirror: node node-a: wait for CRI: the restart command succeeded, but containerd "
        f"was not restarted: its socket {node.socket} was not created again"
    )
    _assert_rolled_back(lab, before)
    assert containerd_pid(node) == pid
    _assert_converged(stack, lab, fault_config(stack))
