"""Faults of the mirror: down at apply time or at pull time, or answering errors or HTML.

docker.io falls back to registry-1.docker.io, which the lab's containerd
reaches only through a blocking proxy on 127.0.0.1:9, so a fallback shows
as a proxy error and nothing leaves the machine. A real fallback uses a
lab-local namespace: the registry 127.0.0.1:<upstream port>, whose server is
the lab's upstream. The mirror there is a TCP forwarder to the lab's mirror,
which the tests take down and bring back, or a stand-in on 127.0.0.1 that
answers errors or HTML.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.cri import CriError, ImageServiceClient
from tests.e2e.faults import (
    RESTART_TIMEOUT,
    Forwarder,
    containerd_requests,
    free_port,
    stub_registry,
    upstream_log,
)
from tests.e2e.lab import IMAGE_REFERENCE, IMAGE_REPOSITORY, IMAGE_TAG, Lab


def _local_image(lab: Lab) -> str:
    return f"{lab.upstream_host}/{IMAGE_REPOSITORY}:{IMAGE_TAG}"


def _local_config(stack: Stack, mirror_port: int, fallback: bool = True) -> dict:
    """Config with one lab-local registry: the upstream behind a mirror on MIRROR_PORT."""
    lab = stack.lab
    registry: dict[str, Any] = {"nexus": {"port": mirror_port}}
    if fallback:
        registry["server"] = lab.upstream_url
    else:
        registry["fallback"] = False
    config = stack.config(
        registries={lab.upstream_host: registry}, verify={"image": _local_image(lab)}
    )
    config["nodes"][0]["containerd"]["restartTimeout"] = RESTART_TIMEOUT
    return config


def _pull(lab: Lab, image: str) -> None:
    """Pull IMAGE by CRI on node-a, as kubelet does, after removing any earlier copy."""
    with ImageServiceClient(lab.node("node-a").socket) as client:
        if client.image_status(image):
            client.remove_image(image)
        client.pull_image(image)


def _mirror(report: dict) -> dict:
    [mirror] = report["mirrors"]
    return mirror


def _apply_anew(stack: Stack, config: dict, name: str) -> dict:
    """Apply CONFIG as a new stack: unchanged inputs would not run the hosts step again."""
    directory = stack.directory / name
    directory.mkdir()
    return Stack(stack.lab, directory).up(config).outputs["nodes"]["node-a"]


def test_docker_io_mirror_down_hits_blocking_proxy(stack: Stack, lab: Lab) -> None:
    config = stack.config(verify={"image": IMAGE_REFERENCE})
    config["registries"]["docker.io"]["nexus"]["port"] = free_port()

    report = stack.up(config).outputs["nodes"]["node-a"]

    mirror = _mirror(report)
    assert mirror["up"] is False
    assert mirror["error"].startswith("request failed:")
    verification = report["verification"]
    assert verification["ok"] is False
    assert verification["throughMirror"] is False
    # containerd tried the upstream after the mirror and reports the first
    # error; the upstream request went to the blocking proxy on 127.0.0.1:9.
    assert verification["hostsTried"] == [
        f"127.0.0.1:{config['registries']['docker.io']['nexus']['port']}",
        "registry-1.docker.io",
    ]
    assert "connection refused" in verification["error"]
    with pytest.raises(CriError) as failure:
        _pull(lab, IMAGE_REFERENCE)
    assert "connection refused" in str(failure.value)
    report = stack.up(stack.config(verify={"image": IMAGE_REFERENCE})).outputs["nodes"]["node-a"]
    assert _mirror(report)["up"] is True
    assert report["verification"]["throughMirror"] is True


def test_mirror_down_falls_back_to_upstream(stack: Stack, lab: Lab) -> None:
    forwarder = Forwarder(lab.mirror_port)
    config = _local_config(stack, forwarder.port)
    try:
        report = stack.up(config).outputs["nodes"]["node-a"]
        assert _mirror(report)["up"] is True
        assert report["verification"]["throughMirror"] is True
    finally:
        forwarder.stop()

    # Down at pull time: the pull goes to the upstream.
    before = len(upstream_log(lab))
    _pull(lab, _local_image(lab))
    assert containerd_requests(upstream_log(lab)[before:], IMAGE_REPOSITORY)

    # Down at apply time: the files are written and the outputs report the mirror down.
    report = _apply_anew(stack, config, "down")
    mirror = _mirror(report)
    assert mirror["up"] is False
    assert mirror["error"].startswith("request failed: curl: (7) Failed to connect to 127.0.0.1")
    verification = report["verification"]
    assert verification["servedBy"] == lab.upstream_host
    assert verification["throughMirror"] is False
    assert verification["ok"] is False
    assert "not a configured mirror" in verification["error"]

    back = Forwarder(lab.mirror_port, port=forwarder.port)
    try:
        report = _apply_anew(stack, config, "back")
        assert _mirror(report)["up"] is True
        assert report["verification"]["throughMirror"] is True
    finally:
        back.stop()


def test_mirror_down_without_fallback_fails_pulls(stack: Stack, lab: Lab) -> None:
    forwarder = Forwarder(lab.mirror_port)
    config = _local_config(stack, forwarder.port, fallback=False)
    try:
        report = stack.up(config).outputs["nodes"]["node-a"]
        assert report["verification"]["throughMirror"] is True
    finally:
        forwarder.stop()
    before = len(upstream_log(lab))

    with pytest.raises(CriError):
        _pull(lab, _local_image(lab))
    report = _apply_anew(stack, config, "down")

    assert _mirror(report)["up"] is False
    verification = report["verification"]
    assert verification["ok"] is False
    assert verification["servedBy"] is None
    assert verification["hostsTried"] == [f"127.0.0.1:{forwarder.port}"]
    assert containerd_requests(upstream_log(lab)[before:], IMAGE_REPOSITORY) == []
    back = Forwarder(lab.mirror_port, port=forwarder.port)
    try:
        _pull(lab, _local_image(lab))
        assert _apply_anew(stack, config, "back")["verification"]["throughMirror"] is True
    finally:
        back.stop()


def test_mirror_answering_errors(stack: Stack, lab: Lab) -> None:
    with stub_registry("error") as stub:
        before = len(upstream_log(lab))
        report = stack.up(_local_config(stack, stub.port)).outputs["nodes"]["node-a"]
        mirror = _mirror(report)
        assert mirror["up"] is False
        assert mirror["status"] == 500
        assert mirror["error"] == "HTTP 500 from GET /v2/"
        assert report["verification"]["servedBy"] == lab.upstream_host
        _pull(lab, _local_image(lab))
        assert any("/manifests/" in request for request in stub.requests)
    assert containerd_requests(upstream_log(lab)[before:], IMAGE_REPOSITORY)
    report = stack.up(_local_config(stack, lab.mirror_port)).outputs["nodes"]["node-a"]
    assert report["verification"]["throughMirror"] is True


def test_mirror_answering_html(stack: Stack, lab: Lab) -> None:
    with stub_registry("html") as stub:
        report = stack.up(_local_config(stack, stub.port)).outputs["nodes"]["node-a"]
        mirror = _mirror(report)
        assert mirror["up"] is False
        assert mirror["status"] == 200
        assert mirror["error"] == "HTTP 200 with an HTML page, not the registry API"
        verification = report["verification"]
        assert verification["throughMirror"] is False
        assert verification["ok"] is False
        assert "unexpected media type text/html" in verification["error"]
        # containerd takes the mirror's 200 for a manifest and does not fall
        # back to the upstream: pulls fail while such a mirror is listed.
        with pytest.raises(CriError) as failure:
            _pull(lab, _local_image(lab))
        assert "text/html" in str(failure.value)
    report = stack.up(_local_config(stack, lab.mirror_port)).outputs["nodes"]["node-a"]
    assert report["verification"]["throughMirror"] is True
