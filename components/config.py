"""Stack config to validated model: the first step of every run.

``parse_config`` takes the raw values of the ``nexus-mirror`` namespace (as the
Pulumi program or the render command reads them) and returns a
``MirrorConfig``, or raises ``ConfigError`` listing every problem at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Mapping
from typing import Any

from .credentials import (
    INLINE_SECRET_KEYS,
    NEXUS_CLIENT_KEY,
    NEXUS_CREDENTIAL_KEYS,
    NEXUS_PASSWORD,
    SecretKeys,
    check_credential_use,
    check_nexus_credentials,
    config_auth_tables,
    referenced_keys,
)
from .kubernetes.settings import check_delivery, check_kubernetes, reject_ssh_keys
from .model import Containerd, MirrorConfig, Node
from .nodes import check_containerd, check_nodes, check_ssh
from .registries import check_namespace_name, check_registry
from .validation import (
    SECRET_PLACEHOLDER,
    Problems,
    check_bool,
    check_int,
    check_keys,
    check_pem,
    check_url,
    key_path,
    key_path_child,
    key_text,
)

TOP_LEVEL_KEYS = [
    "nexus",
    "nexusPassword",
    "nexusClientKeyPem",
    "registries",
    "nodes",
    "ssh",
    "sshPrivateKey",
    "sshPrivateKeyPassword",
    "containerd",
    "verify",
    "rollout",
    "delivery",
    "kubernetes",
]
SECRET_KEYS = ("sshPrivateKey", "sshPrivateKeyPassword")
OBJECT_KEYS = (
    "nexus",
    "registries",
    "nodes",
    "ssh",
    "containerd",
    "verify",
    "rollout",
    "kubernetes",
)
_IMAGE = re.compile(
    r"^(?:(?P<domain>[a-z0-9.-]+(?::[0-9]+)?|\[[0-9a-f:]+\](?::[0-9]+)?)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


def decode_raw(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Decode the JSON text Pulumi gives for object-valued keys; keep other values."""
    decoded: dict[str, Any] = {}
    for name, value in raw.items():
        if name in OBJECT_KEYS and isinstance(value, str):
            try:
                decoded[name] = json.loads(value)
            except (ValueError, RecursionError):
                # Not JSON, too deeply nested, or an integer of more than 4300
                # digits: validation then reports the text as the wrong type.
                decoded[name] = value
        else:
            decoded[name] = value
    return decoded


def _name_order(name: Any) -> tuple[bool, str]:
    """Sort key that puts names before keys a YAML file gave as numbers, booleans or null."""
    return (not isinstance(name, str), name if isinstance(name, str) else "")


