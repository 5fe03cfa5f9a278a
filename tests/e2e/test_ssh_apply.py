"""End to end over real SSH: the program applied to real containerd nodes on loopback.

Every scenario proves its outcome through a CRI PullImage call on the node's
containerd socket (the call kubelet makes) and the mirror's access log.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from components.render import render_stack
from tests.e2e.conftest import Stack
from tests.e2e.cri import ImageServiceClient
from tests.e2e.lab import IMAGE_REFERENCE, Lab, build_image, cri_plugin_status, mirror_log, run_ssh
from tests.e2e.replay import CommandFailed
from tests.e2e.stack import write_stack_file


def _pull_through_mirror(lab: Lab, node: str, image: str = IMAGE_REFERENCE) -> None:
    """Pull ``image`` by CRI on ``node`` and check the mirror served it for docker.io."""
    before = len(mirror_log(lab).splitlines())
    with ImageServiceClient(lab.node(node).socket) as client:
        client.remove_image(image) if client.image_status(image) else None
        client.pull_image(image)
        assert client.image_status(image) is not None
    new_lines = mirror_log(lab).splitlines()[before:]
    repository, _, tag = image.removeprefix("docker.io/").rpartition(":")
    assert any(f"/v2/{repository}/manifests/{tag}?ns=docker.io" in line for line in new_lines), (
        new_lines[-5:]
    )


def _report(run, node: str = "node-a") -> dict:
    return run.outputs["nodes"][node]


def test_first_apply_patches_restarts_and_pulls_through_mirror(stack: Stack, lab: Lab) -> None:
    run = stack.up(stack.config(verify={"image": IMAGE_REFERENCE}))
    node = _report(run)
    assert node["configChanged"] is True
    assert node["restarted"] is True
    assert node["criPlugin"] == "ok"
    assert node["configPath"] == str(lab.node("node-a").certs_dir)
    assert node["containerdVersion"].startswith("1.6.")
    assert node["verification"]["throughMirror"] is True
    assert node["verification"]["servedBy"] == f"127.0.0.1:{lab.mirror_port}"
    assert [m["up"] for m in node["mirrors"]] == [True]
    assert 'config_path = "' in lab.node("node-a").config.read_text()
    assert len(stack.executions("create", "-config")) == 1
    _pull_through_mirror(lab, "node-a")


def test_same_apply_again_changes_nothing(stack: Stack, lab: Lab) -> None:
    config = stack.config()
    stack.up(config)
    config_before = lab.node("node-a").config.read_bytes()
    pid_before = lab.node("node-a").pid_file.read_text()
    count = len(stack.executions())
    stack.up(config)
    assert len(stack.executions()) == count
    assert lab.node("node-a").config.read_bytes() == config_before
    assert lab.node("node-a").pid_file.read_text() == pid_before


def test_node_script_rerun_reports_nothing_changed(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    # A replaced resource or a manual rerun runs a command again with the same input.
    config = stack.config()
    stack.up(config)
    stack_file = write_stack_file(tmp_path / "Pulumi.rerun.yaml", config)
    render_stack(stack_file, tmp_path / "rendered")
    for mode in ("config", "hosts"):
        stdin = (tmp_path / "rendered" / "node-a" / f"{mode}.stdin.sh").read_text()
        code, stdout, stderr = run_ssh(lab, f"sh -s -- {mode}", stdin)
        assert code == 0, stderr
        report = json.loads(stdout.strip().splitlines()[-1])
        if mode == "config":
            assert report["configChanged"] is False
            assert report["restarted"] is False
        else:
            assert report["changed"] is False
            assert {f["action"] for f in report["files"]} == {"unchanged"}


def test_mirror_change_needs_no_restart(stack: Stack, lab: Lab) -> None:
    stack.up(stack.config())
    pid_before = lab.node("node-a").pid_file.read_text()
    build_image(lab, tags=("2",), text="second image")
    registries = {
        "docker.io": {
            "nexus": {"port": lab.mirror_port},
            "mirrors": [
                {
                    "url": f"http://127.0.0.1:{lab.upstream_port}",
                    "capabilities": ["pull", "resolve"],
                }
            ],
        }
    }
    run = stack.up(stack.config(registries=registries))
    assert lab.node("node-a").pid_file.read_text() == pid_before
    # Only the hosts command runs again: one SSH session, no restart.
    assert [e.resource for e in stack.executions("update")] == ["node-a-hosts"]
    assert len(stack.executions("create", "-config")) == 1
    hosts = (lab.node("node-a").certs_dir / "docker.io" / "hosts.toml").read_text()
    assert f'[host."http://127.0.0.1:{lab.upstream_port}"]' in hosts
    assert len(_report(run)["mirrors"]) == 2
    _pull_through_mirror(lab, "node-a", "docker.io/library/nm-test:2")


def test_registry_removed_leaves_unmanaged_directory(stack: Stack, lab: Lab) -> None:
    certs = lab.node("node-a").certs_dir
    unmanaged = certs / "registry.other:5000"
    unmanaged.mkdir(parents=True)
    (unmanaged / "hosts.toml").write_text(
        'server = "https://registry.other:5000"\n[host."https://x"]\n'
    )
    registries = {
        "docker.io": {"nexus": {"port": lab.mirror_port}},
        "quay.io": {"nexus": {"port": lab.mirror_port}},
    }
    stack.up(stack.config(registries=registries))
    assert (certs / "quay.io" / "hosts.toml").exists()
    stack.up(stack.config(registries={"docker.io": {"nexus": {"port": lab.mirror_port}}}))
    assert not (certs / "quay.io").exists()
    assert (
        (unmanaged / "hosts.toml").read_text().startswith('server = "https://registry.other:5000"')
    )
    _pull_through_mirror(lab, "node-a")


def test_destroy_restores_preexisting_hosts_toml(stack: Stack, lab: Lab) -> None:
    certs = lab.node("node-a").certs_dir
    (certs / "docker.io").mkdir(parents=True)
    original = 'server = "https://registry-1.docker.io"\n[host."https://old-mirror.internal"]\n'
    (certs / "docker.io" / "hosts.toml").write_text(original)
    stack.up(stack.config())
    assert (certs / "docker.io" / "hosts.toml").read_text() != original
    stack.destroy()
    assert (certs / "docker.io" / "hosts.toml").read_text() == original
    assert sorted(p.name for p in (certs / "docker.io").iterdir()) == ["hosts.toml"]
    assert cri_plugin_status(lab.node("node-a")) == "ok"


def test_deprecated_mirrors_rejected_file_untouched(stack: Stack, lab: Lab) -> None:
    node = lab.node("node-a")
    node.config.write_text(
        node.config.read_text()
        + '\n[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
        + '  endpoint = ["https://old-mirror.internal"]\n'
    )
    subprocess.run(["sh", "-c", node.restart_command], check=True, timeout=60, capture_output=True)
    before = node.config.read_bytes()
    with pytest.raises(CommandFailed) as failure:
        stack.up(stack.config())
    message = str(failure.value)
    assert "registry.mirrors" in message
    assert "node-a" in message
    assert node.config.read_bytes() == before
    assert cri_plugin_status(node) == "ok"
    assert not stack.executions(resource_suffix="-hosts")


def test_restart_breaking_cri_is_rolled_back(stack: Stack, lab: Lab) -> None:
    node = lab.node("node-a")
    before = node.config.read_bytes()
    flag = node.dir / "break-next-restart"
    flag.touch()
    # The first restart also adds deprecated mirrors, so the CRI plugin fails to
    # load beside config_path; the restart after the roll-back is a plain one.
    mirrors = (
        "printf '%s\\n' '[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]' "
        f"'  endpoint = [\"https://old-mirror.internal\"]' >> {node.config}"
    )
    breaking = f"if [ -e {flag} ]; then rm -f {flag}; {mirrors}; fi; {node.restart_command}"
    config = stack.config()
    config["nodes"][0]["containerd"]["restartCommand"] = breaking
    config["nodes"][0]["containerd"]["restartTimeout"] = 10
    with pytest.raises(CommandFailed) as failure:
        stack.up(config)
    message = str(failure.value)
    assert "node-a" in message
    assert "cannot be set when" in message, message
    assert node.config.read_bytes() == before
    assert cri_plugin_status(node) == "ok"
    assert not stack.executions(resource_suffix="-hosts")


def test_two_nodes_restart_one_at_a_time(stack: Stack, lab: Lab) -> None:
    config = stack.config(["node-a", "node-b"], rollout={"maxParallelRestarts": 1})
    run = stack.up(config)
    spans = sorted((e.started, e.finished) for e in stack.executions("create", "-config"))
    assert len(spans) == 2
    assert spans[0][1] <= spans[1][0]
    for name in ("node-a", "node-b"):
        assert _report(run, name)["restarted"] is True
        _pull_through_mirror(lab, name)


def test_two_nodes_hosts_in_parallel(stack: Stack, lab: Lab) -> None:
    config = stack.config(["node-a", "node-b"], rollout={"maxParallelRestarts": 2})
    started = time.time()
    stack.up(config)
    spans = sorted((e.started, e.finished) for e in stack.executions("create", "-config"))
    assert spans[1][0] < spans[0][1], "config commands of one batch should overlap"
    assert time.time() - started < 120
