"""The Kubernetes objects of Kubernetes delivery, as plain manifests.

``component`` declares each manifest with pulumi-kubernetes unchanged, and
the tests validate the same dicts against the Kubernetes OpenAPI schemas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..model import Kubernetes, MirrorConfig, Toleration
from .bundle import FILES_DIR, SCRIPTS_DIR, SYNC_SCRIPT_NAME, Bundle

APP = "nexus-mirror"
FILES_ANNOTATION = "nexus-mirror/files-sha256"
SECRET_ANNOTATION = "nexus-mirror/secret-scrypt"
# Seconds between two checks of the node's files by the sync pod.
CHECK_INTERVAL = 30
# The preStop hook waits for a sync in progress, whose mirror probes may take
# 10 s each, before it removes the files.
TERMINATION_GRACE_SECONDS = 120


@dataclass(frozen=True)
class ObjectNames:
    """Names of the objects in the namespace."""

    daemon_set: str = APP
    files: str = f"{APP}-files"
    """Name of both the ConfigMap and the Secret with the rendered files."""
    scripts: str = f"{APP}-scripts"


NAMES = ObjectNames()


def labels(component: str) -> dict[str, str]:
    """Return the recommended app.kubernetes.io labels of one part."""
    return {
        "app.kubernetes.io/name": APP,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": APP,
        "app.kubernetes.io/managed-by": "pulumi",
    }


def selector_labels() -> dict[str, str]:
    """Return the DaemonSet's selector labels, which are immutable once created."""
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": "sync"}


def object_metadata(settings: Kubernetes, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": settings.namespace, "labels": labels(component)}


def namespace_manifest(settings: Kubernetes) -> dict[str, Any]:
    """Return the namespace, labelled so that Pod Security admits the hostPath pods.

    The baseline and restricted Pod Security levels reject hostPath volumes,
    so the namespace enforces the privileged level.
    """
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": settings.namespace,
            "labels": {
                "pod-security.kubernetes.io/enforce": "privileged",
                "app.kubernetes.io/part-of": APP,
            },
        },
    }


def config_map_manifest(
    settings: Kubernetes, name: str, component: str, data: dict[str, str]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_metadata(settings, name, component),
        "data": data,
    }


def secret_manifest(settings: Kubernetes, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": object_metadata(settings, NAMES.files, "files"),
        "type": "Opaque",
        "stringData": data,
    }


def tolerations(items: tuple[Toleration, ...]) -> list[dict[str, Any]]:
    result = []
    for item in items:
        toleration: dict[str, Any] = {"operator": item.operator}
        if item.key:
            toleration["key"] = item.key
        if item.value:
            toleration["value"] = item.value
        if item.effect:
            toleration["effect"] = item.effect
        if item.toleration_seconds is not None:
            toleration["tolerationSeconds"] = item.toleration_seconds
        result.append(toleration)
    return result


def _resources(settings: Kubernetes) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if settings.resources.requests:
        resources["requests"] = dict(settings.resources.requests)
    if settings.resources.limits:
        resources["limits"] = dict(settings.resources.limits)
    return resources


def _script_command(mode: str) -> list[str]:
    return ["sh", f"{SCRIPTS_DIR}/{SYNC_SCRIPT_NAME}", mode]


def _sync_env() -> list[dict[str, Any]]:
    return [
        {"name": "NM_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "NM_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "NM_K8S_FILES", "value": FILES_DIR},
        {"name": "NM_K8S_RUN_DIR", "value": "/tmp"},
        {"name": "NM_K8S_INTERVAL", "value": str(CHECK_INTERVAL)},
        {"name": "TMPDIR", "value": "/tmp"},
    ]


