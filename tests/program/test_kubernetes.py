"""The program with delivery kubernetes under Pulumi's mocks: every object it declares.

Each manifest is also validated offline against the Kubernetes OpenAPI
schemas that the kubernetes-validate package ships.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import jsonpath_rfc9535
import kubernetes_validate
import pulumi
import pytest
import yaml

from components.config import parse_config
from components.hosts_toml import render_files
from components.kubernetes.bundle import build_bundle
from components.kubernetes.manifests import FILES_ANNOTATION, SECRET_ANNOTATION
from components.kubernetes.render import all_manifests
from components.kubernetes.verify_pods import WAIT_FOR_PULL
from components.node_script import hosts_input
from tests.program_run import run_program, stack_config

IMAGE = "nexus.example.net:8082/library/busybox:1.37"
VERIFY_IMAGE = "docker.io/library/busybox:latest"
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBmirrorCA\n-----END CERTIFICATE-----\n"
CLIENT_CERT = "-----BEGIN CERTIFICATE-----\nMIIBclientCert\n-----END CERTIFICATE-----\n"
CLIENT_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEclientKeySecretBytes\n-----END PRIVATE KEY-----\n"
PASSWORD = "quay-robot-password-1234"
# The oldest and the newest Kubernetes minor version whose schemas are checked.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# Marker of a secret value in the inputs that Pulumi's mocks receive.
SECRET_SIG = "4dabf18193072939515e22adb298388d"
SAMPLE_NODES = ["worker-1", "worker-2", "worker-3"]


def _base_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "nexus": {"url": "https://nexus.example.net"},
        "registries": {
            "docker.io": {"nexus": {"port": 8082}},
            "ghcr.io": {"mirrors": [{"url": "https://ghcr-mirror.internal", "caPem": CA_PEM}]},
            "quay.io": {
                "mirrors": [
                    {
                        "url": "https://quay-mirror.internal",
                        "username": "robot",
                        "passwordKey": "quayPassword",
                    }
                ]
            },
            "registry.internal:5000": {
                "mirrors": [
                    {
                        "url": "https://mirror.internal",
                        "clientCertPem": CLIENT_CERT,
                        "clientKeyPemKey": "mirrorClientKey",
                    }
                ]
            },
        },
        "delivery": "kubernetes",
        "kubernetes": {"image": IMAGE},
        "verify": {"image": VERIFY_IMAGE},
    }
    config.update(overrides)
    return config


SECRETS = {"quayPassword": PASSWORD, "mirrorClientKey": CLIENT_KEY}


def _plain(value: Any) -> Any:
    """Return mock inputs with Pulumi's secret wrappers replaced by their values."""
    if isinstance(value, dict):
        if value.get(SECRET_SIG) is not None and "value" in value:
            return _plain(value["value"])
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


class KubernetesMocks(pulumi.runtime.Mocks):
    """Mocks that return what the API server would: a DaemonSet status and the pods' pull results."""

    def __init__(self, pull_reason: str | None = None) -> None:
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.raw_inputs: dict[tuple[str, str], dict[str, Any]] = {}
        self.providers: dict[tuple[str, str], str] = {}
        self.pull_reason = pull_reason
        self.lock = threading.Lock()

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        if args.typ == "nexus-mirror:index:KubernetesMirror":
            return f"{args.name}-id", {}
        outputs = dict(args.inputs)
        if args.typ == "kubernetes:apps/v1:DaemonSet":
            outputs["status"] = {
                "desiredNumberScheduled": 3,
                "numberReady": 2,
                "updatedNumberScheduled": 3,
                "numberAvailable": 2,
            }
        if args.typ == "kubernetes:core/v1:Pod":
            outputs["status"] = self._pod_status()
            spec = dict(args.inputs["spec"])
            if "nodeName" not in spec:
                spec["nodeName"] = SAMPLE_NODES[int(args.name.rsplit("-", 1)[1])]
            outputs["spec"] = spec
        with self.lock:
            self.resources[(args.typ, args.name)] = _plain(args.inputs)
            self.raw_inputs[(args.typ, args.name)] = args.inputs
            self.providers[(args.typ, args.name)] = args.provider or ""
        return f"{args.name}-id", outputs

    def _pod_status(self) -> dict[str, Any]:
        if self.pull_reason is None:
            state = {"terminated": {"exitCode": 0, "reason": "Completed"}}
            return {
                "phase": "Succeeded",
                "containerStatuses": [
                    {"name": "pull", "imageID": "docker.io/library/busybox@sha256:" + "1" * 64}
                    | {"state": state}
                ],
            }
        waiting = {"reason": self.pull_reason, "message": "failed to resolve reference"}
        return {
            "phase": "Pending",
            "containerStatuses": [{"name": "pull", "imageID": "", "state": {"waiting": waiting}}],
        }

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}

    def of_type(self, typ: str) -> dict[str, dict[str, Any]]:
        return {name: inputs for (kind, name), inputs in self.resources.items() if kind == typ}

    def one(self, typ: str, name: str) -> dict[str, Any]:
        return self.resources[(typ, name)]


