"""The Kubernetes sync step run for real: kubernetes-sync.sh on a lab containerd node.

There is no cluster here, so each test lays out what a sync pod mounts: the
ConfigMap and Secret data in a directory shaped like kubelet's projected
volume (keys linked through ..data), the scripts ConfigMap, and the host's
configPath and state directory at their own paths. The wrapper then runs
exactly as the pod's command, readiness probe and preStop hook run it, with
BusyBox's sh, awk and sed first on PATH, as in a busybox image. The config
step enters the namespaces of this test process with BusyBox's nsenter, in
place of the host's PID 1, and then runs with this machine's own tools, as it
runs with the host's tools on a node.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from components.config import parse_config
from components.hosts_toml import render_hosts_toml
from components.kubernetes.bundle import Bundle, build_bundle
from tests.e2e.conftest import reset_node
from tests.e2e.cri import ImageServiceClient
from tests.e2e.lab import IMAGE_REFERENCE, Lab, build_image, mirror_log, start_lab, stop_lab

SYNC_SCRIPT = "kubernetes-sync.sh"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A lab of its own (one node, free ports) with the test image in the upstream."""
    directory = Path(tempfile.mkdtemp(prefix="nm-k8s-", dir="/tmp"))
    started = start_lab(directory, nodes=1)
    try:
        build_image(started)
        node = started.node("node-a")
        shutil.copy2(node.config, node.dir / "config.toml.pristine")
        yield started
    finally:
        stop_lab(directory)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def busybox_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of BusyBox applet links, and beside it one with nsenter only.

    lab/install.sh installs busybox.
    """
    directory = tmp_path_factory.mktemp("busybox") / "bin"
    directory.mkdir()
    subprocess.run(["busybox", "--install", "-s", str(directory)], check=True, timeout=30)
    nsenter_only = directory.parent / "nsenter-bin"
    nsenter_only.mkdir()
    (nsenter_only / "nsenter").symlink_to(directory / "nsenter")
    return directory


@dataclass
class Pod:
    """What one sync pod mounts, and its identity."""

    lab: Lab
    root: Path
    uid: str
    busybox_bin: Path

    @property
    def files(self) -> Path:
        return self.root / "files"

    @property
    def scripts(self) -> Path:
        return self.root / "bin"

    def mount(self, bundle: Bundle) -> None:
        """Lay out the bundle as kubelet updates a projected volume: a new ..data target."""
        self.files.mkdir(parents=True, exist_ok=True)
        generation = self.files / f"..{time.monotonic_ns()}"
        generation.mkdir()
        data = {**bundle.config_data, **bundle.secret_data}
        for key, content in data.items():
            (generation / key).write_text(content, encoding="utf-8")
        link = self.files / "..data_tmp"
        link.symlink_to(generation.name)
        link.rename(self.files / "..data")
        for entry in self.files.iterdir():
            if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in data:
                entry.unlink()
        for key in data:
            if not (self.files / key).is_symlink():
                (self.files / key).symlink_to(f"..data/{key}")
        self.scripts.mkdir(exist_ok=True)
        for name, content in bundle.scripts.items():
            (self.scripts / name).write_text(content, encoding="utf-8")

    def environment(self, mode: str = "run") -> dict[str, str]:
        run_dir = self.root / "run"
        tools = self.busybox_bin.parent / "nsenter-bin" if mode == "config" else self.busybox_bin
        run_dir.mkdir(exist_ok=True)
        return {
            **os.environ,
            "NM_NODE": "node-a",
            "NM_POD_UID": self.uid,
            "NM_K8S_FILES": str(self.files),
            "NM_K8S_RUN_DIR": str(run_dir),
            "NM_K8S_INTERVAL": "1",
            "NM_K8S_HOST_PID": str(os.getpid()),
            "TMPDIR": str(run_dir),
            "PATH": f"{tools}:{os.environ['PATH']}",
        }

    def run(self, mode: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(self.scripts / SYNC_SCRIPT), mode],
            env=self.environment(mode),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> subprocess.Popen[str]:
        """Start the pod's main process, ``run``."""
        return subprocess.Popen(
            ["sh", str(self.scripts / SYNC_SCRIPT), "run"],
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )


def _config(lab: Lab, registries: dict[str, Any] | None = None, manage: bool = False) -> Any:
    node = lab.node("node-a")
    values = {
        "nexus": {"url": "http://127.0.0.1"},
        "registries": registries or {"docker.io": {"nexus": {"port": lab.mirror_port}}},
        "delivery": "kubernetes",
        "kubernetes": {"image": "busybox:1.37", "manageConfigFile": manage},
        "containerd": {
            "configPath": str(node.certs_dir),
            "configFile": str(node.config),
            "restartCommand": node.restart_command,
            "logCommand": node.log_command,
            "address": str(node.socket),
            "stateDir": str(node.dir / "nexus-mirror-state"),
            "restartTimeout": 30,
        },
    }
    return parse_config(values)


@pytest.fixture
def pod(lab: Lab, tmp_path: Path, busybox_bin: Path) -> Pod:
    reset_node(lab, "node-a")
    return Pod(lab, tmp_path / "pod-1", "pod-1", busybox_bin)