def _pod_mounts() -> list[dict[str, Any]]:
    return [
        {"name": "files", "mountPath": FILES_DIR, "readOnly": True},
        {"name": "scripts", "mountPath": SCRIPTS_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]


def _sync_container(config: MirrorConfig, settings: Kubernetes) -> dict[str, Any]:
    containerd = config.containerd
    return {
        "name": "sync",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": _script_command("run"),
        "env": _sync_env(),
        # No liveness probe: kubelet runs the preStop hook before a liveness
        # restart too, and that hook removes the node's files.
        "readinessProbe": {
            "exec": {"command": _script_command("check")},
            "periodSeconds": 10,
            "timeoutSeconds": 10,
            "successThreshold": 1,
            "failureThreshold": 1,
        },
        "lifecycle": {"preStop": {"exec": {"command": _script_command("stop")}}},
        "resources": _resources(settings),
        "securityContext": {
            # Root writes the root-owned host directories; the capabilities
            # are what the node script needs to write, chmod and chown there.
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "host-config-path", "mountPath": containerd.config_path},
            {"name": "host-state", "mountPath": containerd.state_dir},
            *_pod_mounts(),
        ],
    }


def _config_container(settings: Kubernetes) -> dict[str, Any]:
    return {
        "name": "containerd-config",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": _script_command("config"),
        "env": [env for env in _sync_env() if env["name"] != "NM_POD_UID"],
        "resources": _resources(settings),
        # nsenter into the host's namespaces needs a privileged container.
        "securityContext": {"privileged": True, "runAsUser": 0, "runAsNonRoot": False},
        "volumeMounts": _pod_mounts(),
    }


def _volumes(config: MirrorConfig) -> list[dict[str, Any]]:
    containerd = config.containerd
    return [
        {
            "name": "host-config-path",
            "hostPath": {"path": containerd.config_path, "type": "DirectoryOrCreate"},
        },
        {
            "name": "host-state",
            "hostPath": {"path": containerd.state_dir, "type": "DirectoryOrCreate"},
        },
        {
            "name": "files",
            "projected": {
                "defaultMode": 0o400,
                "sources": [
                    {"configMap": {"name": NAMES.files}},
                    {"secret": {"name": NAMES.files}},
                ],
            },
        },
        {"name": "scripts", "configMap": {"name": NAMES.scripts, "defaultMode": 0o555}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]


def daemon_set_manifest(config: MirrorConfig, bundle: Bundle) -> dict[str, Any]:
    """Return the DaemonSet that runs one sync pod on every selected node."""
    settings = kubernetes_settings(config)
    annotations = {FILES_ANNOTATION: bundle.files_sha256}
    if bundle.secret_scrypt:
        annotations[SECRET_ANNOTATION] = bundle.secret_scrypt
    pod_spec: dict[str, Any] = {
        "nodeSelector": dict(settings.node_selector),
        "tolerations": tolerations(settings.tolerations),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": [_sync_container(config, settings)],
        "volumes": _volumes(config),
    }
    if settings.manage_config_file:
        # The init container enters the host's PID 1 namespaces to run config mode.
        pod_spec["hostPID"] = True
        pod_spec["initContainers"] = [_config_container(settings)]
    if settings.priority_class_name:
        pod_spec["priorityClassName"] = settings.priority_class_name
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    metadata = object_metadata(settings, NAMES.daemon_set, "sync")
    # Foreground deletion (also pulumi-kubernetes' default) keeps the DaemonSet
    # until its pods are gone, so pulumi destroy waits for their preStop hooks.
    metadata["annotations"] = {"pulumi.com/deletionPropagationPolicy": "foreground"}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": selector_labels()},
            "updateStrategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {
                    "maxSurge": settings.max_surge,
                    "maxUnavailable": settings.max_unavailable,
                },
            },
            "revisionHistoryLimit": 5,
            "template": {
                "metadata": {"labels": labels("sync"), "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def kubernetes_settings(config: MirrorConfig) -> Kubernetes:
    """Return the ``nexus-mirror:kubernetes`` settings of a Kubernetes stack."""
    if config.kubernetes is None:
        raise ValueError("the stack does not set delivery kubernetes")
    return config.kubernetes
