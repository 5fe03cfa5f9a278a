"""The verification pods: one per verified node, pulling ``verify.image`` through kubelet."""

from __future__ import annotations

from typing import Any

from ..model import MirrorConfig
from .bundle import Bundle
from .manifests import APP, kubernetes_settings, labels, object_metadata, tolerations

# Pulumi waits until the verification pod's container has pulled its image
# (imageID set) or kubelet gave up pulling it. pulumi-kubernetes reads RFC 9535
# JSONPath here from version 4.24 on. The expression has no single '=',
# because the annotation's syntax splits a value off at '='.
PULL_FAILURES = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
)
WAIT_FOR_PULL = (
    "jsonpath={.status.containerStatuses[?length(@.imageID) > 0"
    + "".join(f" || @.state.waiting.reason == '{reason}'" for reason in PULL_FAILURES)
    + "].name}"
)


def verify_pod_manifests(config: MirrorConfig, bundle: Bundle) -> list[dict[str, Any]]:
    """Return one pod per verified node that pulls ``verify.image`` by its upstream name.

    With ``verify.nodes`` each pod is bound to its node. Otherwise the
    scheduler places ``verify.sample`` pods, on distinct nodes where it can.
    The files hash in the environment replaces the pods, and so repeats the
    pull, whenever the files change.
    """
    settings = kubernetes_settings(config)
    if config.verify_image is None:
        return []
    targets: list[tuple[str, str | None]]
    if settings.verify.nodes:
        targets = [(f"{APP}-verify-{node}", node) for node in settings.verify.nodes]
    else:
        targets = [(f"{APP}-verify-{index}", None) for index in range(settings.verify.sample)]
    manifests = []
    for name, node in targets:
        spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": settings.verify.timeout,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 1,
            "tolerations": tolerations(settings.tolerations),
            "containers": [
                {
                    "name": "pull",
                    "image": config.verify_image,
                    # Always makes kubelet resolve the tag through containerd,
                    # and so through the mirror, even when the image is cached.
                    "imagePullPolicy": "Always",
                    "env": [{"name": "NEXUS_MIRROR_FILES_SHA256", "value": bundle.files_sha256}],
                    "resources": {
                        "requests": {"cpu": "10m", "memory": "16Mi"},
                        "limits": {"memory": "64Mi"},
                    },
                    "securityContext": {
                        "runAsUser": 65534,
                        "runAsNonRoot": True,
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                }
            ],
        }
        if node is not None:
            spec["nodeName"] = node
        else:
            spec["nodeSelector"] = dict(settings.node_selector)
            spec["affinity"] = {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "podAffinityTerm": {
                                "labelSelector": {"matchLabels": labels("verify")},
                                "topologyKey": "kubernetes.io/hostname",
                            },
                        }
                    ]
                }
            }
        metadata = object_metadata(settings, name, "verify")
        metadata["annotations"] = {
            "pulumi.com/waitFor": WAIT_FOR_PULL,
            "pulumi.com/timeoutSeconds": str(settings.verify.timeout),
        }
        manifests.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
    return manifests
