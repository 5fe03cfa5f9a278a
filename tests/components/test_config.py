"""Stack config validation: every invalid value named by its key, value and fix."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from components.config import normalize_image, parse_config
from components.validation import ConfigError

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n-----END OPENSSH PRIVATE KEY-----\n"
BASE: dict[str, Any] = {
    "nexus": {"url": "https://nexus.example.net"},
    "registries": {"docker.io": {"nexus": {"port": 8082}}},
    "nodes": [{"name": "worker-1", "host": "10.0.0.11"}],
    "sshPrivateKey": KEY,
}
SECRETS = frozenset({"sshPrivateKey"})


def _with(path: str, value: Any) -> dict[str, Any]:
    """Return BASE with the value at a dotted path (``~`` stands for a literal dot) replaced."""
    config = copy.deepcopy(BASE)
    parts = [p.replace("~", ".") for p in path.split(".")]
    target: Any = config
    for part in parts[:-1]:
        key: Any = int(part) if part.isdigit() else part
        if isinstance(target, dict):
            target = target.setdefault(key, {})
        else:
            target = target[key]
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return config


DELETE = object()
MIRROR = "registries.docker~io.mirrors"

INVALID = [
    # (case id, path, value, key in message, words in message)
    ("unknown-top-level-key", "registrys", {}, "nexus-mirror:registrys", "unknown key"),
    (
        "unknown-registry-key",
        "registries.docker~io.mirror",
        [],
        'registries["docker.io"].mirror',
        "Did you mean 'mirrors'",
    ),
    ("no-registries", "registries", DELETE, "nexus-mirror:registries", "no registries"),
    (
        "namespace-with-scheme",
        "registries.https://ghcr~io",
        {"mirrors": [{"url": "https://m"}]},
        'registries["https://ghcr.io"]',
        "not a registry namespace",
    ),
    (
        "namespace-with-path",
        "registries.ghcr~io/org",
        {"mirrors": [{"url": "https://m"}]},
        'registries["ghcr.io/org"]',
        "host[:port]",
    ),
    (
        "namespace-port-range",
        "registries.r~internal:70000",
        {"mirrors": [{"url": "https://m"}]},
        'registries["r.internal:70000"]',
        "not a registry namespace",
    ),
    (
        "namespace-docker-hub-alias",
        "registries.index~docker~io",
        {"mirrors": [{"url": "https://m"}]},
        'registries["index.docker.io"]',
        "Rename the entry to docker.io",
    ),
    (
        "nexus-no-mode",
        "registries.docker~io.nexus",
        {},
        'registries["docker.io"].nexus',
        "exactly one of port",
    ),
    (
        "nexus-two-modes",
        "registries.docker~io.nexus",
        {"port": 8082, "repository": "hub"},
        'registries["docker.io"].nexus',
        "2 addressing modes",
    ),
    (
        "nexus-port-range",
        "registries.docker~io.nexus.port",
        70000,
        'registries["docker.io"].nexus.port',
        "1 to 65535",
    ),
    (
        "nexus-port-string",
        "registries.docker~io.nexus.port",
        "8082",
        'registries["docker.io"].nexus.port',
        "without quotes",
    ),
    (
        "nexus-bad-subdomain",
        "registries.docker~io.nexus",
        {"subdomain": "Hub_1"},
        "nexus.subdomain",
        "lowercase DNS labels",
    ),
    (
        "nexus-bad-repository",
        "registries.docker~io.nexus",
        {"repository": "a/b"},
        "nexus.repository",
        "repository name",
    ),
    (
        "nexus-url-missing",
        "nexus",
        DELETE,
        'registries["docker.io"].nexus.port',
        "needs nexus-mirror:nexus.url",
    ),
    (
        "nexus-url-no-scheme",
        "nexus.url",
        "nexus.example.net",
        "nexus-mirror:nexus.url",
        "https://nexus.example.net",
    ),
    (
        "nexus-url-path",
        "nexus.url",
        "https://nexus.example.net/repository",
        "nexus-mirror:nexus.url",
        "has a path",
    ),
    (
        "nexus-url-credentials",
        "nexus.url",
        "https://u:p@nexus.example.net",
        "nexus-mirror:nexus.url",
        "credentials",
    ),
    (
        "nexus-url-ftp",
        "nexus.url",
        "ftp://nexus.example.net",
        "nexus-mirror:nexus.url",
        "unsupported scheme",
    ),
    ("nexus-ca-not-pem", "nexus.caPem", "hello", "nexus-mirror:nexus.caPem", "PEM"),
    (
        "nexus-ca-private-key",
        "nexus.caPem",
        PEM + "-----BEGIN PRIVATE KEY-----\n",
        "nexus-mirror:nexus.caPem",
        "private key",
    ),
    (
        "nexus-skip-verify-string",
        "nexus.skipVerify",
        "yes",
        "nexus-mirror:nexus.skipVerify",
        "true or false",
    ),
    ("mirrors-empty", MIRROR, [], 'registries["docker.io"].mirrors', "non-empty list"),
    ("mirror-no-url", MIRROR, [{}], "mirrors[0].url", "must be a URL"),
    ("mirror-url-no-scheme", MIRROR, [{"url": "mirror.internal"}], "mirrors[0].url", "no scheme"),
    ("mirror-url-newline", MIRROR, [{"url": "https://m\n[host]"}], "mirrors[0].url", "white space"),
    ("mirror-url-query", MIRROR, [{"url": "https://m/x?y=1"}], "mirrors[0].url", "query"),
    ("mirror-url-dotdot", MIRROR, [{"url": "https://m/a/../b"}], "mirrors[0].url", "not clean"),
    (
        "mirror-url-uppercase-host",
        MIRROR,
        [{"url": "https://Mirror"}],
        "mirrors[0].url",
        "lowercase",
    ),
    (
        "mirror-duplicate-url",
        MIRROR,
        [{"url": "https://m"}, {"url": "https://m/"}],
        "mirrors[1]",
        "already used",
    ),
    (
        "mirror-duplicates-nexus",
        MIRROR,
        [{"url": "https://nexus.example.net:8082"}],
        "mirrors[0]",
        "already used",
    ),
    (
        "mirror-unknown-capability",
        MIRROR,
        [{"url": "https://m", "capabilities": ["pull", "fetch"]}],
        "capabilities[1]",
        "unknown capability",
    ),
    (
        "mirror-capability-case",
        MIRROR,
        [{"url": "https://m", "capabilities": ["Pull"]}],
        "capabilities[0]",
        "lowercase",
    ),
    (
        "mirror-referrers",
        MIRROR,
        [{"url": "https://m", "capabilities": ["pull", "referrers"]}],
        "capabilities[1]",
        "before 2.2",
    ),
    (
        "mirror-capabilities-empty",
        MIRROR,
        [{"url": "https://m", "capabilities": []}],
        "capabilities",
        "non-empty",
    ),
    (
        "mirror-capability-twice",
        MIRROR,
        [{"url": "https://m", "capabilities": ["pull", "pull"]}],
        "capabilities[1]",
        "twice",
    ),
    (
        "mirror-override-no-path",
        MIRROR,
        [{"url": "https://m", "overridePath": True}],
        "mirrors[0].url",
        "lose /v2",
    ),
    (
        "mirror-double-v2",
        MIRROR,
        [{"url": "https://m/v2/proxy"}],
        "mirrors[0].url",
        "overridePath: true",
    ),
    (
        "mirror-relative-ca",
        MIRROR,
        [{"url": "https://m", "ca": ["certs/ca.pem"]}],
        "ca[0]",
        "relative",
    ),
    ("mirror-ca-newline", MIRROR, [{"url": "https://m", "ca": "/a\n/b"}], "ca[0]", "line break"),
    (
        "mirror-client-triple",
        MIRROR,
        [{"url": "https://m", "client": [["/a", "/b", "/c"]]}],
        "client[0]",
        "exactly a certificate and a key",
    ),
    (
        "mirror-client-relative",
        MIRROR,
        [{"url": "https://m", "client": [["/a", "b.key"]]}],
        "client[0][1]",
        "relative",
    ),
    (
        "header-newline",
        MIRROR,
        [{"url": "https://m", "headers": {"X-A": "a\r\nX-B: b"}}],
        'headers["X-A"][0]',
        "line break",
    ),
    (
        "header-bad-name",
        MIRROR,
        [{"url": "https://m", "headers": {"X A": "a"}}],
        'headers["X A"]',
        "header name",
    ),
    (
        "header-case-duplicate",
        MIRROR,
        [{"url": "https://m", "headers": {"X-A": "a", "x-a": "b"}}],
        'headers["x-a"]',
        "case-insensitive",
    ),
    (
        "header-number",
        MIRROR,
        [{"url": "https://m", "headers": {"X-A": 5}}],
        'headers["X-A"]',
        "string",
    ),
    (
        "mirror-unknown-key",
        MIRROR,
        [{"url": "https://m", "insecure": True}],
        "mirrors[0].insecure",
        "unknown key",
    ),
    (
        "server-with-fallback-off",
        "registries.docker~io",
        {"nexus": {"port": 8082}, "fallback": False, "server": "https://registry-1.docker.io"},
        'registries["docker.io"].server',
        "Remove server",
    ),
    (
        "fallback-string",
        "registries.docker~io.fallback",
        "no",
        'registries["docker.io"].fallback',
        "true or false",
    ),
    (
        "registry-sets-nothing",
        "registries.docker~io",
        {"fallback": True},
        'registries["docker.io"]',
        "sets no mirror",
    ),
    ("no-nodes", "nodes", DELETE, "nexus-mirror:nodes", "no nodes"),
    ("node-no-host", "nodes", [{"name": "a"}], "nodes[0].host", "invalid host"),
    (
        "node-host-with-scheme",
        "nodes",
        [{"host": "ssh://10.0.0.1"}],
        "nodes[0].host",
        "without scheme",
    ),
    ("node-port-range", "nodes.0.port", 0, "nodes[0].port", "1 to 65535"),
    ("node-bad-user", "nodes.0.user", "root; rm -rf /", "nodes[0].user", "login name"),
    (
        "node-duplicate-name",
        "nodes",
        [{"host": "10.0.0.1", "name": "a"}, {"host": "10.0.0.2", "name": "a"}],
        "nodes[1].name",
        "already used",
    ),
    ("node-bad-host-key", "nodes.0.hostKey", "AAAA", "nodes[0].hostKey", "ssh-keyscan"),
    ("node-unknown-key", "nodes.0.hostname", "x", "nodes[0].hostname", "unknown key"),
    (
        "node-relative-config-path",
        "nodes.0.containerd",
        {"configPath": "etc/certs.d"},
        "nodes[0].containerd.configPath",
        "relative",
    ),
    (
        "containerd-restart-newline",
        "containerd",
        {"restartCommand": "systemctl restart containerd\nreboot"},
        "containerd.restartCommand",
        "line break",
    ),
    (
        "containerd-timeout-range",
        "containerd",
        {"restartTimeout": 1},
        "containerd.restartTimeout",
        "5 to 3600",
    ),
    (
        "containerd-manage-string",
        "containerd",
        {"manageConfigFile": "true"},
        "containerd.manageConfigFile",
        "true or false",
    ),
    (
        "containerd-unknown-key",
        "containerd",
        {"config_path": "/x"},
        "containerd.config_path",
        "unknown key",
    ),
    (
        "containerd-config-path-root",
        "containerd",
        {"configPath": "/"},
        "containerd.configPath",
        "directory of its own",
    ),
    ("ssh-bad-user", "ssh", {"user": "Bad User"}, "ssh.user", "login name"),
    ("bastion-no-host", "ssh", {"bastion": {"port": 22}}, "ssh.bastion.host", "invalid host"),
    ("verify-bad-image", "verify", {"image": "Busybox:latest"}, "verify.image", "invalid image"),
    (
        "rollout-zero",
        "rollout",
        {"maxParallelRestarts": 0},
        "rollout.maxParallelRestarts",
        "1 to 1000",
    ),
    (
        "private-key-not-pem",
        "sshPrivateKey",
        "hunter2",
        "nexus-mirror:sshPrivateKey",
        "private key",
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "key", "words"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_value_is_named(path: str, value: Any, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_with(path, value), SECRETS)
    matching = [p for p in caught.value.problems if key in p]
    assert matching, caught.value.problems
    assert any(words in p for p in matching), matching


@pytest.mark.parametrize("case", INVALID, ids=[case[0] for case in INVALID])
def test_every_message_has_a_fix(case: tuple) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_with(case[1], case[2]), SECRETS)
    for problem in caught.value.problems:
        key, _, rest = problem.partition(": ")
        assert key.startswith("nexus-mirror:")
        assert "). " in rest or "value not shown" in rest, problem


def test_all_problems_reported_at_once() -> None:
    config = _with("nodes", [{"host": "10.0.0.1", "port": 0}])
    config["registries"]["docker.io"]["nexus"] = {"port": 99999}
    with pytest.raises(ConfigError) as caught:
        parse_config(config, SECRETS)
    assert len(caught.value.problems) == 2


def test_plain_private_key_rejected_hidden() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE, frozenset())
    message = str(caught.value)
    assert "pulumi config set --secret nexus-mirror:sshPrivateKey" in message
    assert "b3Bl" not in message


def test_secret_value_never_shown() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_with("sshPrivateKey", "hunter2"), SECRETS)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("path", "value", "warning"),
    [
        ("nexus.skipVerify", True, "nexus.skipVerify"),
        ("nexus.url", "http://nexus.example.net", "plain HTTP"),
        (
            MIRROR,
            [{"url": "https://m", "capabilities": ["pull", "resolve", "push"]}],
            "push is enabled",
        ),
        (MIRROR, [{"url": "https://m", "capabilities": ["pull"]}], "without resolve"),
        (MIRROR, [{"url": "https://m", "skipVerify": True}], "not verified"),
        (MIRROR, [{"url": "https://m/cache", "overridePath": True}], "without any /v2"),
        ("verify", {"image": "quay.io/x/y:1"}, "proves nothing"),
    ],
)
def test_risky_value_warns(path: str, value: Any, warning: str) -> None:
    config = parse_config(_with(path, value), SECRETS)
    assert any(warning in w for w in config.warnings), config.warnings


def test_unpinned_host_key_warns() -> None:
    config = parse_config(BASE, SECRETS)
    assert any("hostKey" in w and "worker-1" in w for w in config.warnings)


def test_valid_config_defaults() -> None:
    config = parse_config(BASE, SECRETS)
    node = config.nodes[0]
    assert node.user == "root"
    assert node.port == 22
    assert node.containerd.config_path == "/etc/containerd/certs.d"
    assert config.max_parallel_restarts == 1
    assert config.namespaces[0].fallback is True


def test_node_override_keeps_shared_settings() -> None:
    config = _with("containerd", {"restartCommand": "systemctl restart k3s"})
    config["nodes"][0]["containerd"] = {
        "configPath": "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"
    }
    node = parse_config(config, SECRETS).nodes[0]
    assert node.containerd.restart_command == "systemctl restart k3s"
    assert node.containerd.config_path == "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"


def test_objects_arrive_as_json_text() -> None:
    import json

    raw = {
        name: json.dumps(value) if name != "sshPrivateKey" else value
        for name, value in BASE.items()
    }
    assert parse_config(raw, SECRETS).namespaces[0].name == "docker.io"


def test_fallback_off_makes_last_mirror_the_server() -> None:
    config = _with("registries.docker~io.fallback", False)
    namespace = parse_config(config, SECRETS).namespaces[0]
    assert namespace.server is not None
    assert namespace.server.url == "https://nexus.example.net:8082"


@pytest.mark.parametrize(
    ("reference", "normalized", "registry"),
    [
        ("busybox", "docker.io/library/busybox:latest", "docker.io"),
        ("library/busybox:1.36", "docker.io/library/busybox:1.36", "docker.io"),
        ("index.docker.io/org/app:v1", "docker.io/org/app:v1", "docker.io"),
        ("ghcr.io/org/app", "ghcr.io/org/app:latest", "ghcr.io"),
        ("registry.internal:5000/app:1", "registry.internal:5000/app:1", "registry.internal:5000"),
        ("localhost/app", "localhost/app:latest", "localhost"),
    ],
)
def test_normalize_image(reference: str, normalized: str, registry: str) -> None:
    assert normalize_image(reference) == (normalized, registry)


def test_values_of_secret_keys_never_shown() -> None:
    config = _with(MIRROR, [{"url": "https://m", "headers": {"Authorization": "Basic s3cr3t\n"}}])
    with pytest.raises(ConfigError) as caught:
        parse_config(config, SECRETS | {"registries"})
    assert "s3cr3t" not in str(caught.value)
    assert "value not shown" in str(caught.value)
