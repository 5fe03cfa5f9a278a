"""Interrupted and overlapping runs on one node: two applies at once, and SIGKILL at each step.

The kill tests stop the node script for real between two of its steps. The
node's binDir points at a directory of test shims, one per command that
changes the node or waits on containerd (mv, cp, rm, mkdir, the restart's
timeout, ctr, ...). Each shim counts its call and, at call K, sends SIGKILL to
the node script and exits without running the command. The next run, with
no kill, must repair the node; the checks after the kill and after that run
are the same for every K.
"""

from __future__ import annotations

import shlex
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.faults import (
    NodeCommand,
    connection,
    containerd_pid,
    node_commands,
    process_exists,
    restart,
    runs_current_config,
    stray_files,
    tree,
    wait_until,
)
from tests.e2e.lab import Lab, cri_plugin_status
from tests.e2e.replay import _ssh

# Commands after which the node is in a new state: the kill points.
KILL_POINTS = ("mv", "cp", "rm", "rmdir", "mkdir", "chmod", "chown", "mktemp", "timeout", "ctr")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHIM = """#!/bin/sh
# Test shim for {name}: counts the call and kills the node script at call K.
if [ -z "${{NM_SHIM_OFF-}}" ]; then
    exec 8>>{dir}/count.lock
    {flock} 8
    read -r n <{dir}/count || n=0
    n=$((n + 1))
    echo "$n" >{dir}/count
    echo "$n {name}" >>{dir}/trace
    exec 8>&-
    read -r k <{dir}/kill-at
    if [ "$n" = "$k" ]; then
        read -r target <{dir}/target
        kill -KILL "$target"
        exit 137
    fi
fi
exec {real} "$@"
"""


@dataclass
class KillSwitch:
    """Shims in DIR for KILL_POINTS plus containerd, which binDir puts first on PATH."""

    dir: Path

    @classmethod
    def create(cls, directory: Path) -> KillSwitch:
        directory.mkdir()
        flock = shutil.which("flock", path=SYSTEM_PATH)
        for name in (*KILL_POINTS, "containerd"):
            real = shutil.which(name, path=SYSTEM_PATH)
            assert real and flock, f"{name} or flock is not installed"
            shim = directory / name
            shim.write_text(SHIM.format(name=name, dir=directory, flock=flock, real=real))
            shim.chmod(0o755)
        switch = cls(directory)
        switch.arm(0)
        return switch

    def arm(self, kill_at: int) -> None:
        """Count calls from 1 again and kill at call KILL_AT (0: never)."""
        (self.dir / "count").write_text("0\n")
        (self.dir / "trace").write_text("")
        (self.dir / "kill-at").write_text(f"{kill_at}\n")
        (self.dir / "target").unlink(missing_ok=True)

    def calls(self) -> list[str]:
        return [line.split()[1] for line in (self.dir / "trace").read_text().splitlines()]

    def command(self, node_command: NodeCommand) -> str:
        """Return the node command with its shell's pid written to the target file first."""
        target = shlex.quote(str(self.dir / "target"))
        return f"echo $$ >{target}; exec {node_command.command}"

    def target(self) -> int:
        return int((self.dir / "target").read_text())


def _run(lab: Lab, command: str, stdin: str) -> tuple[int, str, str]:
    return _ssh(connection(lab), command, stdin, 120)


def _kill_points(calls: list[str], limit: int) -> list[int]:
    """Pick up to LIMIT call numbers spread over CALLS, always with the first and last."""
    count = len(calls)
    if count <= limit:
        return list(range(1, count + 1))
    step = (count - 1) / (limit - 1)
    return sorted({round(1 + index * step) for index in range(limit)})


def _wait_for_end(pid: int) -> None:
    wait_until(lambda: not process_exists(pid), 30, f"the end of process {pid}")


