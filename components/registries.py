"""Validation of ``nexus-mirror:registries``: namespaces and their mirror hosts."""

from __future__ import annotations

import re
import shlex
from typing import Any

from .credentials import (
    INLINE_SECRET_KEYS,
    MIRROR_CREDENTIAL_KEYS,
    SecretKeys,
    check_header_conflict,
    check_mirror_credentials,
    client_files,
)
from .model import DEFAULT_CAPABILITIES, Host, InlineFile, Namespace
from .nexus import check_nexus_block, nexus_host_url
from .validation import (
    Problems,
    check_absolute_path,
    check_bool,
    check_header_name,
    check_keys,
    check_pem,
    check_url,
    key_path,
    key_path_child,
    key_text,
    split_host_port,
)

CAPABILITIES = ("pull", "resolve", "push")
MIRROR_KEYS = [
    "url",
    "capabilities",
    "overridePath",
    "ca",
    "caPem",
    "skipVerify",
    "client",
    "headers",
    *MIRROR_CREDENTIAL_KEYS,
]
REGISTRY_KEYS = ["nexus", "mirrors", "server", "fallback"]
# Header names that usually carry a credential, matched case-insensitively.
_CREDENTIAL_HEADER = re.compile(r"auth|token|key|secret|password|passwd|cookie|session", re.I)
_DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


def check_namespace_name(problems: Problems, name: Any) -> bool:
    key = key_path("registries", key_text(name))
    if name == "_default":
        return True
    if not isinstance(name, str) or split_host_port(name) is None:
        problems.error(
            key,
            name,
            "not a registry namespace",
            "Use a registry host[:port] exactly as it starts image names (docker.io, ghcr.io, registry.internal:5000) or _default.",
        )
        return False
    if name in _DOCKER_HUB_ALIASES:
        problems.error(
            key,
            name,
            "containerd reads Docker Hub mirrors from the docker.io directory only",
            "Rename the entry to docker.io.",
        )
        return False
    return True


