"""Hostile stack config values and the checks every outcome must pass.

The corpus puts each hostile string into each string field and each key of the
stack configs that validate as given (``BASES``). ``check_outcome`` then checks
the pipeline against its contract: a config either validates and renders, or
fails with a ``ConfigError`` whose every problem is one line naming a config key.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from components.config import parse_config
from components.hosts_toml import render_files
from components.model import MirrorConfig
from components.node_script import config_input, hosts_input
from components.validation import ConfigError

PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUe3Q=\n-----END CERTIFICATE-----\n"
KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n-----END OPENSSH PRIVATE KEY-----\n"
)
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEbIVg2Ulq2ZVqd0ZJwkHlbAXSiAwsNRS5ld0vgCaY0m"
SECRET_KEYS = frozenset(
    {"sshPrivateKey", "sshPrivateKeyPassword", "nexusPassword", "mirrorPassword"}
)

# A config that validates, with every key the product reads set once.
BASE: dict[str, Any] = {
    "nexus": {
        "url": "https://nexus.example.net",
        "caPem": PEM,
        "username": "nexus-user",
        "auth": "header",
    },
    "nexusPassword": "nexus-pass",
    "mirrorPassword": "mirror-pass",
    "registries": {
        "docker.io": {
            "nexus": {"port": 8082, "capabilities": ["pull", "resolve"]},
            "mirrors": [
                {
                    "url": "https://mirror.internal/cache",
                    "capabilities": ["pull", "resolve"],
                    "ca": ["/etc/pki/mirror-ca.pem"],
                    "caPem": PEM,
                    "client": [["/etc/pki/client.crt", "/etc/pki/client.key"]],
                    "headers": {"X-Api-Key": "token-value", "X-Trace": ["a", "b"]},
                }
            ],
            "server": "https://registry-1.docker.io",
        },
        "ghcr.io": {"nexus": {"repository": "ghcr-proxy"}, "fallback": False},
        "quay.io": {"nexus": {"subdomain": "quay-proxy"}},
        "registry.internal:5000": {
            "mirrors": [
                {
                    "url": "https://m.internal/v2/cache",
                    "overridePath": True,
                    "username": "mirror-user",
                    "passwordKey": "mirrorPassword",
                }
            ]
        },
    },
    "nodes": [
        {
            "name": "worker-1",
            "host": "10.0.0.11",
            "port": 2222,
            "user": "ubuntu",
            "hostKey": HOST_KEY,
            "containerd": {"configPath": "/etc/containerd/certs.d", "restartTimeout": 90},
        },
        {"host": "worker-2.example.net"},
    ],
    "ssh": {
        "user": "root",
        "bastion": {"host": "10.0.0.2", "port": 22, "user": "jump", "hostKey": HOST_KEY},
        "perDialTimeout": 20,
        "dialErrorLimit": 5,
    },
    "sshPrivateKey": KEY,
    "sshPrivateKeyPassword": "passphrase",
    "containerd": {
        "configPath": "/etc/containerd/certs.d",
        "configFile": "/etc/containerd/config.toml",
        "restartCommand": "systemctl restart containerd",
        "manageConfigFile": True,
        "address": "/run/containerd/containerd.sock",
        "binDir": "/usr/local/bin",
        "stateDir": "/var/lib/nexus-mirror",
        "restartTimeout": 60,
        "logCommand": "journalctl -u containerd --no-pager -n 200 -o cat",
    },
    "verify": {"image": "docker.io/library/busybox:latest"},
    "rollout": {"maxParallelRestarts": 2},
}

# Delivery by a Kubernetes DaemonSet instead of SSH, with every block it reads.
KUBERNETES_BASE: dict[str, Any] = {
    "delivery": "kubernetes",
    "nexus": {"url": "https://nexus.example.net", "username": "nexus-user", "auth": "header"},
    "nexusPassword": "nexus-pass",
    "registries": {
        "docker.io": {
            "nexus": {"port": 8082},
            "mirrors": [{"url": "https://m.example", "headers": {"X-Trace": "a"}}],
        }
    },
    "containerd": {"configPath": "/etc/containerd/certs.d"},
    "kubernetes": {
        "image": "nexus.example.net:8082/library/busybox:1.37",
        "namespace": "nexus-mirror",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
        "resources": {"limits": {"memory": "64Mi"}},
        "maxSurge": 1,
        "maxUnavailable": 0,
    },
}
BASES = {"ssh": BASE, "kubernetes": KUBERNETES_BASE}

HUGE_INT = 10**5000
HOSTILE_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "\t",
    '"',
    "'",
    "\\",
    "'\"'\"'",
    '"; touch /tmp/nm-pwned; "',
    "'; touch /tmp/nm-pwned; '",
    "$(touch /tmp/nm-pwned)",
    "`touch /tmp/nm-pwned`",
    "${IFS}$(id)",
    "$HOME",
    "a\nb",
    "a\r\nb",
    "a\rb",
    "\n",
    "a\0b",
    "\x1b[31mred",
    "a\x7fb",
    "a\x01b",
    "../../etc/passwd",
    "/etc/../etc/shadow",
    "/tmp/./x",
    "/tmp/a b",
    "/tmp/a'b\"c",
    "/tmp/$(touch /tmp/nm-pwned)",
    "/tmp/a:b",
    "/" + "x" * 5000,
    "x" * 10000,
    "Grüße ✓ 中文",
    "\u202eevil",
    "\ud800",
    "NEXUS_MIRROR_EOF_1",
    "x\nNEXUS_MIRROR_EOF_1\ny",
    '"] [host."x',
    '"]\n[host."https://evil"]\ncapabilities = ["push"]\n#',
    "-rf",
    "--help",
    "%00",
    "http://user:pass@evil.example",
    "https://evil.example/$(touch /tmp/nm-pwned)",
    'https://evil.example/a"b',
    "nm_main hosts",
)
# Values of other types that reach a string field from YAML or JSON.
HOSTILE_OTHER: tuple[Any, ...] = (None, True, 0, -1, HUGE_INT, 1.5, float("nan"), [], {}, ["a"])


def string_fields(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """Yield ("value", path) for every string leaf and ("key", path) for every mapping key."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield "key", (*path, key)
            yield from string_fields(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from string_fields(item, (*path, index))
    elif isinstance(value, str):
        yield "value", path


def substitute(
    config: dict[str, Any], kind: str, path: tuple[Any, ...], new: Any
) -> dict[str, Any]:
    """Return a copy of ``config`` with the value (or the key) at ``path`` replaced by ``new``."""
    result = copy.deepcopy(config)
    parent: Any = result
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if kind == "value":
        parent[last] = copy.deepcopy(new)
    else:
        items = list(parent.items())
        parent.clear()
        for key, item in items:
            parent[new if key == last else key] = item
    return result


def value_at(config: dict[str, Any], path: tuple[Any, ...]) -> Any:
    value: Any = config
    for part in path:
        value = value[part]
    return value


def variants(original: str) -> tuple[str, ...]:
    """Return hostile variants of a valid value: it with a line break, NUL or space added."""
    return (original + "\n", original + "\r\n", original + "\0", " " + original, original + "\t")


def hostile_values(config: dict[str, Any], kind: str, path: tuple[Any, ...]) -> tuple[Any, ...]:
    """Return every hostile value the corpus tries at ``path``: the shared ones and variants."""
    original = path[-1] if kind == "key" else value_at(config, path)
    own = variants(original) if isinstance(original, str) else ()
    return HOSTILE_STRINGS + own + HOSTILE_OTHER


def key_of(path: tuple[Any, ...]) -> str:
    """Return the config key of ``path`` as problem lines name it."""
    from components.validation import key_path

    return key_path(*path)


@dataclass
class Outcome:
    """What one config produced: the validated model, or the problem lines."""

    config: MirrorConfig | None
    problems: list[str]


def check_problem_line(line: str) -> None:
    assert line.startswith("nexus-mirror:"), line
    assert "\n" not in line, repr(line)
    assert "\r" not in line, repr(line)
    line.encode("utf-8")


def check_outcome(raw: dict[str, Any], secret_keys: frozenset[str] = SECRET_KEYS) -> Outcome:
    """Run the pipeline from stack config to node input and check its contract.

    Raises AssertionError when the contract breaks, and lets any exception
    other than ``ConfigError`` through, so a test shows the traceback.
    """
    try:
        config = parse_config(raw, secret_keys)
    except ConfigError as error:
        assert error.problems, "ConfigError without problems"
        for line in error.problems:
            check_problem_line(line)
        heading, *lines = str(error).splitlines()
        assert heading.startswith("invalid stack config ("), heading
        assert len(lines) == len(error.problems)
        return Outcome(None, list(error.problems))
    for warning in config.warnings:
        check_problem_line(warning)
    for namespace in config.namespaces:
        for content in render_files(namespace).values():
            content.encode("utf-8")
    for node in config.nodes:
        config_input(node).text.encode("utf-8")
        hosts = hosts_input(node, config)
        hosts.text.encode("utf-8")
    return Outcome(config, [])


def as_pulumi_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Encode object values as JSON text, the way the Pulumi engine passes them to a program."""
    encoded: dict[str, Any] = {}
    for name, value in raw.items():
        encoded[name] = value if isinstance(value, str) else json.dumps(value)
    return encoded


@dataclass
class Trial:
    """One hostile value tried in one field of a base config, and what came of it."""

    base: str
    """Key of BASES."""
    kind: str
    path: tuple[Any, ...]
    value: Any
    outcome: Outcome | None
    error: BaseException | None = None
    """The exception that broke the contract, if one did."""


@functools.cache
def corpus() -> tuple[Trial, ...]:
    """Try every hostile value in every string field and key of each base, once per session."""
    trials = []
    for base_name, base in BASES.items():
        trials += _trials(base_name, base)
    return tuple(trials)


def _trials(base_name: str, base: dict[str, Any]) -> list[Trial]:
    trials = []
    for kind, path in string_fields(base):
        for value in hostile_values(base, kind, path):
            if kind == "key" and isinstance(value, list | dict):
                continue  # a mapping key is never a list or a map
            if kind == "key" and len(path) == 1 and not isinstance(value, str):
                continue  # top-level names come from "nexus-mirror:NAME", always strings
            try:
                outcome = check_outcome(substitute(base, kind, path, value))
            except Exception as error:
                # Any other exception breaks the contract; the test of the field reports it.
                trials.append(Trial(base_name, kind, path, value, None, error))
            else:
                trials.append(Trial(base_name, kind, path, value, outcome))
    return trials
