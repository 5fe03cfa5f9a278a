"""The render command: a stack file to each node's files, without Pulumi."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from components.render import main
from tests.program_run import ROOT

STACK = {
    "config": {
        "nexus-mirror:nexus": {"url": "https://nexus.example.net"},
        "nexus-mirror:registries": {
            "docker.io": {
                "nexus": {"port": 8082},
                "mirrors": [
                    {"url": "https://m.internal", "headers": {"X-Token": {"secure": "v1:abc"}}}
                ],
            }
        },
        "nexus-mirror:nodes": [{"name": "worker-1", "host": "10.0.0.11"}],
        "nexus-mirror:sshPrivateKey": {"secure": "v1:c2VjcmV0"},
    }
}


def _write(tmp_path: Path, document: dict) -> Path:
    (tmp_path / "Pulumi.test.yaml").write_text(yaml.safe_dump(document))
    return tmp_path


def test_render_writes_node_files(tmp_path: Path) -> None:
    project = _write(tmp_path, STACK)
    assert (
        main(["render", "--stack", "test", "--out", str(tmp_path / "out"), "--dir", str(project)])
        == 0
    )
    node = tmp_path / "out" / "worker-1"
    hosts = (node / "etc/containerd/certs.d/docker.io/hosts.toml").read_text()
    assert '[host."https://nexus.example.net:8082"]' in hosts
    assert (node / "hosts.stdin.sh").read_text().rstrip().endswith('nm_main "$@" </dev/null')
    assert (node / "config.stdin.sh").exists()


def test_render_masks_encrypted_values(tmp_path: Path) -> None:
    project = _write(tmp_path, STACK)
    main(["render", "--stack", "test", "--out", str(tmp_path / "out"), "--dir", str(project)])
    hosts = (tmp_path / "out/worker-1/etc/containerd/certs.d/docker.io/hosts.toml").read_text()
    assert 'X-Token = "[secret]"' in hosts
    everything = "".join(p.read_text() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert "v1:abc" not in everything
    assert "c2VjcmV0" not in everything


def test_render_rejects_invalid_config(tmp_path: Path) -> None:
    document = yaml.safe_load(yaml.safe_dump(STACK))
    document["config"]["nexus-mirror:nodes"] = [{"host": "10.0.0.11", "port": 70000}]
    project = _write(tmp_path, document)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "components",
            "render",
            "--stack",
            "test",
            "--out",
            str(tmp_path / "out"),
            "--dir",
            str(project),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "nexus-mirror:nodes[0].port: port is out of range (got 70000)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_render_missing_stack_file(tmp_path: Path) -> None:
    assert (
        main(["render", "--stack", "nope", "--out", str(tmp_path / "out"), "--dir", str(tmp_path)])
        == 2
    )


def test_render_kubernetes_masks_secret(tmp_path: Path) -> None:
    document = yaml.safe_load(yaml.safe_dump(STACK))
    config = document["config"]
    del config["nexus-mirror:nodes"], config["nexus-mirror:sshPrivateKey"]
    config["nexus-mirror:delivery"] = "kubernetes"
    config["nexus-mirror:kubernetes"] = {"image": "nexus.example.net:8082/library/busybox:1.37"}
    config["nexus-mirror:nexus"]["username"] = "puller"
    config["nexus-mirror:nexusPassword"] = {"secure": "v1:cGFzcw=="}
    project = _write(tmp_path, document)
    out = tmp_path / "out"
    assert main(["render", "--stack", "test", "--out", str(out), "--dir", str(project)]) == 0
    out = out / "kubernetes"
    kinds = [yaml.safe_load(p.read_text())["kind"] for p in sorted(out.iterdir())]
    assert "DaemonSet" in kinds
    assert "ConfigMap" in kinds
    secret = next(yaml.safe_load(p.read_text()) for p in out.iterdir() if "-secret-" in p.name)
    values = secret.get("stringData") or secret.get("data") or {}
    assert values
    assert set(values.values()) == {"[secret]"}


def test_render_replaces_stale_files(tmp_path: Path) -> None:
    project = _write(tmp_path, STACK)
    stale = tmp_path / "out" / "worker-1" / "stale"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier render")
    assert (
        main(["render", "--stack", "test", "--out", str(tmp_path / "out"), "--dir", str(project)])
        == 0
    )
    assert not stale.exists()


def test_render_out_is_a_file(tmp_path: Path) -> None:
    project = _write(tmp_path, STACK)
    (tmp_path / "file").write_text("")
    assert (
        main(["render", "--stack", "test", "--out", str(tmp_path / "file"), "--dir", str(project)])
        == 1
    )


def test_render_rejects_duplicate_keys(tmp_path: Path) -> None:
    text = yaml.safe_dump(STACK) + "  nexus-mirror:nodes: []\n"
    (tmp_path / "Pulumi.test.yaml").write_text(text)
    assert (
        main(["render", "--stack", "test", "--out", str(tmp_path / "out"), "--dir", str(tmp_path)])
        == 1
    )


def test_render_rejects_key_without_namespace(tmp_path: Path) -> None:
    document = yaml.safe_load(yaml.safe_dump(STACK))
    document["config"]["nodes"] = document["config"].pop("nexus-mirror:nodes")
    project = _write(tmp_path, document)
    assert (
        main(["render", "--stack", "test", "--out", str(tmp_path / "out"), "--dir", str(project)])
        == 1
    )
