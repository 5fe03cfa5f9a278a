"""Faults of config.toml: invalid, a symbolic link, read-only, or broken only at restart.

The config step checks the candidate with ``containerd config dump`` and
replaces config.toml by renaming a file next to it, so a file it cannot read,
parse or replace is left as it was and containerd is not restarted.
"""

from __future__ import annotations

import stat

from tests.e2e.conftest import Stack
from tests.e2e.faults import (
    assert_unchanged,
    failed_apply_line,
    fault_config,
    read_only,
    runs_current_config,
    snapshot,
    state_files,
)
from tests.e2e.lab import Lab, cri_plugin_status


def _assert_converged(stack: Stack, lab: Lab, config: dict) -> None:
    node = lab.node("node-a")
    report = stack.up(config).outputs["nodes"]["node-a"]
    assert report["criPlugin"] == "ok"
    assert report["configPath"] == str(node.certs_dir)
    assert (node.certs_dir / "docker.io" / "hosts.toml").is_file()
    assert runs_current_config(node)
    assert "restart-pending" not in state_files(node)


def test_invalid_toml_left_alone(stack: Stack, lab: Lab) -> None:
    node = lab.node("node-a")
    pristine = node.config.read_text()
    # Edited after containerd started: containerd still runs the valid file.
    node.config.write_text(pristine + '\n[plugins."io.containerd.grpc.v1.cri"\n  x = 1\n')
    before = snapshot(node)

    line = failed_apply_line(stack, fault_config(stack))

    assert line.startswith(
        "nexus-mirror: node node-a: check config.toml: containerd cannot load config.toml"
    )
    assert line.endswith("config.toml was not changed")
    assert_unchanged(node, before)
    node.config.write_text(pristine)
    _assert_converged(stack, lab, fault_config(stack))


def test_symlink_config_left_alone(stack: Stack, lab: Lab) -> None:
    node = lab.node("node-a")
    real = node.dir / "config.real.toml"
    node.config.rename(real)
    node.config.symlink_to(real)
    try:
        before = snapshot(node)

        line = failed_apply_line(stack, fault_config(stack))

        assert line == (
            f"nexus-mirror: node node-a: read config.toml: {node.config} is a symbolic link. "
            "Set the node's config.toml path to the file the link points to"
        )
        assert node.config.is_symlink()
        assert_unchanged(node, before)
        config = fault_config(stack)
        config["nodes"][0]["containerd"]["configFile"] = str(real)
        report = stack.up(config).outputs["nodes"]["node-a"]
        assert report["criPlugin"] == "ok"
        assert node.config.is_symlink()
        assert 'config_path = "' in real.read_text()
        assert runs_current_config(node)
    finally:
        node.config.unlink()
        real.rename(node.config)


def test_read_only_config_left_alone(stack: Stack, lab: Lab) -> None:
    node = lab.node("node-a")
    before = snapshot(node)
    with read_only(node.config):
        line = failed_apply_line(stack, fault_config(stack))

        assert line.startswith(
            f"nexus-mirror: node node-a: write config.toml: cannot replace {node.config}"
        )
        assert "Device or resource busy" in line or "Read-only file system" in line
        assert line.endswith("config.toml was not changed")
        assert_unchanged(node, before)
        assert "restart-pending" not in state_files(node)
        assert not list(node.dir.glob(".config.toml.nexus-mirror.*"))
    _assert_converged(stack, lab, fault_config(stack))


def test_read_only_mode_is_kept(stack: Stack, lab: Lab) -> None:
    """Mode 0444 does not stop root: the new file replaces it and keeps the mode."""
    node = lab.node("node-a")
    node.config.chmod(0o444)
    _assert_converged(stack, lab, fault_config(stack))
    assert stat.S_IMODE(node.config.stat().st_mode) == 0o444


def test_edit_that_breaks_cri_at_restart(stack: Stack, lab: Lab) -> None:
    """config.toml was edited after containerd started, in a way the CRI plugin rejects.

    ``containerd config dump`` accepts the file, so the edit shows only when
    the restart loads it. The roll-back restores the edited file, which
    fails the same way: the node keeps a broken CRI plugin until the edit is
    fixed, and the message states that the previous file fails too.
    """
    node = lab.node("node-a")
    pristine = node.config.read_text()
    edited = pristine.replace(
        '  [plugins."io.containerd.grpc.v1.cri"]\n',
        '  [plugins."io.containerd.grpc.v1.cri"]\n'
        '    [plugins."io.containerd.grpc.v1.cri".containerd]\n'
        '      default_runtime_name = "missing"\n',
    )
    assert edited != pristine
    node.config.write_text(edited)

    line = failed_apply_line(stack, fault_config(stack))

    assert line.startswith(
        "nexus-mirror: node node-a: roll back config.toml: the CRI plugin reports 'error'"
    )
    assert "default_runtime_name" in line
    assert "containerd fails with the previous file too" in line
    assert node.config.read_text() == edited
    assert cri_plugin_status(node) == "error"
    node.config.write_text(pristine)
    _assert_converged(stack, lab, fault_config(stack))
