"""Nexus Repository addressing: how a docker repository is reached as a registry host.

Docker clients always call ``/v2/...`` on a host, so Nexus maps a request to one
repository by connector port, by subdomain (Nexus Pro 3.40+), or by path-based
routing under ``/v2/<repository>`` (Nexus 3.83+). Nexus ignores containerd's
``ns`` query parameter, so each upstream registry needs its own repository.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from .validation import Problems, check_int, check_keys, key_path_child

MODES = ("port", "subdomain", "repository")
_REPOSITORY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


def nexus_host_url(base_url: str, block: dict[str, Any]) -> tuple[str, bool]:
    """Return the host URL and override_path for a validated ``nexus`` block.

    ``base_url`` is ``scheme://host[:port]`` of Nexus.
    """
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if host and ":" in host:
        host = f"[{host}]"
    if "port" in block:
        return f"{parts.scheme}://{host}:{block['port']}", False
    if "subdomain" in block:
        netloc = f"{block['subdomain']}.{host}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return f"{parts.scheme}://{netloc}", False
    # Path-based routing serves the registry API under /v2/<repository>;
    # containerd must not append another /v2, so override_path is required.
    return f"{parts.scheme}://{parts.netloc}/v2/{block['repository']}", True


def check_nexus_block(
    problems: Problems, key: str, value: Any, base_url: str | None, nexus_set: bool
) -> dict[str, Any] | None:
    """Validate a registry's ``nexus`` block; return the single addressing mode it sets.

    ``nexus_set`` is True when nexus-mirror:nexus is present at all, so an
    invalid URL there is reported once rather than again for every block.
    """
    if not isinstance(value, dict):
        problems.error(
            key,
            value,
            "must be an object",
            "Set exactly one of {port: N}, {subdomain: NAME} or {repository: NAME}.",
        )
        return None
    check_keys(problems, key, value, [*MODES, "capabilities"])
    modes = [mode for mode in MODES if mode in value]
    if len(modes) != 1:
        problems.error(
            key,
            value,
            f"sets {len(modes)} addressing modes ({', '.join(modes) or 'none'})",
            "Set exactly one of port (connector port), subdomain (Nexus Pro 3.40+) or repository (path-based routing, Nexus 3.83+).",
        )
        return None
    mode = modes[0]
    mode_key = key_path_child(key, mode)
    result: dict[str, Any] = {}
    if mode == "port":
        port = check_int(problems, mode_key, value["port"], 1, 65535, "port")
        if port is None:
            return None
        result["port"] = port
    elif mode == "subdomain":
        name = value["subdomain"]
        if not isinstance(name, str) or not _SUBDOMAIN.fullmatch(name):
            problems.error(
                mode_key, name, "invalid subdomain", "Use lowercase DNS labels such as docker-hub."
            )
            return None
        result["subdomain"] = name
    else:
        name = value["repository"]
        if not isinstance(name, str) or not _REPOSITORY.fullmatch(name):
            problems.error(
                mode_key,
                name,
                "invalid repository name",
                "Use the Nexus repository name, such as ghcr-proxy.",
            )
            return None
        result["repository"] = name
    if base_url is None:
        if nexus_set:
            return None
        problems.error(
            key_path_child(key, mode),
            value[mode],
            "a nexus block needs nexus-mirror:nexus.url",
            "Set nexus-mirror:nexus.url to the scheme and host of Nexus, such as https://nexus.example.net.",
        )
        return None
    if mode == "subdomain" and base_url.startswith("http://"):
        problems.warn(
            mode_key,
            "Nexus subdomain connectors are served over HTTPS; plain http:// may not reach them.",
        )
    return result
