"""Smoke tests for the loopback lab that the end-to-end tests run against.

They need root and the packages that lab/install.sh installs. When the lab
does not start, every test that uses it errors with lab.sh's output, and none
is skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e import cri
from tests.e2e.lab import (
    IMAGE_REFERENCE,
    IMAGE_REPOSITORY,
    LAB_SCRIPT,
    NODE_SCRIPT,
    Lab,
    Node,
    PushedImage,
    build_image,
    cri_plugin_status,
    find_free_base_port,
    lab_ports,
    load_lab,
    mirror_log,
    run_ssh,
    running_lab,
    start_lab,
    stop_lab,
)

# Environment for ctr, which fetches images itself rather than in the
# daemon: any request to a host but loopback goes to a closed loopback port.
BLOCKING_PROXY = "http://127.0.0.1:9"
CTR_ENVIRONMENT = {
    **os.environ,
    "HTTP_PROXY": BLOCKING_PROXY,
    "HTTPS_PROXY": BLOCKING_PROXY,
    "http_proxy": BLOCKING_PROXY,
    "https_proxy": BLOCKING_PROXY,
    "NO_PROXY": "localhost,127.0.0.1,::1",
    "no_proxy": "localhost,127.0.0.1,::1",
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("lab")) as started:
        yield started


@dataclass(frozen=True)
class MirroredNode:
    """node-a after its CRI registry config_path was set and containerd restarted over SSH."""

    node: Node
    image: PushedImage
    old_pid: str
    new_pid: str
    restart_returncode: int
    restart_stderr: str


@pytest.fixture(scope="module")
def mirrored_node(lab: Lab) -> MirroredNode:
    node = lab.node("node-a")
    image = build_image(lab)

    hosts_file = node.certs_dir / "docker.io" / "hosts.toml"
    hosts_file.parent.mkdir(parents=True, exist_ok=True)
    hosts_file.write_text(f'[host."{lab.mirror_url}"]\n  capabilities = ["pull", "resolve"]\n')
    registry_table = '[plugins."io.containerd.grpc.v1.cri".registry]'
    with node.config.open("a") as config:
        config.write(f'\n{registry_table}\n  config_path = "{node.certs_dir}"\n')

    old_pid = node.pid_file.read_text().strip()
    # Over SSH, as nexus-mirror runs it: the command must return although the
    # new containerd keeps running after the session ends.
    returncode, _, stderr = run_ssh(lab, node.restart_command, timeout=60)
    new_pid = node.pid_file.read_text().strip() if node.pid_file.exists() else ""
    return MirroredNode(node, image, old_pid, new_pid, returncode, stderr)


def process_running(pid: str) -> bool:
    """Return whether process PID exists and is not a zombie.

    An exited lab process stays a zombie until init reaps it, which the init
    of some sandboxes does only after a delay.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def listening_addresses(port: int) -> list[str]:
    """Return the local addresses of the TCP sockets listening on PORT."""
    output = subprocess.run(
        ["ss", "-H", "-ltn", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split()[3].rsplit(":", 1)[0] for line in output.splitlines() if line.strip()]


def test_cri_plugin_ok(lab: Lab) -> None:
    assert cri_plugin_status(lab.node("node-a")) == "ok"


def test_services_listen_on_loopback_only(lab: Lab) -> None:
    for port in lab_ports(lab.upstream_port, len(lab.nodes)):
        addresses = listening_addresses(port)
        assert addresses, f"nothing listens on port {port}"
        assert set(addresses) == {"127.0.0.1"}, f"port {port} listens on {addresses}"


def test_node_config_leaves_config_path_unset(lab: Lab) -> None:
    config = tomllib.loads(lab.node("node-a").config.read_text())
    cri_config = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert config["version"] == 2
    assert "config_path" not in cri_config.get("registry", {})


def test_ssh_command_runs_as_root(lab: Lab) -> None:
    returncode, stdout, stderr = run_ssh(lab, "id -u && cat", stdin="stdin reaches the command\n")
    assert returncode == 0, stderr
    assert stdout == "0\nstdin reaches the command\n"


def test_restart_over_ssh_replaces_containerd(mirrored_node: MirroredNode) -> None:
    assert mirrored_node.restart_returncode == 0, mirrored_node.restart_stderr
    assert mirrored_node.new_pid
    assert mirrored_node.new_pid != mirrored_node.old_pid
    assert not process_running(mirrored_node.old_pid)
    assert cri_plugin_status(mirrored_node.node) == "ok"


def test_cri_pull_goes_through_mirror(lab: Lab, mirrored_node: MirroredNode) -> None:
    image = mirrored_node.image
    with cri.ImageServiceClient(mirrored_node.node.socket) as client:
        image_ref = client.pull_image(IMAGE_REFERENCE)
        status = client.image_status(IMAGE_REFERENCE)
        client.remove_image(IMAGE_REFERENCE)
        status_after_remove = client.image_status(IMAGE_REFERENCE)

    assert image_ref == image.config_digest
    assert status is not None
    assert IMAGE_REFERENCE in status.repo_tags
    assert f"docker.io/{IMAGE_REPOSITORY}@{image.manifest_digest}" in status.repo_digests
    assert f"/v2/{IMAGE_REPOSITORY}/manifests/1?ns=docker.io" in mirror_log(lab)
    assert status_after_remove is None


def test_ctr_pull_names_mirror_host(lab: Lab, mirrored_node: MirroredNode) -> None:
    node = mirrored_node.node
    ctr = ["ctr", "--address", str(node.socket), "--namespace", "nm-smoke"]
    pull = subprocess.run(
        [*ctr, "--debug", "images", "pull", "--hosts-dir", str(node.certs_dir), IMAGE_REFERENCE],
        capture_output=True,
        text=True,
        timeout=60,
        env=CTR_ENVIRONMENT,
        check=False,
    )
    mirror_host = f"127.0.0.1:{lab.mirror_port}"
    manifest_url = f"{lab.mirror_url}/v2/{IMAGE_REPOSITORY}/manifests/1?ns=docker.io"
    manifest_digest = mirrored_node.image.manifest_digest
    manifest_responses = [
        line
        for line in pull.stderr.splitlines()
        if "fetch response received" in line and f'url="{manifest_url}"' in line
    ]
    assert pull.returncode == 0, pull.stderr
    assert f'msg=resolving host="{mirror_host}"' in pull.stderr
    assert f'msg=resolved desc.digest="{manifest_digest}" host="{mirror_host}"' in pull.stderr
    assert len(manifest_responses) == 1, pull.stderr
    assert 'response.status="200 OK"' in manifest_responses[0]

    remove = subprocess.run(
        [*ctr, "images", "rm", IMAGE_REFERENCE], capture_output=True, text=True, check=False
    )
    listing = subprocess.run(
        [*ctr, "images", "ls", "-q"], capture_output=True, text=True, check=True
    )
    assert remove.returncode == 0, remove.stderr
    assert listing.stdout.strip() == ""


def test_stop_ends_recorded_processes(tmp_path: Path) -> None:
    # An explicit base port keeps this lab clear of the module's lab, also
    # when NEXUS_MIRROR_LAB_BASE_PORT fixes the base port of that one.
    started = start_lab(tmp_path / "lab", nodes=2, base_port=find_free_base_port(node_count=2))
    pid_files = sorted(started.dir.glob("*.pid")) + [node.pid_file for node in started.nodes]
    pids = [pid_file.read_text().strip() for pid_file in pid_files]
    stream_ports = [node.stream_port for node in started.nodes]
    node_b_status = cri_plugin_status(started.node("node-b"))
    stop_lab(started.dir)

    assert len(pids) == 5
    assert len(set(stream_ports)) == 2
    assert node_b_status == "ok"
    for pid_file, pid in zip(pid_files, pids, strict=True):
        assert not process_running(pid), f"{pid_file.name}: pid {pid} still runs after stop"
        assert not pid_file.exists()


def test_start_rejects_port_in_use(tmp_path: Path) -> None:
    base_port = find_free_base_port(node_count=1)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", base_port + 1))
        blocker.listen()
        result = subprocess.run(
            ["sh", str(LAB_SCRIPT), "start", str(tmp_path / "lab"), "--base-port", str(base_port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode != 0
    assert f"port 127.0.0.1:{base_port + 1} is already in use" in result.stderr
    assert not (tmp_path / "lab" / "upstream.pid").exists()


def test_node_start_failure_prints_containerd_log(tmp_path: Path) -> None:
    node_dir = tmp_path / "node-x"
    node_dir.mkdir()
    (node_dir / "config.toml").write_text("version = 2\n[grpc\n")
    result = subprocess.run(
        ["sh", str(NODE_SCRIPT), "start", str(node_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "exited during start" in result.stderr
    assert f"last lines of {node_dir}/containerd.log" in result.stderr
    assert "toml" in result.stderr.lower()
    assert not (node_dir / "containerd.pid").exists()


def test_load_lab_reads_restart_command(lab: Lab) -> None:
    reloaded = load_lab(lab.dir)
    node = reloaded.node("node-a")
    assert node.restart_command == f"sh {NODE_SCRIPT} restart {node.dir}"
    assert node.socket == node.dir / "containerd.sock"
