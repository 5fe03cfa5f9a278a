"""Nexus addressing modes to host URLs."""

from __future__ import annotations

import pytest

from components.nexus import nexus_host_url


@pytest.mark.parametrize(
    ("base", "block", "url", "override_path"),
    [
        ("https://nexus.example.net", {"port": 8082}, "https://nexus.example.net:8082", False),
        ("https://nexus.example.net:8443", {"port": 8082}, "https://nexus.example.net:8082", False),
        ("http://10.0.0.5", {"port": 5001}, "http://10.0.0.5:5001", False),
        ("https://nexus.example.net", {"subdomain": "hub"}, "https://hub.nexus.example.net", False),
        (
            "https://nexus.example.net:8443",
            {"subdomain": "hub"},
            "https://hub.nexus.example.net:8443",
            False,
        ),
        (
            "https://nexus.example.net",
            {"repository": "ghcr"},
            "https://nexus.example.net/v2/ghcr",
            True,
        ),
        (
            "https://nexus.example.net:8443",
            {"repository": "ghcr"},
            "https://nexus.example.net:8443/v2/ghcr",
            True,
        ),
        ("https://[fd00::5]:8443", {"port": 8082}, "https://[fd00::5]:8082", False),
    ],
)
def test_nexus_host_url(base: str, block: dict, url: str, override_path: bool) -> None:
    assert nexus_host_url(base, block) == (url, override_path)