def check_capabilities(problems: Problems, key: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return DEFAULT_CAPABILITIES
    if not isinstance(value, list) or not value:
        # containerd treats an empty list as "all capabilities", push included.
        problems.error(
            key,
            value,
            "must be a non-empty list",
            "List some of pull, resolve, push, such as [pull, resolve].",
        )
        return None
    result: list[str] = []
    for index, item in enumerate(value):
        item_key = key_path_child(key, index)
        if item == "referrers":
            problems.error(
                item_key,
                item,
                "containerd before 2.2 rejects the whole hosts.toml for this capability and pulls bypass the mirror",
                "Remove it.",
            )
            return None
        if item not in CAPABILITIES:
            problems.error(
                item_key, item, "unknown capability", "Use pull, resolve or push (lowercase)."
            )
            return None
        if item in result:
            problems.error(item_key, item, "capability listed twice", "List it once.")
            return None
        result.append(item)
    if "push" in result:
        problems.warn(key, "push is enabled: image pushes for this namespace go to this mirror.")
    if "resolve" not in result:
        problems.warn(
            key,
            "without resolve, containerd never asks this mirror for tags, only for content by digest.",
        )
    return tuple(result)


def _check_path_list(problems: Problems, key: str, value: Any) -> list[str] | None:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        problems.error(
            key,
            value,
            "must be a path or a list of paths",
            "Give absolute paths on the node, such as [/etc/pki/ca.pem].",
        )
        return None
    paths = [
        check_absolute_path(problems, key_path_child(key, i), item) for i, item in enumerate(items)
    ]
    return None if None in paths else [p for p in paths if p]


def _check_client(problems: Problems, key: str, value: Any) -> tuple[tuple[str, str], ...] | None:
    """Accept the forms containerd reads: a path, a list of paths, or a list of [cert, key] pairs."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        problems.error(
            key,
            value,
            "must be a path, a list of paths or a list of [cert, key] pairs",
            "Such as [[/etc/pki/c.crt, /etc/pki/c.key]].",
        )
        return None
    pairs: list[tuple[str, str]] = []
    for index, item in enumerate(items):
        item_key = key_path_child(key, index)
        if isinstance(item, list):
            if len(item) != 2:
                problems.error(
                    item_key,
                    item,
                    "a client pair needs exactly a certificate and a key",
                    "Write [cert path, key path].",
                )
                return None
            cert = check_absolute_path(problems, key_path_child(item_key, 0), item[0])
            private = check_absolute_path(problems, key_path_child(item_key, 1), item[1])
            if cert is None or private is None:
                return None
            pairs.append((cert, private))
        else:
            combined = check_absolute_path(problems, item_key, item)
            if combined is None:
                return None
            pairs.append((combined, ""))
    return tuple(pairs)


def _check_headers(
    problems: Problems, key: str, value: Any, secret: bool
) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    if not isinstance(value, dict) or not value:
        problems.error(
            key,
            value,
            "must map header names to a value or a list of values",
            "Such as {X-Custom: [a, b]}.",
        )
        return None
    seen: dict[str, str] = {}
    result: list[tuple[str, tuple[str, ...]]] = []
    for name, raw in value.items():
        name_key = key_path_child(key, key_text(name))
        if not check_header_name(problems, name_key, name):
            return None
        if name.lower() in seen:
            # containerd keeps header names as written, so both spellings would be sent.
            problems.error(
                name_key,
                name,
                f"same header as {seen[name.lower()]!r} (names are case-insensitive)",
                "Keep one of them.",
            )
            return None
        seen[name.lower()] = name
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list) or not values:
            problems.error(
                name_key,
                raw,
                "header value must be a string or a non-empty list of strings",
                "Such as a or [a, b].",
            )
            return None
        for index, item in enumerate(values):
            if not isinstance(item, str):
                problems.error(
                    key_path_child(name_key, index),
                    item,
                    "header value must be a string",
                    "Quote it.",
                )
                return None
            if any(c in item for c in "\r\n\0"):
                problems.error(
                    key_path_child(name_key, index),
                    item,
                    "header value contains a line break or NUL",
                    "Remove it: it would let the value inject further headers.",
                )
                return None
            if any((c < " " and c != "\t") or c == "\x7f" for c in item):
                # Go's HTTP client rejects such values, so every request to the mirror would fail.
                problems.error(
                    key_path_child(name_key, index),
                    item,
                    "header value contains a control character",
                    "Remove it: HTTP allows only visible characters, spaces and tabs.",
                )
                return None
        if not secret and _CREDENTIAL_HEADER.search(name):
            problems.warn(
                name_key,
                "looks like it carries a credential, but nexus-mirror:registries is stored in plain text. "
                f"Store the value encrypted: pulumi config set --secret --path {shlex.quote(name_key)} VALUE",
            )
        result.append((name, tuple(values)))
    return tuple(result)


def _check_url_path(problems: Problems, key: str, url: str, override_path: bool) -> bool:
    """Reject paths that make containerd request the wrong URL."""
    path = url.split("://", 1)[1].partition("/")[2]
    path = "/" + path if path else ""
    if override_path and not path:
        problems.error(
            key,
            url,
            "overridePath with no path makes requests lose /v2 and fail",
            "Remove overridePath, or add the API root path to the URL.",
        )
        return False
    if not override_path and "/v2/" in path + "/" and not path.endswith("/v2"):
        problems.error(
            key,
            url,
            f"containerd would append /v2 and request {path}/v2/...",
            "Set overridePath: true when the path already is the registry API root.",
        )
        return False
    if override_path and "v2" not in path.split("/"):
        described = "its path" if problems.is_secret(key) else f"path {path}"
        problems.warn(
            key,
            f"overridePath with {described} sends requests there without any /v2; most registries need /v2 in it.",
        )
    return True


def check_mirror(
    problems: Problems,
    key: str,
    value: Any,
    index: int,
    secret: bool = False,
    secrets: SecretKeys | None = None,
    namespace: str = "",
) -> tuple[Host, list[InlineFile]] | None:
    if not isinstance(value, dict):
        problems.error(
            key,
            value,
            "must be an object with at least url",
            "Such as {url: https://mirror.internal}.",
        )
        return None
    # password and clientKeyPem get their own message from check_mirror_credentials.
    shown = {name: item for name, item in value.items() if name not in INLINE_SECRET_KEYS}
    check_keys(problems, key, shown, MIRROR_KEYS)
    url = check_url(problems, key_path_child(key, "url"), value.get("url"))
    capabilities = check_capabilities(
        problems, key_path_child(key, "capabilities"), value.get("capabilities")
    )
    override_path = False
    if "overridePath" in value:
        override_path = bool(
            check_bool(problems, key_path_child(key, "overridePath"), value["overridePath"])
        )
    skip_verify = False
    if "skipVerify" in value:
        skip_verify = bool(
            check_bool(problems, key_path_child(key, "skipVerify"), value["skipVerify"])
        )
        if skip_verify:
            problems.warn(
                key_path_child(key, "skipVerify"),
                "TLS certificates of this mirror are not verified; use it for testing only.",
            )
    ca: list[str] = []
    files: list[InlineFile] = []
    if "ca" in value:
        ca = _check_path_list(problems, key_path_child(key, "ca"), value["ca"]) or []
    if "caPem" in value:
        pem = check_pem(problems, key_path_child(key, "caPem"), value["caPem"])
        if pem is not None:
            name = f"mirror-{index}-ca.pem"
            files.append(InlineFile(name, pem))
            ca.append(name)
    client: tuple[tuple[str, str], ...] = ()
    if "client" in value:
        client = _check_client(problems, key_path_child(key, "client"), value["client"]) or ()
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    if "headers" in value:
        headers = (
            _check_headers(problems, key_path_child(key, "headers"), value["headers"], secret) or ()
        )
    if secrets is None:
        secrets = SecretKeys(values={}, secret_names=frozenset(), reserved=frozenset())
    credentials, client_pem = check_mirror_credentials(
        problems, key, value, secrets, (namespace, index)
    )
    if client_pem is not None:
        pem_files, pair = client_files(f"mirror-{index}", client_pem)
        files.extend(pem_files)
        client = (*client, pair)
    if url is None or capabilities is None:
        return None
    if not _check_url_path(problems, key_path_child(key, "url"), url, override_path):
        return None
    if skip_verify and url.startswith("http://"):
        problems.warn(key_path_child(key, "skipVerify"), "has no effect on a plain http:// mirror.")
    host = Host(
        url=url,
        capabilities=capabilities,
        override_path=override_path,
        ca=tuple(ca),
        client=client,
        skip_verify=skip_verify,
        headers=headers,
        credentials=credentials,
        config_key=key,
    )
    check_header_conflict(problems, key, host)
    return host, files


def check_registry(
    problems: Problems,
    name: str,
    value: Any,
    nexus: dict[str, Any] | None,
    secret: bool,
    secrets: SecretKeys | None = None,
) -> Namespace | None:
    key = key_path("registries", name)
    if not isinstance(value, dict):
        problems.error(
            key,
            value,
            "must be an object",
            "Set nexus: {...} and/or mirrors: [...] for this registry.",
        )
        return None
    check_keys(problems, key, value, REGISTRY_KEYS)
    hosts: list[Host] = []
    files: list[InlineFile] = []
    if "nexus" in value:
        nexus_key = key_path_child(key, "nexus")
        block = check_nexus_block(
            problems, nexus_key, value["nexus"], nexus["url"] if nexus else None, nexus is not None
        )
        capabilities = check_capabilities(
            problems,
            key_path_child(nexus_key, "capabilities"),
            value["nexus"].get("capabilities") if isinstance(value["nexus"], dict) else None,
        )
        if block is not None and capabilities is not None and nexus is not None and nexus["url"]:
            url, override_path = nexus_host_url(nexus["url"], block)
            ca: tuple[str, ...] = ()
            if nexus.get("caPem"):
                files.append(InlineFile("nexus-ca.pem", nexus["caPem"]))
                ca = ("nexus-ca.pem",)
            client: tuple[tuple[str, str], ...] = ()
            if nexus.get("client") is not None:
                pem_files, pair = client_files("nexus", nexus["client"])
                files.extend(pem_files)
                client = (pair,)
            hosts.append(
                Host(
                    url=url,
                    capabilities=capabilities,
                    override_path=override_path,
                    ca=ca,
                    client=client,
                    skip_verify=bool(nexus.get("skipVerify")),
                    credentials=nexus.get("credentials"),
                    config_key=nexus_key,
                )
            )
    if "mirrors" in value:
        mirrors_key = key_path_child(key, "mirrors")
        mirrors = value["mirrors"]
        if not isinstance(mirrors, list) or not mirrors:
            problems.error(
                mirrors_key,
                mirrors,
                "must be a non-empty list",
                "List mirror objects such as [{url: https://mirror.internal}], or remove the key.",
            )
        else:
            for index, item in enumerate(mirrors):
                checked = check_mirror(
                    problems, key_path_child(mirrors_key, index), item, index, secret, secrets, name
                )
                if checked is not None:
                    hosts.append(checked[0])
                    files.extend(checked[1])
    if "nexus" not in value and "mirrors" not in value:
        problems.error(
            key,
            value,
            "sets no mirror",
            "Add nexus: {port: N} (or subdomain/repository) or mirrors: [{url: ...}].",
        )
        return None
    seen: dict[str, str] = {}
    for host in hosts:
        if host.url in seen:
            problems.error(
                host.config_key,
                host.url,
                f"mirror URL is already used by {seen[host.url]}",
                "List each mirror once.",
            )
        seen.setdefault(host.url, host.config_key)
    fallback = True
    if "fallback" in value:
        fallback = (
            check_bool(problems, key_path_child(key, "fallback"), value["fallback"]) is not False
        )
    server: Host | None = None
    if "server" in value:
        server_key = key_path_child(key, "server")
        server_url = check_url(problems, server_key, value["server"])
        if server_url is not None:
            if not fallback:
                problems.error(
                    server_key,
                    value["server"],
                    "server is the upstream, which fallback: false never contacts",
                    "Remove server, or remove fallback: false.",
                )
            elif _check_url_path(problems, server_key, server_url, False):
                server = Host(url=server_url, capabilities=CAPABILITIES, config_key=server_key)
    if not hosts:
        return None
    if not fallback and hosts:
        # The last mirror takes the place of the upstream, so containerd never tries the real one.
        server = hosts[-1]
    names = [f.name for f in files]
    for duplicate in {n for n in names if names.count(n) > 1}:
        problems.error(
            key, duplicate, "two inline PEM files would share one name", "Report this as a bug."
        )
    return Namespace(
        name=name,
        hosts=tuple(hosts),
        server=server,
        fallback=fallback,
        files=tuple(files),
        secret=secret,
    )