def _stage_of(pid: int) -> list[Path]:
    """Return the scratch directories in /tmp that the script with PID created."""
    found = []
    for directory in Path("/tmp").glob("nexus-mirror.??????"):
        try:
            if (directory / "pid").read_text().strip() == str(pid):
                found.append(directory)
        except OSError:
            continue
    return found


# --- two applies at once ----------------------------------------------------------


def test_two_applies_at_once_take_turns(stack: Stack, lab: Lab) -> None:
    node = lab.node("node-a")
    slow = stack.config()
    slow["nodes"][0]["containerd"]["restartCommand"] = f"sleep 1; {node.restart_command}"
    other = stack.config(
        registries={
            "quay.io": {"nexus": {"port": lab.mirror_port}},
            "ghcr.io": {"nexus": {"port": lab.mirror_port}},
        }
    )
    first, second = node_commands(lab, slow), node_commands(lab, other)
    results: dict[str, list] = {"first": [], "second": []}

    def apply(name: str, commands: dict[str, NodeCommand]) -> None:
        for mode in ("config", "hosts"):
            started = time.monotonic()
            code, stdout, stderr = _run(lab, commands[mode].command, commands[mode].stdin)
            results[name].append((mode, code, stderr, started, time.monotonic()))

    threads = [threading.Thread(target=apply, args=("first", first))]
    threads.append(threading.Thread(target=apply, args=("second", second)))
    threads[0].start()
    time.sleep(0.4)
    threads[1].start()
    for thread in threads:
        thread.join(timeout=120)

    for name in ("first", "second"):
        assert [(mode, code) for mode, code, *_ in results[name]] == [
            ("config", 0),
            ("hosts", 0),
        ], results[name]
    first_config, second_config = results["first"][0], results["second"][0]
    # The second config run waited for the lock while the first one restarted.
    assert "waiting for another nexus-mirror run" in second_config[2]
    assert second_config[4] > first_config[4]
    assert "nothing changed" in second_config[2]
    # The hosts run that took the lock last wrote the whole tree: no mix of both.
    last = max(("first", "second"), key=lambda name: results[name][1][4])
    expected = node_commands(lab, slow if last == "first" else other)["hosts"]
    names = {"first": {"docker.io"}, "second": {"quay.io", "ghcr.io"}}[last]
    assert {path.name for path in node.certs_dir.iterdir()} == names
    assert expected.stdin.count("nm_file ") == len(tree(node.certs_dir))
    assert cri_plugin_status(node) == "ok"
    assert runs_current_config(node)
    report = stack.up(stack.config()).outputs["nodes"]["node-a"]
    assert {path.name for path in node.certs_dir.iterdir()} == {"docker.io"}
    assert report["criPlugin"] == "ok"


# --- SIGKILL between two steps ------------------------------------------------------


@pytest.fixture
def kill_switch(tmp_path: Path) -> KillSwitch:
    return KillSwitch.create(tmp_path / "shims")


def _config_with_shims(stack: Stack, lab: Lab, switch: KillSwitch, **overrides) -> dict:
    config = stack.config(**overrides)
    containerd = config["nodes"][0]["containerd"]
    containerd["binDir"] = str(switch.dir)
    containerd["restartTimeout"] = 5
    # The restart's own commands are not kill points.
    containerd["restartCommand"] = f"NM_SHIM_OFF=1 {lab.node('node-a').restart_command}"
    return config