def _check_unicode(problems: Problems, key: str, value: Any) -> None:
    """Report every string below ``key`` that is not valid Unicode text.

    JSON can carry a lone surrogate (such as the escape \\ud800), which no
    file, TOML parser or SSH session accepts as UTF-8.
    """
    if isinstance(value, str):
        if any("\ud800" <= char <= "\udfff" for char in value):
            problems.error(
                key, value, "contains a lone surrogate, which is not valid Unicode", "Remove it."
            )
    elif isinstance(value, dict):
        for name, item in value.items():
            child = key_path_child(key, name if isinstance(name, str) else key_text(name))
            if isinstance(name, str):
                _check_unicode(problems, child, name)
            _check_unicode(problems, child, item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_unicode(problems, key_path_child(key, index), item)


def normalize_image(reference: str) -> tuple[str, str] | None:
    """Return (full reference, registry namespace) the way containerd's CRI names an image."""
    match = _IMAGE.fullmatch(reference)
    if not match:
        return None
    domain, path = match.group("domain"), match.group("path")
    if domain is None or ("." not in domain and ":" not in domain and domain != "localhost"):
        path = f"{domain}/{path}" if domain else path
        domain = "docker.io"
    if domain in ("index.docker.io", "registry-1.docker.io"):
        domain = "docker.io"
    if domain == "docker.io" and "/" not in path:
        path = "library/" + path
    tag = match.group("tag")
    digest = match.group("digest")
    full = f"{domain}/{path}"
    if tag or not digest:
        full += ":" + (tag or "latest")
    if digest:
        full += "@" + digest
    return full, domain


def _reference_name(reference: str) -> str:
    """Return a normalized image reference without its tag and digest."""
    name = reference.split("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name[: name.rfind(":")]
    return name


def _check_nexus(problems: Problems, value: Any, secrets: SecretKeys) -> dict[str, Any] | None:
    key = key_path("nexus")
    if value is None:
        for name in (NEXUS_PASSWORD, NEXUS_CLIENT_KEY):
            if name in secrets.values:
                problems.errors.append(
                    f"{key_path(name)}: is set, but nexus-mirror:nexus is not, so no Nexus "
                    f"uses it. Set nexus-mirror:nexus, or remove it: pulumi config rm {key_path(name)}"
                )
        return None
    if not isinstance(value, dict):
        problems.error(key, value, "must be an object", "Such as {url: https://nexus.example.net}.")
        return None
    # password and clientKeyPem get their own message from check_nexus_credentials.
    shown = {name: item for name, item in value.items() if name not in INLINE_SECRET_KEYS}
    check_keys(problems, key, shown, ["url", "caPem", "skipVerify", *NEXUS_CREDENTIAL_KEYS])
    url = check_url(problems, key_path_child(key, "url"), value.get("url"), allow_path=False)
    result: dict[str, Any] = {"url": url}
    if "caPem" in value:
        result["caPem"] = check_pem(problems, key_path_child(key, "caPem"), value["caPem"])
    if "skipVerify" in value:
        result["skipVerify"] = check_bool(
            problems, key_path_child(key, "skipVerify"), value["skipVerify"]
        )
        if result["skipVerify"]:
            problems.warn(
                key_path_child(key, "skipVerify"),
                "Nexus's TLS certificate is not verified; use it for testing only.",
            )
    result["credentials"], result["client"] = check_nexus_credentials(problems, value, secrets)
    return result


def _check_verify(problems: Problems, value: Any) -> str | None:
    key = key_path("verify")
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.error(
            key, value, "must be an object", "Such as {image: docker.io/library/busybox:latest}."
        )
        return None
    check_keys(problems, key, value, ["image"])
    if "image" not in value:
        return None
    image = value["image"]
    normalized = normalize_image(image) if isinstance(image, str) else None
    if normalized is None or len(_reference_name(normalized[0])) > 255:
        problems.error(
            key_path_child(key, "image"),
            image,
            "invalid image reference",
            "Use a reference such as docker.io/library/busybox:latest, with a name of at most 255 characters.",
        )
        return None
    return normalized[0]


def _check_rollout(problems: Problems, value: Any) -> int:
    key = key_path("rollout")
    if value is None:
        return 1
    if not isinstance(value, dict):
        problems.error(key, value, "must be an object", "Such as {maxParallelRestarts: 1}.")
        return 1
    check_keys(problems, key, value, ["maxParallelRestarts"])
    limit = check_int(
        problems,
        key_path_child(key, "maxParallelRestarts"),
        value.get("maxParallelRestarts", 1),
        1,
        1000,
        "count",
    )
    return limit or 1


def parse_config(raw: Mapping[str, Any], secret_keys: frozenset[str] = frozenset()) -> MirrorConfig:
    """Validate the ``nexus-mirror`` namespace of a stack; raise ``ConfigError`` on any problem.

    ``raw`` maps key names without the namespace to their values; ``secret_keys``
    names the keys that Pulumi stores as secrets.
    """
    problems = Problems(secret_keys=tuple(key_path(name) for name in sorted(secret_keys)))
    values = decode_raw(raw)
    for name, value in values.items():
        _check_unicode(problems, key_path(name), value)
    # Keys that mirrors name in passwordKey or clientKeyPemKey are known keys too.
    mirror_secrets = referenced_keys(values.get("registries"))
    for name in values:
        if name not in TOP_LEVEL_KEYS and name not in mirror_secrets:
            # A misspelled key may be a misspelled secret, so its value is never shown.
            close = difflib.get_close_matches(
                str(name).lower(), [k.lower() for k in TOP_LEVEL_KEYS], n=1
            )
            hint = ""
            if close:
                hint = f"Did you mean {TOP_LEVEL_KEYS[[k.lower() for k in TOP_LEVEL_KEYS].index(close[0])]!r}? "
            problems.errors.append(
                f"{key_path(name)}: unknown key (value not shown). "
                f"{hint}Known keys: {', '.join(TOP_LEVEL_KEYS)}."
            )

    delivery = check_delivery(problems, values.get("delivery"))
    secrets = SecretKeys(
        values=values,
        secret_names=frozenset(secret_keys),
        reserved=frozenset(TOP_LEVEL_KEYS) - {NEXUS_PASSWORD, NEXUS_CLIENT_KEY},
    )
    nexus = _check_nexus(problems, values.get("nexus"), secrets)
    registries = values.get("registries")
    namespaces = []
    if registries is None:
        problems.error(
            key_path("registries"),
            None,
            "no registries are set",
            "Add at least one, such as docker.io: {nexus: {port: 8082}}.",
        )
    elif not isinstance(registries, dict) or not registries:
        problems.error(
            key_path("registries"),
            registries,
            "must map registry namespaces to mirrors",
            "Such as docker.io: {nexus: {port: 8082}}.",
        )
    else:
        secret = "registries" in secret_keys or "nexus" in secret_keys
        for name in sorted(registries, key=_name_order):
            if check_namespace_name(problems, name):
                namespace = check_registry(problems, name, registries[name], nexus, secret, secrets)
                if namespace is not None:
                    namespaces.append(namespace)

    containerd = check_containerd(
        problems, key_path("containerd"), values.get("containerd"), Containerd()
    )
    kubernetes = None
    if delivery == "kubernetes":
        # The DaemonSet replaces nodes, SSH and rollout; each of those keys is an error.
        reject_ssh_keys(problems, values, secret_keys)
        kubernetes = check_kubernetes(
            problems, values.get("kubernetes"), containerd, values.get("containerd")
        )
        if config_auth_tables(namespaces):
            problems.errors.append(
                f"{key_path('registries')}: auth: config writes credentials to config.toml, "
                "which delivery kubernetes does not write. Use auth: header for these mirrors."
            )
    elif "kubernetes" in values:
        problems.error(
            key_path("kubernetes"),
            values["kubernetes"],
            "is read only with nexus-mirror:delivery kubernetes",
            "Set nexus-mirror:delivery kubernetes, or remove the block.",
        )
    ssh = check_ssh(problems, values.get("ssh") if delivery == "ssh" else None)
    nodes: tuple[Node, ...] = ()
    if delivery == "ssh":
        nodes = check_nodes(problems, values.get("nodes"), ssh, containerd)
    check_credential_use(problems, namespaces, nodes)
    if secret_keys & {"containerd", "nodes"}:
        nodes = tuple(dataclasses.replace(node, secret=True) for node in nodes)
    for name in SECRET_KEYS if delivery == "ssh" else ():
        if name in values:
            if name not in secret_keys:
                problems.errors.append(
                    f"{key_path(name)}: is stored in plain text (value not shown). "
                    f"Store it encrypted: pulumi config set --secret {key_path(name)} < FILE"
                )
            elif name == "sshPrivateKey" and values[name] != SECRET_PLACEHOLDER:
                text = values[name]
                if not isinstance(text, str) or "PRIVATE KEY-----" not in text:
                    problems.secret_error(
                        key_path(name),
                        "is not a PEM or OpenSSH private key",
                        "Set it from the key file: pulumi config set --secret nexus-mirror:sshPrivateKey < ~/.ssh/id_ed25519",
                    )
            elif name == "sshPrivateKeyPassword":
                if not isinstance(values[name], str) or not values[name]:
                    problems.secret_error(
                        key_path(name),
                        "must be the non-empty passphrase of sshPrivateKey",
                        "Set it with pulumi config set --secret nexus-mirror:sshPrivateKeyPassword, or remove it for a key without a passphrase.",
                    )
    if "sshPrivateKey" not in values and delivery == "ssh":
        problems.warn(
            key_path("sshPrivateKey"),
            "no key is set, so pulumi-command uses the SSH agent at SSH_AUTH_SOCK.",
        )
    verify_image = _check_verify(problems, values.get("verify"))
    if verify_image is not None and namespaces:
        image = normalize_image(verify_image)
        names = {n.name for n in namespaces}
        if image and image[1] not in names and "_default" not in names:
            problems.warn(
                key_path("verify", "image"),
                f"{image[1]} has no mirror in nexus-mirror:registries, so the test pull proves nothing.",
            )
    max_parallel = _check_rollout(problems, values.get("rollout") if delivery == "ssh" else None)
    if any(n.name == "_default" for n in namespaces):
        problems.warn(
            key_path("registries", "_default"), "is read by containerd 1.6.17 and later only."
        )
    problems.raise_if_any()
    return MirrorConfig(
        namespaces=tuple(namespaces),
        nodes=nodes,
        ssh=ssh,
        containerd=containerd,
        verify_image=verify_image,
        max_parallel_restarts=max_parallel,
        has_private_key="sshPrivateKey" in values,
        warnings=tuple(dict.fromkeys(problems.warnings)),
        secret_keys=frozenset(secret_keys),
        delivery=delivery,
        kubernetes=kubernetes,
    )