def _write_stack(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "Pulumi.k8s.yaml"
    document = {"config": {f"nexus-mirror:{key}": value for key, value in config.items()}}
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def _run(
    tmp_path: Path,
    mocks: KubernetesMocks | None = None,
    secret_keys: tuple[str, ...] = (),
    **overrides: Any,
) -> tuple[KubernetesMocks, Any]:
    mocks = mocks or KubernetesMocks()
    config, secret_names = stack_config(
        _write_stack(tmp_path, _base_config(**overrides)), None, SECRETS
    )
    secret_names.extend(f"nexus-mirror:{name}" for name in secret_keys)
    run = run_program(mocks, config, secret_names)
    return mocks, run


def _mirror_config(**overrides: Any):
    values = {**_base_config(**overrides), **SECRETS}
    return parse_config(values, frozenset(SECRETS))


def _resolve(output: pulumi.Output) -> Any:
    holder: dict[str, Any] = {}

    @pulumi.runtime.test
    def read() -> Any:
        return output.apply(lambda value: holder.update(value=value))

    read()
    return holder["value"]


def _daemon_set(mocks: KubernetesMocks) -> dict[str, Any]:
    return mocks.one("kubernetes:apps/v1:DaemonSet", "daemon-set")


def _pod_spec(mocks: KubernetesMocks) -> dict[str, Any]:
    return _daemon_set(mocks)["spec"]["template"]["spec"]


def _container(mocks: KubernetesMocks, name: str = "sync") -> dict[str, Any]:
    spec = _pod_spec(mocks)
    containers = spec["containers"] + spec.get("initContainers", [])
    return next(container for container in containers if container["name"] == name)


def test_every_resource_declared(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    assert set(mocks.resources) == {
        ("kubernetes:core/v1:NamespacePatch", "namespace"),
        ("kubernetes:core/v1:ConfigMap", "scripts"),
        ("kubernetes:core/v1:ConfigMap", "files"),
        ("kubernetes:core/v1:Secret", "files"),
        ("kubernetes:apps/v1:DaemonSet", "daemon-set"),
        ("kubernetes:core/v1:Pod", "verify-0"),
        ("kubernetes:core/v1:Pod", "verify-1"),
        ("kubernetes:core/v1:Pod", "verify-2"),
    }


def test_children_parented_to_component(tmp_path: Path) -> None:
    _, run = _run(tmp_path)
    daemon_set = run.namespace["mirror"].resources["daemon-set"]
    urn = _resolve(daemon_set.urn)
    assert "nexus-mirror:index:KubernetesMirror$kubernetes:apps/v1:DaemonSet::daemon-set" in urn


def test_object_names_and_namespace(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    names = {
        key: inputs["metadata"]["name"]
        for key, inputs in mocks.resources.items()
        if key[0] != "kubernetes:core/v1:Pod"
    }
    assert names == {
        ("kubernetes:core/v1:NamespacePatch", "namespace"): "nexus-mirror",
        ("kubernetes:core/v1:ConfigMap", "scripts"): "nexus-mirror-scripts",
        ("kubernetes:core/v1:ConfigMap", "files"): "nexus-mirror-files",
        ("kubernetes:core/v1:Secret", "files"): "nexus-mirror-files",
        ("kubernetes:apps/v1:DaemonSet", "daemon-set"): "nexus-mirror",
    }
    for key, inputs in mocks.resources.items():
        if key[0] != "kubernetes:core/v1:NamespacePatch":
            assert inputs["metadata"]["namespace"] == "nexus-mirror", key


def test_namespace_label_admits_host_path(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path, kubernetes={"image": IMAGE, "namespace": "mirrors"})
    namespace = mocks.one("kubernetes:core/v1:NamespacePatch", "namespace")
    assert namespace["metadata"]["name"] == "mirrors"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert _daemon_set(mocks)["metadata"]["namespace"] == "mirrors"


def test_labels_on_every_object(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    expected_component = {
        ("kubernetes:core/v1:ConfigMap", "scripts"): "scripts",
        ("kubernetes:core/v1:ConfigMap", "files"): "files",
        ("kubernetes:core/v1:Secret", "files"): "files",
        ("kubernetes:apps/v1:DaemonSet", "daemon-set"): "sync",
        ("kubernetes:core/v1:Pod", "verify-0"): "verify",
    }
    for key, component in expected_component.items():
        labels = mocks.resources[key]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "nexus-mirror", key
        assert labels["app.kubernetes.io/managed-by"] == "pulumi", key
        assert labels["app.kubernetes.io/component"] == component, key
    daemon_set = _daemon_set(mocks)
    selector = daemon_set["spec"]["selector"]["matchLabels"]
    template_labels = daemon_set["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()


def test_host_mounts_are_config_path_and_state_dir(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    volumes = {volume["name"]: volume for volume in _pod_spec(mocks)["volumes"]}
    host_paths = {name: v["hostPath"] for name, v in volumes.items() if "hostPath" in v}
    assert host_paths == {
        "host-config-path": {"path": "/etc/containerd/certs.d", "type": "DirectoryOrCreate"},
        "host-state": {"path": "/var/lib/nexus-mirror", "type": "DirectoryOrCreate"},
    }
    sources = volumes["files"]["projected"]["sources"]
    assert sources == [
        {"configMap": {"name": "nexus-mirror-files"}},
        {"secret": {"name": "nexus-mirror-files"}},
    ]
    assert volumes["files"]["projected"]["defaultMode"] == 0o400
    assert volumes["scripts"]["configMap"]["name"] == "nexus-mirror-scripts"
    assert volumes["tmp"]["emptyDir"]["medium"] == "Memory"
    mounts = {mount["name"]: mount for mount in _container(mocks)["volumeMounts"]}
    assert mounts["host-config-path"]["mountPath"] == "/etc/containerd/certs.d"
    assert mounts["host-state"]["mountPath"] == "/var/lib/nexus-mirror"
    assert mounts["files"] == {
        "name": "files",
        "mountPath": "/nexus-mirror/files",
        "readOnly": True,
    }
    assert mounts["scripts"]["readOnly"] is True
    assert "readOnly" not in mounts["host-config-path"]


def test_containerd_paths_follow_stack_config(tmp_path: Path) -> None:
    containerd = {"configPath": "/etc/containerd/hosts.d", "stateDir": "/var/lib/nm-state"}
    mocks, _ = _run(tmp_path, containerd=containerd)
    mounts = {mount["name"]: mount["mountPath"] for mount in _container(mocks)["volumeMounts"]}
    assert mounts["host-config-path"] == "/etc/containerd/hosts.d"
    assert mounts["host-state"] == "/var/lib/nm-state"
    settings = mocks.one("kubernetes:core/v1:ConfigMap", "files")["data"]["settings.sh"]
    assert "NM_CONFIG_PATH=/etc/containerd/hosts.d\n" in settings
    assert "NM_STATE_DIR=/var/lib/nm-state\n" in settings
    assert "NM_MANAGE_CONFIG=false\n" in settings
    assert "NM_NODE=" not in settings


def test_probe_hook_and_command(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    container = _container(mocks)
    script = "/nexus-mirror/bin/kubernetes-sync.sh"
    assert container["image"] == IMAGE
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["command"] == ["sh", script, "run"]
    assert container["readinessProbe"]["exec"]["command"] == ["sh", script, "check"]
    assert container["readinessProbe"]["failureThreshold"] == 1
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sh", script, "stop"]
    assert "livenessProbe" not in container
    assert "startupProbe" not in container
    env = {item["name"]: item for item in container["env"]}
    assert env["NM_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NM_POD_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    assert env["NM_K8S_FILES"]["value"] == "/nexus-mirror/files"
    assert _pod_spec(mocks)["terminationGracePeriodSeconds"] >= 60


def test_security_context_without_manage_config(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    pod = _pod_spec(mocks)
    assert "hostPID" not in pod
    assert "hostNetwork" not in pod
    assert "initContainers" not in pod
    assert pod["automountServiceAccountToken"] is False
    context = _container(mocks)["securityContext"]
    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {
        "drop": ["ALL"],
        "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"],
    }
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_manage_config_file_adds_privileged_init(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path, kubernetes={"image": IMAGE, "manageConfigFile": True})
    pod = _pod_spec(mocks)
    assert pod["hostPID"] is True
    init = _container(mocks, "containerd-config")
    assert init["command"] == ["sh", "/nexus-mirror/bin/kubernetes-sync.sh", "config"]
    assert init["securityContext"]["privileged"] is True
    # The init container edits config.toml through nsenter, not through a host mount.
    assert {mount["name"] for mount in init["volumeMounts"]} == {"files", "scripts", "tmp"}
    assert _container(mocks)["securityContext"]["privileged"] is False
    settings = mocks.one("kubernetes:core/v1:ConfigMap", "files")["data"]["settings.sh"]
    assert "NM_MANAGE_CONFIG=true\n" in settings
    warnings = _mirror_config(kubernetes={"image": IMAGE, "manageConfigFile": True}).warnings
    assert any("privileged pod" in warning for warning in warnings)


def test_destroy_waits_for_pods(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    annotations = _daemon_set(mocks)["metadata"]["annotations"]
    assert annotations["pulumi.com/deletionPropagationPolicy"] == "foreground"


def test_update_strategy_default_surges(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    strategy = _daemon_set(mocks)["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_update_strategy_follows_settings(tmp_path: Path) -> None:
    settings = {"image": IMAGE, "maxSurge": "10%", "maxUnavailable": 2}
    mocks, _ = _run(tmp_path, kubernetes=settings)
    rolling = _daemon_set(mocks)["spec"]["updateStrategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": "10%", "maxUnavailable": 2}


def test_every_node_by_default(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    pod = _pod_spec(mocks)
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert "priorityClassName" not in pod
    assert "affinity" not in pod


def test_scheduling_settings(tmp_path: Path) -> None:
    settings = {
        "image": IMAGE,
        "nodeSelector": {"example.com/pool": "gpu"},
        "tolerations": [
            {"key": "example.com/dedicated", "operator": "Equal", "value": "gpu"},
            {
                "key": "node.kubernetes.io/unreachable",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 60,
            },
        ],
        "priorityClassName": "system-node-critical",
        "imagePullPolicy": "Never",
        "imagePullSecrets": ["nexus-pull"],
        "resources": {"requests": {"cpu": "50m"}, "limits": {"cpu": "1", "memory": "256Mi"}},
    }
    mocks, _ = _run(tmp_path, kubernetes=settings)
    pod = _pod_spec(mocks)
    assert pod["nodeSelector"] == {"example.com/pool": "gpu"}
    assert pod["tolerations"] == [
        {"key": "example.com/dedicated", "operator": "Equal", "value": "gpu"},
        {
            "key": "node.kubernetes.io/unreachable",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 60,
        },
    ]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["imagePullSecrets"] == [{"name": "nexus-pull"}]
    container = _container(mocks)
    assert container["imagePullPolicy"] == "Never"
    assert container["resources"] == {
        "requests": {"cpu": "50m"},
        "limits": {"cpu": "1", "memory": "256Mi"},
    }


def test_secrets_never_in_config_map(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    config_map = mocks.one("kubernetes:core/v1:ConfigMap", "files")["data"]
    secret = mocks.one("kubernetes:core/v1:Secret", "files")["stringData"]
    not_secret = {
        key: inputs
        for key, inputs in mocks.resources.items()
        if key[0] != "kubernetes:core/v1:Secret"
    }
    text = json.dumps(list(not_secret.values()))
    for needle in (PASSWORD, "MIIEclientKeySecretBytes", "cm9ib3Q6"):
        assert needle not in text, needle
    # The Authorization header and the private key travel in the Secret only.
    assert "Authorization" in secret["quay.io__hosts.toml"]
    assert CLIENT_KEY in secret.values()
    assert "quay.io__hosts.toml" not in config_map
    # Public files stay readable in the ConfigMap.
    assert config_map["ghcr.io__mirror-0-ca.pem"] == CA_PEM
    assert config_map["docker.io__hosts.toml"].startswith("# Managed by nexus-mirror.")
    assert not set(config_map) & set(secret)


def test_secret_data_is_a_pulumi_secret(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    raw = mocks.raw_inputs[("kubernetes:core/v1:Secret", "files")]["stringData"]
    assert raw[SECRET_SIG]
    config_map = mocks.raw_inputs[("kubernetes:core/v1:ConfigMap", "files")]["data"]
    assert SECRET_SIG not in config_map


def test_private_files_keep_mode_0600(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    listing = mocks.one("kubernetes:core/v1:ConfigMap", "files")["data"]["files.list"]
    modes = {
        f"{row.split(chr(9))[0]}/{row.split(chr(9))[1]}": row.split(chr(9))[2]
        for row in listing.splitlines()
    }
    assert modes["quay.io/hosts.toml"] == "0600"
    assert modes["docker.io/hosts.toml"] == "0644"
    assert modes["ghcr.io/mirror-0-ca.pem"] == "0644"
    assert "0600" in {
        mode for name, mode in modes.items() if name.startswith("registry.internal:5000/")
    }


def test_secret_registries_key_moves_every_file(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path, secret_keys=("registries",))
    config_map = mocks.one("kubernetes:core/v1:ConfigMap", "files")["data"]
    assert set(config_map) == {"settings.sh"}
    secret = mocks.one("kubernetes:core/v1:Secret", "files")["stringData"]
    assert {"hosts.tail", "files.list", "docker.io__hosts.toml", "ghcr.io__mirror-0-ca.pem"} <= set(
        secret
    )


def test_change_of_files_rolls_daemon_set(tmp_path: Path) -> None:
    first, _ = _run(tmp_path)
    other_ca = CA_PEM.replace("mirrorCA", "otherCA")
    registries = _base_config()["registries"]
    registries["ghcr.io"] = {
        "mirrors": [{"url": "https://ghcr-mirror.internal", "caPem": other_ca}]
    }
    second, _ = _run(tmp_path, registries=registries)
    annotations = [
        _daemon_set(m)["spec"]["template"]["metadata"]["annotations"] for m in (first, second)
    ]
    assert annotations[0][FILES_ANNOTATION] != annotations[1][FILES_ANNOTATION]
    assert annotations[0][SECRET_ANNOTATION] == annotations[1][SECRET_ANNOTATION]


def test_change_of_secret_rolls_daemon_set() -> None:
    first = build_bundle(_mirror_config())
    values = {**_base_config(), **SECRETS, "quayPassword": "another-password"}
    second = build_bundle(parse_config(values, frozenset(SECRETS)))
    assert first.files_sha256 == second.files_sha256
    assert first.secret_scrypt != second.secret_scrypt
    assert len(first.secret_scrypt) == 64


def test_hosts_toml_bytes_match_ssh_delivery() -> None:
    kubernetes_config = _mirror_config()
    bundle = build_bundle(kubernetes_config)
    ssh_values = {
        **{k: v for k, v in _base_config().items() if k not in ("delivery", "kubernetes")},
        **SECRETS,
        "nodes": [{"host": "10.0.0.11"}],
    }
    ssh_config = parse_config(ssh_values, frozenset(SECRETS))
    ssh_files = hosts_input(ssh_config.nodes[0], ssh_config).files
    data = {**bundle.config_data, **bundle.secret_data}
    for item in bundle.files:
        assert data[item.key] == ssh_files[f"{item.namespace}/{item.name}"], item.key
    for namespace in kubernetes_config.namespaces:
        for name, content in render_files(namespace).items():
            assert data[f"{namespace.name.replace(':', '_')}__{name}"] == content


def test_hosts_tail_reads_mounted_files(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    config_map = mocks.one("kubernetes:core/v1:ConfigMap", "files")["data"]
    secret = mocks.one("kubernetes:core/v1:Secret", "files")["stringData"]
    tail = secret["hosts.tail"]
    assert 'nm_file docker.io hosts.toml 0644 <"$NM_K8S_FILES"/docker.io__hosts.toml' in tail
    assert "nm_main" not in tail
    assert "nm_probe docker.io https://nexus.example.net:8082" in tail
    # The probes of quay.io carry its Authorization header, so the tail is in the Secret.
    assert "nm_probe_auth" in tail
    assert "hosts.tail" not in config_map
    scripts = mocks.one("kubernetes:core/v1:ConfigMap", "scripts")["data"]
    assert set(scripts) == {"nexus-mirror-node.sh", "kubernetes-sync.sh"}


def test_manifests_validate_against_openapi(tmp_path: Path) -> None:
    mocks, _ = _run(
        tmp_path, kubernetes={"image": IMAGE, "manageConfigFile": True, "maxSurge": "25%"}
    )
    assert mocks.resources
    for key, inputs in mocks.resources.items():
        for version in KUBERNETES_VERSIONS:
            checked = kubernetes_validate.validate(inputs, version, strict=True)
            assert checked, (key, version)


def test_all_manifests_match_declared(tmp_path: Path) -> None:
    mocks, _ = _run(tmp_path)
    config = _mirror_config()
    manifests = all_manifests(config, build_bundle(config))
    declared = sorted(
        (inputs["kind"], inputs["metadata"]["name"]) for inputs in mocks.resources.values()
    )
    assert sorted((m["kind"], m["metadata"]["name"]) for m in manifests) == declared
    daemon_set = next(m for m in manifests if m["kind"] == "DaemonSet")
    assert json.loads(json.dumps(daemon_set)) == _daemon_set(mocks)


@pytest.mark.parametrize(
    ("status", "matched"),
    [
        ({"containerStatuses": [{"name": "pull", "imageID": "docker.io/x@sha256:1"}]}, True),
        (
            {
                "containerStatuses": [
                    {
                        "name": "pull",
                        "imageID": "",
                        "state": {"waiting": {"reason": "ErrImagePull"}},
                    }
                ]
            },
            True,
        ),
        (
            {
                "containerStatuses": [
                    {
                        "name": "pull",
                        "imageID": "",
                        "state": {"waiting": {"reason": "ImagePullBackOff"}},
                    }
                ]
            },
            True,
        ),
        (
            {
                "containerStatuses": [
                    {
                        "name": "pull",
                        "imageID": "",
                        "state": {"waiting": {"reason": "ContainerCreating"}},
                    }
                ]
            },
            False,
        ),
        ({"phase": "Pending"}, False),
    ],
)
def test_wait_for_matches_pull_outcomes(status: dict[str, Any], matched: bool) -> None:
    # pulumi-kubernetes splits a value off at the first '=' that is not part of '=='.
    expression = WAIT_FOR_PULL.removeprefix("jsonpath=")
    assert "=" not in expression.replace("==", "")
    assert expression.count("{") == 1
    assert expression.endswith("}")
    query = "$" + expression[1:-1]
    found = jsonpath_rfc9535.find(query, {"status": status})
    assert bool(found) is matched


def test_outputs_counts_and_names(tmp_path: Path) -> None:
    _, run = _run(tmp_path)
    summary = _resolve(run.namespace["mirror"].kubernetes)
    assert summary == {
        "namespace": "nexus-mirror",
        "daemonSet": "nexus-mirror",
        "configMap": "nexus-mirror-files",
        "secret": "nexus-mirror-files",
        "scriptsConfigMap": "nexus-mirror-scripts",
        "desiredNodes": 3,
        "readyNodes": 2,
        "updatedNodes": 3,
        "availableNodes": 2,
    }
    assert set(run.outputs["hostsToml"]) == {
        "docker.io",
        "ghcr.io",
        "quay.io",
        "registry.internal:5000",
    }


def test_verification_per_sampled_node(tmp_path: Path) -> None:
    mocks, run = _run(tmp_path)
    assert set(run.outputs["nodes"]) == set(SAMPLE_NODES)
    result = run.outputs["nodes"]["worker-2"]["verification"]
    assert result["pulled"] is True
    assert result["ok"] is True
    assert result["image"] == VERIFY_IMAGE
    assert result["imageID"].startswith("docker.io/library/busybox@sha256:")
    # docker.io may fall back to the upstream, so the pull does not prove the mirror.
    assert result["throughMirror"] is None
    pod = mocks.one("kubernetes:core/v1:Pod", "verify-0")
    container = pod["spec"]["containers"][0]
    assert container["image"] == VERIFY_IMAGE
    assert container["imagePullPolicy"] == "Always"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["metadata"]["annotations"]["pulumi.com/waitFor"] == WAIT_FOR_PULL
    anti = pod["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    files_hash = _daemon_set(mocks)["spec"]["template"]["metadata"]["annotations"][FILES_ANNOTATION]
    assert container["env"] == [{"name": "NEXUS_MIRROR_FILES_SHA256", "value": files_hash}]
    assert mocks.providers[("kubernetes:core/v1:Pod", "verify-0")] == ""


def test_verification_on_named_nodes(tmp_path: Path) -> None:
    settings = {
        "image": IMAGE,
        "verify": {"nodes": ["control-1", "worker-9"], "timeoutSeconds": 120},
    }
    registries = {
        **_base_config()["registries"],
        "docker.io": {"nexus": {"port": 8082}, "fallback": False},
    }
    mocks, run = _run(tmp_path, kubernetes=settings, registries=registries)
    pods = mocks.of_type("kubernetes:core/v1:Pod")
    assert set(pods) == {"verify-control-1", "verify-worker-9"}
    spec = pods["verify-control-1"]["spec"]
    assert spec["nodeName"] == "control-1"
    assert "affinity" not in spec
    assert spec["activeDeadlineSeconds"] == 120
    assert pods["verify-control-1"]["metadata"]["annotations"]["pulumi.com/timeoutSeconds"] == "120"
    # With fallback false, containerd has no upstream to fall back to.
    assert run.outputs["nodes"]["control-1"]["verification"]["throughMirror"] is True


def test_failed_pull_reported(tmp_path: Path) -> None:
    _, run = _run(tmp_path, mocks=KubernetesMocks(pull_reason="ErrImagePull"))
    result = run.outputs["nodes"]["worker-1"]["verification"]
    assert result["pulled"] is False
    assert result["ok"] is False
    assert result["pullFailed"] is True
    assert result["throughMirror"] is False
    assert result["error"] == "ErrImagePull: failed to resolve reference"


def test_no_verification_without_image(tmp_path: Path) -> None:
    config = _base_config()
    del config["verify"]
    mocks = KubernetesMocks()
    stack, secret_names = stack_config(_write_stack(tmp_path, config), None, SECRETS)
    run = run_program(mocks, stack, secret_names)
    assert not mocks.of_type("kubernetes:core/v1:Pod")
    assert run.outputs["nodes"] == {}


def test_provider_from_context(tmp_path: Path) -> None:
    settings = {"image": IMAGE, "context": "prod-admin", "kubeconfig": "/home/ops/.kube/prod"}
    mocks, _ = _run(tmp_path, kubernetes=settings)
    provider = mocks.one("pulumi:providers:kubernetes", "kubernetes")
    assert provider["context"] == "prod-admin"
    assert provider["kubeconfig"] == "/home/ops/.kube/prod"
    assert "::kubernetes::" in mocks.providers[("kubernetes:apps/v1:DaemonSet", "daemon-set")]


def test_ssh_keys_rejected(tmp_path: Path) -> None:
    mocks = KubernetesMocks()
    config = _base_config(nodes=[{"host": "10.0.0.11"}])
    stack, secret_names = stack_config(_write_stack(tmp_path, config), None, SECRETS)
    with pytest.raises(
        Exception, match=r"nexus-mirror:nodes: is used only with nexus-mirror:delivery ssh"
    ):
        run_program(mocks, stack, secret_names)
    assert mocks.resources == {}