def _succeeded(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _wait_until(condition: Any, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def _pull_through_mirror(lab: Lab) -> None:
    before = len(mirror_log(lab).splitlines())
    with ImageServiceClient(lab.node("node-a").socket) as client:
        if client.image_status(IMAGE_REFERENCE):
            client.remove_image(IMAGE_REFERENCE)
        client.pull_image(IMAGE_REFERENCE)
    new_lines = mirror_log(lab).splitlines()[before:]
    assert any("/v2/library/nm-test/manifests/1?ns=docker.io" in line for line in new_lines), (
        new_lines[-5:]
    )


def test_readiness_false_before_sync_true_after(lab: Lab, pod: Pod) -> None:
    config = _config(lab)
    pod.mount(build_bundle(config))
    before = pod.run("check")
    assert before.returncode == 1
    assert "never synced" in before.stdout
    _succeeded(pod.run("sync"))
    assert "all 1 files match" in _succeeded(pod.run("check"))
    hosts = lab.node("node-a").certs_dir / "docker.io" / "hosts.toml"
    # The same bytes SSH delivery writes.
    assert hosts.read_text() == render_hosts_toml(config.namespaces[0])
    hosts.write_text(hosts.read_text() + "# edited by hand\n")
    edited = pod.run("check")
    assert edited.returncode == 1
    assert "differs from the wanted content" in edited.stdout


def test_config_and_sync_pull_through_mirror(lab: Lab, pod: Pod) -> None:
    node = lab.node("node-a")
    pod.mount(build_bundle(_config(lab, manage=True)))
    pid_before = node.pid_file.read_text()
    report = _succeeded(pod.run("config"))
    assert '"configChanged":true' in report
    assert '"restarted":true' in report
    assert node.pid_file.read_text() != pid_before
    assert f'config_path = "{node.certs_dir}"' in node.config.read_text()
    _succeeded(pod.run("sync"))
    _succeeded(pod.run("check"))
    _pull_through_mirror(lab)
    # A second config run finds config_path set and restarts nothing.
    pid_after = node.pid_file.read_text()
    assert '"configChanged":false' in _succeeded(pod.run("config"))
    assert node.pid_file.read_text() == pid_after


def test_removed_registry_removes_only_its_files(lab: Lab, pod: Pod) -> None:
    certs = lab.node("node-a").certs_dir
    foreign = certs / "ghcr.io" / "hosts.toml"
    foreign.parent.mkdir(parents=True)
    foreign.write_text('server = "https://ghcr.io"\n[host."https://other-tool.internal"]\n')
    mirror = {"nexus": {"port": lab.mirror_port}}
    pod.mount(build_bundle(_config(lab, {"docker.io": mirror, "quay.io": mirror})))
    _succeeded(pod.run("sync"))
    assert (certs / "quay.io" / "hosts.toml").is_file()
    notes = certs / "quay.io" / "notes.txt"
    notes.write_text("left here by someone else\n")
    docker = (certs / "docker.io" / "hosts.toml").read_bytes()

    pod.mount(build_bundle(_config(lab, {"docker.io": mirror})))
    assert pod.run("check").returncode == 1
    _succeeded(pod.run("sync"))
    assert not (certs / "quay.io" / "hosts.toml").exists()
    assert notes.read_text() == "left here by someone else\n"
    assert (certs / "docker.io" / "hosts.toml").read_bytes() == docker
    assert foreign.read_text().startswith('server = "https://ghcr.io"')
    _succeeded(pod.run("check"))


def test_stop_removes_files_and_restores_backup(lab: Lab, pod: Pod) -> None:
    certs = lab.node("node-a").certs_dir
    original = 'server = "https://registry-1.docker.io"\n[host."https://old-mirror.internal"]\n'
    (certs / "docker.io").mkdir(parents=True)
    (certs / "docker.io" / "hosts.toml").write_text(original)
    pod.mount(build_bundle(_config(lab)))
    _succeeded(pod.run("sync"))
    assert (certs / "docker.io" / "hosts.toml").read_text() != original
    report = _succeeded(pod.run("stop"))
    assert '"mode":"delete"' in report
    assert (certs / "docker.io" / "hosts.toml").read_text() == original
    state = lab.node("node-a").dir / "nexus-mirror-state"
    assert not (state / "managed").exists()
    assert not (state / "kubernetes-pod").exists()


def test_newer_pod_takes_over_without_gap(lab: Lab, pod: Pod, tmp_path: Path) -> None:
    node = lab.node("node-a")
    hosts = node.certs_dir / "docker.io" / "hosts.toml"
    owner = node.dir / "nexus-mirror-state" / "kubernetes-pod"
    bundle = build_bundle(_config(lab))
    pod.mount(bundle)
    newer = Pod(lab, tmp_path / "pod-2", "pod-2", pod.busybox_bin)
    newer.mount(bundle)
    old_process = pod.start()
    try:
        _wait_until(lambda: pod.run("check").returncode == 0)
        assert owner.read_text() == "pod-1\n"
        newer_process = newer.start()
        try:
            _wait_until(lambda: owner.read_text() == "pod-2\n")
            # A rollout with maxSurge stops the old pod once the newer one is
            # ready: its preStop hook leaves the files to the newer pod.
            stopped = pod.run("stop")
            assert stopped.returncode == 0, stopped.stderr
            assert "has claimed the node; keeping its files" in stopped.stderr
            assert hosts.is_file()
            _succeeded(newer.run("check"))
            # The newer pod writes a removed file again on its next check.
            hosts.unlink()
            _wait_until(hosts.is_file)
            _succeeded(newer.run("stop"))
            assert not hosts.exists()
            assert not owner.exists()
        finally:
            newer_process.send_signal(signal.SIGTERM)
            assert newer_process.wait(timeout=10) == 0
    finally:
        old_process.send_signal(signal.SIGTERM)
        assert old_process.wait(timeout=10) == 0
