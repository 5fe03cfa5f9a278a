"""Validation of nexus-mirror:delivery and the nexus-mirror:kubernetes block."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from components.config import parse_config
from components.kubernetes.bundle import BundleError, build_bundle, file_key
from components.kubernetes.values import quantity_value
from components.model import KubernetesVerify, ResourceQuantities, Toleration
from components.validation import ConfigError

IMAGE = "nexus.example.net:8082/library/busybox:1.37"


def _values(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "nexus": {"url": "https://nexus.example.net"},
        "registries": {"docker.io": {"nexus": {"port": 8082}}},
        "delivery": "kubernetes",
        "kubernetes": {"image": IMAGE},
    }
    values.update(overrides)
    return values


def _kubernetes(**settings: Any) -> dict[str, Any]:
    return _values(kubernetes={"image": IMAGE, **settings})


def _problems(values: dict[str, Any], secret_keys: frozenset[str] = frozenset()) -> str:
    with pytest.raises(ConfigError) as raised:
        parse_config(values, secret_keys)
    return str(raised.value)


def test_defaults() -> None:
    config = parse_config(_values())
    assert config.delivery == "kubernetes"
    assert config.nodes == ()
    settings = config.kubernetes
    assert settings is not None
    assert settings.image == IMAGE
    assert settings.namespace == "nexus-mirror"
    assert settings.context is None
    assert settings.kubeconfig is None
    assert settings.node_selector == (("kubernetes.io/os", "linux"),)
    assert settings.tolerations == (Toleration(operator="Exists"),)
    assert settings.image_pull_policy == "IfNotPresent"
    assert settings.resources == ResourceQuantities()
    assert settings.priority_class_name is None
    assert (settings.max_surge, settings.max_unavailable) == (1, 0)
    assert settings.manage_config_file is False
    assert settings.verify == KubernetesVerify()
    assert not [w for w in config.warnings if "sshPrivateKey" in w]


def test_ssh_is_default_delivery() -> None:
    values = _values(nodes=[{"host": "10.0.0.11"}])
    del values["delivery"], values["kubernetes"]
    config = parse_config(values)
    assert config.delivery == "ssh"
    assert config.kubernetes is None


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (_values(delivery="helm"), "nexus-mirror:delivery: unknown delivery (got 'helm')"),
        (_values(kubernetes=None), "nexus-mirror:kubernetes: is required with delivery kubernetes"),
        (_values(kubernetes="busybox"), "nexus-mirror:kubernetes: must be an object"),
        (_values(kubernetes={}), "nexus-mirror:kubernetes.image: no image is set"),
        (
            _kubernetes(image="Busybox:Latest!"),
            "nexus-mirror:kubernetes.image: invalid image reference",
        ),
        (_kubernetes(imag="x"), "nexus-mirror:kubernetes.imag: unknown key"),
        (
            _kubernetes(namespace="Mirrors"),
            "nexus-mirror:kubernetes.namespace: invalid namespace name",
        ),
        (
            _kubernetes(namespace="a" * 64),
            "nexus-mirror:kubernetes.namespace: invalid namespace name",
        ),
        (
            _kubernetes(context=""),
            "nexus-mirror:kubernetes.context: must be non-empty context name",
        ),
        (
            _kubernetes(kubeconfig="a\nb"),
            "nexus-mirror:kubernetes.kubeconfig: kubeconfig file path contains a line break",
        ),
        (
            _kubernetes(nodeSelector=["linux"]),
            "nexus-mirror:kubernetes.nodeSelector: must map label keys to values",
        ),
        (
            _kubernetes(nodeSelector={"bad key": "x"}),
            'nexus-mirror:kubernetes.nodeSelector["bad key"]: invalid label key',
        ),
        (
            _kubernetes(nodeSelector={"Example.com/pool": "x"}),
            "invalid label key: its prefix before '/' is not a DNS subdomain",
        ),
        (
            _kubernetes(nodeSelector={"example.com/pool": "-gpu"}),
            'nexus-mirror:kubernetes.nodeSelector["example.com/pool"]: invalid label value',
        ),
        (
            _kubernetes(tolerations={"operator": "Exists"}),
            "nexus-mirror:kubernetes.tolerations: must be a list",
        ),
        (
            _kubernetes(tolerations=["x"]),
            "nexus-mirror:kubernetes.tolerations[0]: must be an object",
        ),
        (
            _kubernetes(tolerations=[{"operator": "Equal", "value": "x"}]),
            "nexus-mirror:kubernetes.tolerations[0].operator: must be Exists when key is empty",
        ),
        (
            _kubernetes(tolerations=[{"key": "a", "operator": "In"}]),
            "nexus-mirror:kubernetes.tolerations[0].operator: invalid operator",
        ),
        (
            _kubernetes(tolerations=[{"key": "a", "operator": "Exists", "value": "b"}]),
            "nexus-mirror:kubernetes.tolerations[0].value: must be empty when operator is Exists",
        ),
        (
            _kubernetes(tolerations=[{"key": "a", "operator": "Exists", "effect": "NoRun"}]),
            "nexus-mirror:kubernetes.tolerations[0].effect: invalid taint effect",
        ),
        (
            _kubernetes(tolerations=[{"operator": "Exists", "tolerationSeconds": 30}]),
            "nexus-mirror:kubernetes.tolerations[0].tolerationSeconds: applies only to effect NoExecute",
        ),
        (
            _kubernetes(
                tolerations=[
                    {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": "30"}
                ]
            ),
            "tolerationSeconds: must be a whole number of seconds",
        ),
        (
            _kubernetes(tolerations=[{"operator": "Exists", "tolerate": 1}]),
            "tolerations[0].tolerate: unknown key",
        ),
        (
            _kubernetes(imagePullPolicy="always"),
            "nexus-mirror:kubernetes.imagePullPolicy: invalid image pull policy",
        ),
        (
            _kubernetes(imagePullSecrets="nexus"),
            "nexus-mirror:kubernetes.imagePullSecrets: must be a list of Secret names",
        ),
        (
            _kubernetes(imagePullSecrets=["Nexus_Pull"]),
            "nexus-mirror:kubernetes.imagePullSecrets[0]: invalid Secret name",
        ),
        (_kubernetes(resources=[]), "nexus-mirror:kubernetes.resources: must be an object"),
        (
            _kubernetes(resources={"request": {}}),
            "nexus-mirror:kubernetes.resources.request: unknown key",
        ),
        (
            _kubernetes(resources={"requests": {"cpu": "ten"}}),
            "nexus-mirror:kubernetes.resources.requests.cpu: invalid quantity (got 'ten')",
        ),
        (
            _kubernetes(resources={"requests": {"memory": "-1Mi"}}),
            "nexus-mirror:kubernetes.resources.requests.memory: invalid quantity",
        ),
        (
            _kubernetes(resources={"limits": {"gpu": "1"}}),
            "nexus-mirror:kubernetes.resources.limits.gpu: unknown key",
        ),
        (
            _kubernetes(resources={"requests": {"memory": "1Gi"}}),
            "nexus-mirror:kubernetes.resources.requests.memory: is above the limit 128Mi",
        ),
        (
            _kubernetes(priorityClassName="Critical"),
            "nexus-mirror:kubernetes.priorityClassName: invalid PriorityClass name",
        ),
        (
            _kubernetes(maxSurge=-1),
            "nexus-mirror:kubernetes.maxSurge: must be a number of nodes or a percentage",
        ),
        (
            _kubernetes(maxUnavailable="150%"),
            "nexus-mirror:kubernetes.maxUnavailable: must be a number of nodes or a percentage",
        ),
        (
            _kubernetes(maxSurge=True),
            "nexus-mirror:kubernetes.maxSurge: must be a number of nodes or a percentage",
        ),
        (
            _kubernetes(maxSurge="0%", maxUnavailable=0),
            "nexus-mirror:kubernetes.maxSurge: maxSurge and maxUnavailable are both 0",
        ),
        (
            _kubernetes(manageConfigFile="yes"),
            "nexus-mirror:kubernetes.manageConfigFile: must be true or false",
        ),
        (_kubernetes(verify=[]), "nexus-mirror:kubernetes.verify: must be an object"),
        (
            _kubernetes(verify={"nodes": ["worker-1"], "sample": 2}),
            "nexus-mirror:kubernetes.verify.sample: is set together with nodes",
        ),
        (_kubernetes(verify={"nodes": []}), "nexus-mirror:kubernetes.verify.nodes: is empty"),
        (
            _kubernetes(verify={"nodes": ["a", "a"]}),
            "nexus-mirror:kubernetes.verify.nodes: names a node twice",
        ),
        (
            _kubernetes(verify={"nodes": ["Worker_1"]}),
            "nexus-mirror:kubernetes.verify.nodes[0]: invalid node name",
        ),
        (
            _kubernetes(verify={"sample": 0}),
            "nexus-mirror:kubernetes.verify.sample: count is out of range",
        ),
        (
            _kubernetes(verify={"timeoutSeconds": 5}),
            "nexus-mirror:kubernetes.verify.timeoutSeconds: number of seconds is out of range",
        ),
        (
            _values(containerd={"manageConfigFile": True}),
            "nexus-mirror:containerd.manageConfigFile: is read by SSH delivery only",
        ),
        (
            _values(containerd={"configPath": "/nexus-mirror/certs.d"}),
            "nexus-mirror:containerd.configPath: the sync pods mount this host directory at the same path, and /nexus-mirror",
        ),
        (
            _values(containerd={"stateDir": "/tmp"}),
            "nexus-mirror:containerd.stateDir: the sync pods mount this host directory at the same path, and /tmp",
        ),
        (
            _values(nodes=[{"host": "10.0.0.11"}]),
            "nexus-mirror:nodes: is used only with nexus-mirror:delivery ssh",
        ),
        (
            _values(ssh={"user": "root"}),
            "nexus-mirror:ssh: is used only with nexus-mirror:delivery ssh",
        ),
        (
            _values(rollout={"maxParallelRestarts": 2}),
            "nexus-mirror:rollout: is used only with nexus-mirror:delivery ssh",
        ),
        (
            {**_values(nodes=[{"host": "10.0.0.11"}]), "delivery": "ssh"},
            "nexus-mirror:kubernetes: is read only with nexus-mirror:delivery kubernetes",
        ),
    ],
)
def test_invalid_value_named(values: dict[str, Any], expected: str) -> None:
    assert expected in _problems(values)


def test_ssh_private_key_rejected_without_value() -> None:
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nsecretbytes\n-----END OPENSSH PRIVATE KEY-----\n"
    message = _problems(_values(sshPrivateKey=key), frozenset({"sshPrivateKey"}))
    assert "nexus-mirror:sshPrivateKey: is used only with nexus-mirror:delivery ssh" in message
    assert "(value not shown: it is a secret)" in message
    assert "secretbytes" not in message


def test_config_auth_rejected() -> None:
    registries = {
        "quay.io": {
            "mirrors": [
                {
                    "url": "https://quay-mirror.internal",
                    "username": "robot",
                    "passwordKey": "quayPassword",
                    "auth": "config",
                }
            ]
        }
    }
    values = {**_values(registries=registries), "quayPassword": "pw-1234"}
    message = _problems(values, frozenset({"quayPassword"}))
    assert (
        "auth: config writes credentials to config.toml, which delivery kubernetes does not write"
        in message
    )


def test_every_problem_at_once() -> None:
    message = _problems(_kubernetes(namespace="Bad", maxSurge=-1, imagePullPolicy="x"))
    assert "3 problems" in message


def test_settings_accepted() -> None:
    config = parse_config(
        _kubernetes(
            namespace="mirrors",
            context="prod",
            kubeconfig="~/.kube/prod",
            nodeSelector={"example.com/pool": "gpu", "kubernetes.io/os": "linux"},
            tolerations=[
                {
                    "key": "node-role.kubernetes.io/control-plane",
                    "operator": "Exists",
                    "effect": "NoSchedule",
                },
                {"key": "dedicated", "value": "mirror"},
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
            ],
            imagePullPolicy="Always",
            imagePullSecrets=["nexus-pull"],
            resources={
                "requests": {"cpu": "500m", "memory": "64Mi"},
                "limits": {"memory": "1Gi", "ephemeral-storage": "1G"},
            },
            priorityClassName="system-node-critical",
            maxSurge="20%",
            maxUnavailable=0,
            manageConfigFile=True,
            verify={"nodes": ["worker-1", "control-1.example.net"], "timeoutSeconds": 600},
        )
    )
    settings = config.kubernetes
    assert settings is not None
    assert settings.namespace == "mirrors"
    assert settings.context == "prod"
    assert settings.node_selector == (("example.com/pool", "gpu"), ("kubernetes.io/os", "linux"))
    assert settings.tolerations[1] == Toleration(key="dedicated", operator="Equal", value="mirror")
    assert settings.tolerations[2].toleration_seconds == 300
    assert settings.resources.requests == (("cpu", "500m"), ("memory", "64Mi"))
    assert settings.resources.limits == (("memory", "1Gi"), ("ephemeral-storage", "1G"))
    assert settings.max_surge == "20%"
    assert settings.manage_config_file is True
    assert settings.verify.nodes == ("worker-1", "control-1.example.net")
    assert settings.verify.timeout == 600
    assert any("privileged pod" in warning for warning in config.warnings)


def test_no_tolerations_allowed() -> None:
    config = parse_config(_kubernetes(tolerations=[]))
    assert config.kubernetes is not None
    assert config.kubernetes.tolerations == ()


def test_max_unavailable_warns_of_gap() -> None:
    config = parse_config(_kubernetes(maxSurge=0, maxUnavailable=1))
    assert any(
        "nexus-mirror:kubernetes.maxUnavailable: is 1" in warning
        and "bypass the mirrors" in warning
        for warning in config.warnings
    )


def test_secret_block_values_hidden() -> None:
    message = _problems(_kubernetes(namespace="Secret-Name"), frozenset({"kubernetes"}))
    assert "nexus-mirror:kubernetes.namespace: invalid namespace name (value not shown" in message
    assert "Secret-Name" not in message


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        ("100m", "0.1"),
        ("64Mi", str(64 * 2**20)),
        ("1G", "1000000000"),
        ("1.5", "1.5"),
        ("2e3", "2000"),
        ("1Ki", "1024"),
    ],
)
def test_quantity_values(text: str, amount: str) -> None:
    assert quantity_value(text) == Decimal(amount)


@pytest.mark.parametrize("text", ["", "1.2.3", "10 Mi", "Mi", "1mi", "-1"])
def test_quantity_rejected(text: str) -> None:
    assert quantity_value(text) is None


def test_file_keys_are_configmap_keys() -> None:
    assert file_key("registry.internal:5000", "hosts.toml") == "registry.internal_5000__hosts.toml"
    assert file_key("_default", "hosts.toml") == "_default__hosts.toml"


def test_bundle_rejects_oversized_data() -> None:
    pem = "-----BEGIN CERTIFICATE-----\n" + "A" * 1_100_000 + "\n-----END CERTIFICATE-----\n"
    registries = {"ghcr.io": {"mirrors": [{"url": "https://ghcr-mirror.internal", "caPem": pem}]}}
    config = parse_config(_values(registries=registries))
    with pytest.raises(BundleError, match="above the 1000000 bytes"):
        build_bundle(config)
