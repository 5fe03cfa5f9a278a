"""Node reports to the ``nodes`` output: merging, the served-by decision, warnings."""

from __future__ import annotations

import json
from typing import Any

from components.config import parse_config
from components.report import node_output, parse_report

CONFIG = parse_config(
    {
        "nexus": {"url": "https://nexus.example.net"},
        "registries": {
            "docker.io": {"nexus": {"port": 8082}},
            "_default": {"nexus": {"port": 8090}},
        },
        "nodes": [{"name": "worker-1", "host": "10.0.0.11"}],
    }
)
NODE = CONFIG.nodes[0]


def _hosts(**fields: Any) -> str:
    report = {
        "mode": "hosts",
        "containerdVersion": "1.7.22",
        "configPath": "/etc/containerd/certs.d",
        "criPlugin": "ok",
        "files": [],
        "mirrors": [],
        "verification": None,
    }
    report.update(fields)
    return "restart output before the report\n" + json.dumps(report)


def test_parse_report_takes_last_line() -> None:
    assert parse_report('noise\n{"mode": "config"}\n') == {"mode": "config"}


def test_parse_report_without_json() -> None:
    assert parse_report("no report") == {"error": "the node printed no JSON report"}


def test_parse_report_empty() -> None:
    assert parse_report("") == {}


def test_served_by_mirror() -> None:
    verification = {
        "image": "docker.io/library/busybox:latest",
        "servedBy": "nexus.example.net:8082",
        "ok": True,
    }
    output = node_output(CONFIG, NODE, "", _hosts(verification=verification))
    assert output["verification"]["throughMirror"] is True


def test_failed_pull_not_through_mirror() -> None:
    # A mirror that returns HTML resolves the tag, then the pull fails.
    verification = {
        "image": "docker.io/library/busybox:latest",
        "servedBy": "nexus.example.net:8082",
        "ok": False,
    }
    output = node_output(CONFIG, NODE, "", _hosts(verification=verification))
    assert output["verification"]["throughMirror"] is False


def test_served_by_upstream() -> None:
    verification = {"image": "busybox", "servedBy": "registry-1.docker.io"}
    output = node_output(CONFIG, NODE, "", _hosts(verification=verification))
    assert output["verification"]["throughMirror"] is False


def test_other_registry_uses_default_mirror() -> None:
    verification = {"image": "quay.io/org/app:1", "servedBy": "nexus.example.net:8090", "ok": True}
    output = node_output(CONFIG, NODE, "", _hosts(verification=verification))
    assert output["verification"]["throughMirror"] is True


def test_config_report_fields() -> None:
    config_stdout = json.dumps({"configChanged": True, "restarted": False, "criPlugin": "ok"})
    output = node_output(CONFIG, NODE, config_stdout, _hosts())
    assert output["configChanged"] is True
    assert output["restarted"] is False
    assert output["warnings"] == []


def test_warns_when_containerd_reads_other_directory() -> None:
    output = node_output(CONFIG, NODE, "", _hosts(configPath="/etc/other/certs.d"))
    assert any("bypass" in w and "/etc/other/certs.d" in w for w in output["warnings"])


def test_warns_when_config_path_unset() -> None:
    output = node_output(CONFIG, NODE, "", _hosts(configPath=""))
    assert any("config_path is nothing" in w for w in output["warnings"])


def test_warns_default_on_old_containerd() -> None:
    output = node_output(CONFIG, NODE, "", _hosts(containerdVersion="1.6.12"))
    assert any("ignores _default" in w for w in output["warnings"])


def test_warns_mirror_down() -> None:
    mirrors = [
        {
            "namespace": "docker.io",
            "url": "https://nexus.example.net:8082",
            "status": None,
            "up": False,
        }
    ]
    output = node_output(CONFIG, NODE, "", _hosts(mirrors=mirrors))
    assert any("answered nothing" in w for w in output["warnings"])


def test_warns_when_containerd_silent() -> None:
    output = node_output(CONFIG, NODE, "", _hosts(criPlugin=None))
    assert any("did not respond" in w for w in output["warnings"])


def test_warns_when_test_pull_failed() -> None:
    verification = {
        "image": "busybox",
        "servedBy": None,
        "ok": False,
        "error": "ctr: failed to dial",
    }
    output = node_output(CONFIG, NODE, "", _hosts(verification=verification))
    assert any("test pull of busybox failed: ctr: failed to dial" in w for w in output["warnings"])
