"""Faults in reaching a node: SSH refused or cut off, and sudo that requires a password.

The SSH-level messages come from the SSH client (pulumi-command's own in a
real run). The replay reports what OpenSSH prints, so these tests check that
the failing resource names the node and the cause, that nothing changed on
the node, and that the next apply converges.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.faults import (
    RESTART_TIMEOUT,
    assert_unchanged,
    error_line,
    fault_config,
    free_port,
    parent_pid,
    process_exists,
    runs_current_config,
    script_processes,
    snapshot,
    state_files,
    wait_until,
)
from tests.e2e.lab import Lab, cri_plugin_status
from tests.e2e.replay import CommandFailed


def _assert_converged(stack: Stack, lab: Lab, config: dict, names: list[str]) -> None:
    run = stack.up(config)
    for name in names:
        node = lab.node(name)
        report = run.outputs["nodes"][name]
        assert report["criPlugin"] == "ok"
        assert report["configPath"] == str(node.certs_dir)
        assert (node.certs_dir / "docker.io" / "hosts.toml").is_file()
        assert runs_current_config(node)
        assert "restart-pending" not in state_files(node)


def _fail(stack: Stack, config: dict, private_key: str | None = None) -> str:
    with pytest.raises(CommandFailed) as failure:
        stack.up(config, private_key=private_key)
    return str(failure.value)


def _other_node_finished(stack: Stack) -> None:
    """node-b shares node-a's restart batch: its config step ran to success."""
    runs = stack.executions("create", "node-b-config")
    assert [run.returncode for run in runs] == [0]
    assert runs[0].finished - runs[0].started < RESTART_TIMEOUT * 2


def test_nothing_listening_changes_nothing(stack: Stack, lab: Lab) -> None:
    node = lab.node("node-a")
    before = snapshot(node)
    config = fault_config(stack, ["node-a", "node-b"])
    config["nodes"][0]["port"] = free_port()

    message = _fail(stack, config)

    assert message.startswith("node-a-config: exit status 255")
    assert "Connection refused" in message
    assert_unchanged(node, before)
    assert state_files(node) == []
    _other_node_finished(stack)
    config["nodes"][0]["port"] = lab.ssh_port
    _assert_converged(stack, lab, config, ["node-a", "node-b"])


def test_wrong_host_key_changes_nothing(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    node = lab.node("node-a")
    before = snapshot(node)
    key = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = fault_config(stack)
    right_key = config["nodes"][0]["hostKey"]
    config["nodes"][0]["hostKey"] = " ".join(key.with_suffix(".pub").read_text().split()[:2])

    message = _fail(stack, config)

    assert message.startswith("node-a-config: exit status 255")
    assert "Host key verification failed" in message
    assert_unchanged(node, before)
    assert state_files(node) == []
    config["nodes"][0]["hostKey"] = right_key
    _assert_converged(stack, lab, config, ["node-a"])


def test_refused_login_changes_nothing(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    node = lab.node("node-a")
    before = snapshot(node)
    key = tmp_path / "unknown_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)

    message = _fail(stack, fault_config(stack), private_key=key.read_text())

    assert message.startswith("node-a-config: exit status 255")
    assert "Permission denied (publickey)" in message
    assert_unchanged(node, before)
    assert state_files(node) == []
    _assert_converged(stack, lab, fault_config(stack), ["node-a"])


def test_dropped_connection_finishes_change(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    node = lab.node("node-a")
    marker = tmp_path / "restart-started"
    config = fault_config(stack)
    # The restart pauses so that the connection drops while the script runs.
    config["nodes"][0]["containerd"]["restartCommand"] = (
        f"touch {marker}; sleep 1; {node.restart_command}"
    )
    killed: list[int] = []

    def drop_connection() -> None:
        wait_until(marker.exists, 30, "the restart")
        [script] = script_processes("config")
        killed.append(script)
        # The session process of sshd is the script's parent: killing it
        # closes the connection and the script's stdout and stderr.
        os.kill(parent_pid(script), signal.SIGKILL)

    # The program runs in the main thread: with imports in two threads at
    # once, Python 3.11.7 raised "SystemError: AST constructor recursion
    # depth mismatch" here.
    dropper = threading.Thread(target=drop_connection)
    dropper.start()
    message = _fail(stack, config)
    dropper.join(timeout=60)

    assert message.startswith("node-a-config: exit status 255")
    [script] = killed
    # Cut off from its session, the script still finishes the restart and its check.
    wait_until(lambda: not process_exists(script), 30, "the end of the node script")
    assert 'config_path = "' in node.config.read_text()
    assert runs_current_config(node)
    assert cri_plugin_status(node) == "ok"
    assert "restart-pending" not in state_files(node)
    run = stack.up(config)
    report = run.outputs["nodes"]["node-a"]
    assert report["configChanged"] is False
    assert report["restarted"] is False
    assert (node.certs_dir / "docker.io" / "hosts.toml").is_file()


# --- a user other than root ---------------------------------------------------


@pytest.fixture
def lab_user(tmp_path: Path) -> Iterator[str]:
    """A login user without sudo rights, which the lab's sshd admits (nm-lab-*)."""
    name = f"nm-lab-{secrets.token_hex(3)}"
    home = tmp_path / "home"
    subprocess.run(
        ["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh", name],
        check=True,
        capture_output=True,
    )
    sudoers = Path("/etc/sudoers.d") / name
    try:
        # "*" is no valid password but, unlike useradd's "!", not a locked
        # account, which sshd without PAM would reject.
        subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)
        yield name
    finally:
        sudoers.unlink(missing_ok=True)
        subprocess.run(["userdel", name], check=True, capture_output=True)


def _allow_sudo(name: str) -> None:
    sudoers = Path("/etc/sudoers.d") / name
    draft = sudoers.with_name(f".{name}.draft")
    draft.write_text(f"{name} ALL=(root) NOPASSWD: ALL\n")
    draft.chmod(0o440)
    subprocess.run(["visudo", "-c", "-q", "-f", str(draft)], check=True, capture_output=True)
    draft.rename(sudoers)


def test_sudo_password_required(stack: Stack, lab: Lab, lab_user: str) -> None:
    node = lab.node("node-a")
    before = snapshot(node)
    config = fault_config(stack)
    config["ssh"] = {"user": lab_user}

    message = _fail(stack, config)

    line = error_line(message, "node-a")
    assert line.startswith(
        f"nexus-mirror: node node-a: check sudo: sudo -n failed for user {lab_user}"
    )
    assert "a password is required" in line
    assert "NOPASSWD" in line
    assert_unchanged(node, before)
    assert state_files(node) == []
    _allow_sudo(lab_user)
    _assert_converged(stack, lab, config, ["node-a"])
    run = stack.up(config)
    assert run.outputs["nodes"]["node-a"]["configChanged"] is True
    assert stack.executions("create", "node-a-hosts")[-1].command.endswith(
        "exec sudo -n sh -s -- hosts"
    )
