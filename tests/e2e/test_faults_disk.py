"""Faults of the file systems a node run writes to: full, or mounted read-only.

Each test mounts its own tmpfs or read-only bind mount inside its tmp
directory and unmounts it afterwards. The hosts step writes every changed
file to a temporary file first and renames them only when all are written,
so a write error leaves every old file in place.
"""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import Stack
from tests.e2e.faults import (
    assert_unchanged,
    failed_apply_line,
    fill,
    read_only,
    runs_current_config,
    snapshot,
    stray_files,
    tmpfs,
    tree,
)
from tests.e2e.lab import Lab, cri_plugin_status


def _registries(lab: Lab, extra_header: str | None = None) -> dict:
    docker: dict = {"nexus": {"port": lab.mirror_port}}
    quay: dict = {"nexus": {"port": lab.mirror_port}}
    if extra_header is not None:
        # A long header value makes each new file larger than the space left.
        docker["mirrors"] = [
            {"url": f"http://127.0.0.1:{lab.upstream_port}", "headers": {"X-Pad": extra_header}}
        ]
        quay["mirrors"] = docker["mirrors"]
    return {"docker.io": docker, "quay.io": quay}


def fault_config(stack: Stack, certs: Path, state: Path | None = None, **registries: str) -> dict:
    config = stack.config(registries=_registries(stack.lab, **registries))
    containerd = config["nodes"][0]["containerd"]
    containerd["configPath"] = str(certs)
    containerd["restartTimeout"] = 5
    if state is not None:
        containerd["stateDir"] = str(state)
    return config


def test_full_disk_keeps_old_hosts_files(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    node = lab.node("node-a")
    with tmpfs(tmp_path / "certs", "256k") as certs:
        stack.up(fault_config(stack, certs))
        filler = fill(certs)
        before = snapshot(node, certs)
        changed = fault_config(stack, certs, extra_header="x" * 2048)

        line = failed_apply_line(stack, changed)

        assert line.startswith("nexus-mirror: node node-a: write hosts files: cannot write ")
        assert "No space left on device" in line
        assert line.endswith("No hosts file was changed")
        assert_unchanged(node, before, certs)
        assert stray_files(certs) == []
        filler.unlink()
        report = stack.up(changed).outputs["nodes"]["node-a"]
        assert {f["action"] for f in report["files"]} == {"written"}
        assert "X-Pad" in (certs / "docker.io" / "hosts.toml").read_text()
        assert "X-Pad" in (certs / "quay.io" / "hosts.toml").read_text()
        assert stray_files(certs) == []
        assert runs_current_config(node)


def test_full_state_dir_changes_nothing(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    node = lab.node("node-a")
    before = snapshot(node)
    with tmpfs(tmp_path / "state", "64k") as state:
        filler = fill(state)
        config = fault_config(stack, node.certs_dir, state=state)

        line = failed_apply_line(stack, config)

        assert line.startswith("nexus-mirror: node node-a: write config.toml: cannot back up ")
        assert line.endswith("config.toml was not changed")
        assert_unchanged(node, before)
        filler.unlink()
        report = stack.up(config).outputs["nodes"]["node-a"]
        assert report["criPlugin"] == "ok"
        assert (node.certs_dir / "docker.io" / "hosts.toml").is_file()
        assert runs_current_config(node)
        assert stray_files(state, node.dir) == []


def test_read_only_certs_dir_keeps_old_files(stack: Stack, lab: Lab) -> None:
    node = lab.node("node-a")
    certs = node.certs_dir
    stack.up(fault_config(stack, certs))
    old = tree(certs)
    changed = fault_config(stack, certs, extra_header="y")
    changed["registries"]["ghcr.io"] = {"nexus": {"port": lab.mirror_port}}
    with read_only(certs):
        before = snapshot(node)

        line = failed_apply_line(stack, changed)

        assert line.startswith("nexus-mirror: node node-a: write hosts files: cannot ")
        assert "Read-only file system" in line
        assert_unchanged(node, before)
    assert tree(certs) == old
    assert cri_plugin_status(node) == "ok"
    report = stack.up(changed).outputs["nodes"]["node-a"]
    assert (certs / "ghcr.io" / "hosts.toml").is_file()
    assert "X-Pad" in (certs / "docker.io" / "hosts.toml").read_text()
    assert report["criPlugin"] == "ok"
    assert stray_files(certs) == []
