"""Rendering: one fixture per case, input config to the exact files written."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from components.config import parse_config
from components.hosts_toml import (
    MANAGED_MARKER,
    RenderError,
    expected_data,
    render_files,
    render_hosts_toml,
)
from components.model import Host, Namespace

FIXTURES = Path(__file__).parent / "fixtures" / "render"
CASES = sorted(path.stem for path in FIXTURES.glob("*.yaml"))


def _rendered(case: str) -> dict[str, str]:
    document = yaml.safe_load((FIXTURES / f"{case}.yaml").read_text(encoding="utf-8"))
    # secrets: keys set as Pulumi secrets, such as passwords and client keys.
    secrets = document.get("secrets") or {}
    values = {"nodes": [{"host": "node-1"}], **document["config"], **secrets}
    config = parse_config(values, frozenset(secrets))
    files = {}
    for namespace in config.namespaces:
        for name, text in render_files(namespace).items():
            files[f"{namespace.name}__{name}"] = text
    return files


@pytest.mark.parametrize("case", CASES)
def test_render_matches_fixture(case: str) -> None:
    expected = {path.name: path.read_text(encoding="utf-8") for path in (FIXTURES / case).iterdir()}
    assert _rendered(case) == expected


@pytest.mark.parametrize("case", CASES)
def test_render_is_deterministic(case: str) -> None:
    assert _rendered(case) == _rendered(case)


@pytest.mark.parametrize("case", CASES)
def test_render_starts_with_marker_and_parses(case: str) -> None:
    for name, text in _rendered(case).items():
        if name.endswith("hosts.toml"):
            assert text.startswith(MANAGED_MARKER)
            assert "host" in tomllib.loads(text)


def test_round_trip_check_catches_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    namespace = Namespace(name="docker.io", hosts=(Host(url="https://m.example"),))
    monkeypatch.setattr("components.hosts_toml.expected_data", lambda _: {"host": {}})
    with pytest.raises(RenderError, match="does not read back"):
        render_hosts_toml(namespace)


def test_expected_data_keeps_mirror_order() -> None:
    hosts = tuple(Host(url=f"https://m{i}.example") for i in (3, 1, 2))
    data = expected_data(Namespace(name="docker.io", hosts=hosts))
    assert list(data["host"]) == ["https://m3.example", "https://m1.example", "https://m2.example"]


def test_trailing_slash_is_dropped() -> None:
    config = parse_config(
        {
            "registries": {"docker.io": {"mirrors": [{"url": "https://m.example/"}]}},
            "nodes": [{"host": "n"}],
        }
    )
    text = render_hosts_toml(config.namespaces[0])
    # containerd would clean "/" and request https://m.example//v2/...
    assert '[host."https://m.example"]' in text