def test_killed_config_run_is_repaired(stack: Stack, lab: Lab, kill_switch: KillSwitch) -> None:
    node = lab.node("node-a")
    state = node.dir / "nexus-mirror-state"
    old = node.config.read_bytes()
    command = node_commands(lab, _config_with_shims(stack, lab, kill_switch))["config"]

    # A run without a kill gives the calls to kill at and the expected file.
    code, _, stderr = _run(lab, kill_switch.command(command), command.stdin)
    assert code == 0, stderr
    new = node.config.read_bytes()
    calls = kill_switch.calls()
    assert "mv" in calls
    assert "timeout" in calls
    points = _kill_points(calls, 7)
    # Always kill right after config.toml is replaced and before the restart.
    points = sorted({*points, calls.index("timeout", calls.index("mv")) + 1})

    for point in points:
        node.config.write_bytes(old)
        shutil.rmtree(state, ignore_errors=True)
        restart(node)
        kill_switch.arm(point)

        code, _, stderr = _run(lab, kill_switch.command(command), command.stdin)

        target = kill_switch.target()
        _wait_for_end(target)
        at = f"kill before call {point} ({calls[point - 1]})"
        assert node.config.read_bytes() in (old, new), at
        assert cri_plugin_status(node) == "ok", at
        kill_switch.arm(0)
        code, _, stderr = _run(lab, kill_switch.command(command), command.stdin)
        assert code == 0, f"{at}: {stderr}"
        assert node.config.read_bytes() == new, at
        assert runs_current_config(node), at
        assert cri_plugin_status(node) == "ok", at
        assert not (state / "restart-pending").exists(), at
        assert stray_files(node.dir) == [], at
        assert _stage_of(target) == [], at


def test_killed_hosts_run_is_repaired(
    stack: Stack, lab: Lab, kill_switch: KillSwitch, tmp_path: Path
) -> None:
    node = lab.node("node-a")
    state = node.dir / "nexus-mirror-state"
    saved = tmp_path / "saved"
    # The old tree has docker.io and quay.io, the new one docker.io (changed) and ghcr.io.
    old_config = _config_with_shims(
        stack,
        lab,
        kill_switch,
        registries={
            "docker.io": {"nexus": {"port": lab.mirror_port}},
            "quay.io": {"nexus": {"port": lab.mirror_port}},
        },
    )
    new_config = _config_with_shims(
        stack,
        lab,
        kill_switch,
        registries={
            "docker.io": {
                "nexus": {"port": lab.mirror_port},
                "mirrors": [{"url": f"http://127.0.0.1:{lab.upstream_port}"}],
            },
            "ghcr.io": {"nexus": {"port": lab.mirror_port}},
        },
    )
    old_commands, new_commands = node_commands(lab, old_config), node_commands(lab, new_config)
    for mode in ("config", "hosts"):
        code, _, stderr = _run(lab, old_commands[mode].command, old_commands[mode].stdin)
        assert code == 0, stderr
    pid = containerd_pid(node)
    old = tree(node.certs_dir)
    shutil.copytree(node.certs_dir, saved / "certs", symlinks=True)
    shutil.copytree(state, saved / "state", symlinks=True)
    command = new_commands["hosts"]

    code, _, stderr = _run(lab, kill_switch.command(command), command.stdin)
    assert code == 0, stderr
    new = tree(node.certs_dir)
    new_manifest = (state / "managed").read_text()
    points = _kill_points(kill_switch.calls(), 7)
    try:
        for point in points:
            for name in ("certs", "state"):
                target_dir = node.certs_dir if name == "certs" else state
                shutil.rmtree(target_dir)
                shutil.copytree(saved / name, target_dir, symlinks=True)
            kill_switch.arm(point)

            code, _, stderr = _run(lab, kill_switch.command(command), command.stdin)

            target = kill_switch.target()
            _wait_for_end(target)
            at = f"kill before call {point}"
            # Every file is whole: its old content, its new content, or not there.
            for path, data in tree(node.certs_dir).items():
                if ".nexus-mirror." in path:
                    continue
                assert data in (old.get(path), new.get(path)), f"{at}: {path}"
            kill_switch.arm(0)
            code, _, stderr = _run(lab, kill_switch.command(command), command.stdin)
            assert code == 0, f"{at}: {stderr}"
            assert tree(node.certs_dir) == new, at
            assert (state / "managed").read_text() == new_manifest, at
            assert stray_files(node.certs_dir, state) == [], at
            assert _stage_of(target) == [], at
    finally:
        shutil.rmtree(saved, ignore_errors=True)
    assert containerd_pid(node) == pid
    assert cri_plugin_status(node) == "ok"
