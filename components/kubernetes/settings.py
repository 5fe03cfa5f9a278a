"""Validation of ``nexus-mirror:delivery`` and the ``nexus-mirror:kubernetes`` block.

``parse_config`` calls these with the same ``Problems`` collector as every
other key, so a Kubernetes stack reports all its problems at once, before
any resource is declared.
"""

from __future__ import annotations

from typing import Any

from ..model import Containerd, Kubernetes, KubernetesVerify, ResourceQuantities, Toleration
from ..validation import (
    Problems,
    check_bool,
    check_int,
    check_keys,
    check_text,
    key_path,
    key_path_child,
    key_text,
)
from .values import (
    RESOURCE_NAMES,
    check_int_or_percent,
    check_label_key,
    check_label_value,
    check_object_name,
    check_quantity,
    check_toleration,
    is_zero,
    quantity_value,
)

DELIVERIES = ("ssh", "kubernetes")
KUBERNETES_KEYS = [
    "namespace",
    "context",
    "kubeconfig",
    "nodeSelector",
    "tolerations",
    "image",
    "imagePullPolicy",
    "imagePullSecrets",
    "resources",
    "priorityClassName",
    "maxSurge",
    "maxUnavailable",
    "manageConfigFile",
    "verify",
]
PULL_POLICIES = ("IfNotPresent", "Always", "Never")
# Keys that only SSH delivery reads.
SSH_ONLY_KEYS = ("nodes", "ssh", "sshPrivateKey", "sshPrivateKeyPassword", "rollout")
# Directories of the sync pod itself: a host directory mounted on one of them
# would hide the pod's own files, and one below a read-only or kernel file
# system cannot be mounted. Below /tmp (an emptyDir) is fine.
POD_DIRECTORIES = ("/nexus-mirror", "/proc", "/sys", "/dev")
POD_SCRATCH = "/tmp"
IMAGE_EXAMPLE = "nexus.example.net:8082/library/busybox:1.37"
# A verification pod is named nexus-mirror-verify-NODE, and names have at most 253 characters.
MAX_VERIFY_NODE_NAME = 253 - len("nexus-mirror-verify-")


def check_delivery(problems: Problems, value: Any) -> str:
    """Return ``ssh`` (the default) or ``kubernetes``."""
    if value is None:
        return "ssh"
    if value in DELIVERIES:
        return str(value)
    problems.error(
        key_path("delivery"),
        value,
        "unknown delivery",
        "Use ssh (nodes listed in nexus-mirror:nodes) or kubernetes (a DaemonSet on every node).",
    )
    return "ssh"


def reject_ssh_keys(
    problems: Problems, values: dict[str, Any], secret_keys: frozenset[str]
) -> None:
    """Report every SSH-only key of a Kubernetes stack, so that none is silently ignored."""
    for name in SSH_ONLY_KEYS:
        if name not in values:
            continue
        secret_note = "(value not shown: it is a secret)" if name in secret_keys else ""
        problems.errors.append(
            f"{key_path(name)}: is used only with nexus-mirror:delivery ssh, and this stack "
            f"sets delivery kubernetes {secret_note}".rstrip()
            + f". Remove it (pulumi config rm {key_path(name)}) or set nexus-mirror:delivery ssh."
        )


def check_kubernetes(
    problems: Problems, value: Any, containerd: Containerd, containerd_raw: Any
) -> Kubernetes | None:
    """Validate the ``nexus-mirror:kubernetes`` block of a Kubernetes stack."""
    key = key_path("kubernetes")
    if value is None:
        problems.error(
            key,
            value,
            "is required with delivery kubernetes: it names at least the image of the sync pods",
            f"Set it, such as: pulumi config set --path nexus-mirror:kubernetes.image {IMAGE_EXAMPLE}",
        )
        return None
    if not isinstance(value, dict):
        problems.error(key, value, "must be an object", f"Such as {{image: {IMAGE_EXAMPLE}}}.")
        return None
    check_keys(problems, key, value, KUBERNETES_KEYS)
    _check_containerd_for_pods(problems, containerd, containerd_raw)
    count = len(problems.errors)

    image = _check_image(problems, key_path_child(key, "image"), value.get("image"))
    namespace = check_object_name(
        problems,
        key_path_child(key, "namespace"),
        value.get("namespace", "nexus-mirror"),
        "namespace name",
        label=True,
    )
    context = None
    if "context" in value:
        context = check_text(
            problems, key_path_child(key, "context"), value["context"], "context name"
        )
    kubeconfig = None
    if "kubeconfig" in value:
        kubeconfig = check_text(
            problems, key_path_child(key, "kubeconfig"), value["kubeconfig"], "kubeconfig file path"
        )
    selector = _check_node_selector(problems, key_path_child(key, "nodeSelector"), value)
    tolerations = _check_tolerations(problems, key_path_child(key, "tolerations"), value)
    policy = value.get("imagePullPolicy", "IfNotPresent")
    if policy not in PULL_POLICIES:
        problems.error(
            key_path_child(key, "imagePullPolicy"),
            policy,
            "invalid image pull policy",
            f"Use one of {', '.join(PULL_POLICIES)}.",
        )
    pull_secrets = _check_name_list(
        problems,
        key_path_child(key, "imagePullSecrets"),
        value.get("imagePullSecrets", []),
        "Secret name",
        "nexus-pull",
    )
    resources = _check_resources(problems, key_path_child(key, "resources"), value.get("resources"))
    priority = None
    if "priorityClassName" in value:
        priority = check_object_name(
            problems,
            key_path_child(key, "priorityClassName"),
            value["priorityClassName"],
            "PriorityClass name",
        )
    surge, unavailable = _check_rollout(problems, key, value)
    manage = False
    if "manageConfigFile" in value:
        manage = bool(
            check_bool(problems, key_path_child(key, "manageConfigFile"), value["manageConfigFile"])
        )
    if manage:
        problems.warn(
            key_path_child(key, "manageConfigFile"),
            "runs a privileged pod in the host's PID namespace on every node, which edits "
            "config.toml and restarts containerd when config_path is not set yet.",
        )
    verify = _check_verify(problems, key_path_child(key, "verify"), value.get("verify"))

    if len(problems.errors) > count or image is None or namespace is None:
        return None
    return Kubernetes(
        image=image,
        namespace=namespace,
        context=context,
        kubeconfig=kubeconfig,
        node_selector=selector,
        tolerations=tolerations,
        image_pull_policy=str(policy),
        image_pull_secrets=pull_secrets,
        resources=resources,
        priority_class_name=priority,
        max_surge=surge,
        max_unavailable=unavailable,
        manage_config_file=manage,
        verify=verify,
    )


def _check_containerd_for_pods(problems: Problems, containerd: Containerd, raw: Any) -> None:
    key = key_path("containerd")
    if isinstance(raw, dict) and "manageConfigFile" in raw:
        problems.error(
            key_path_child(key, "manageConfigFile"),
            raw["manageConfigFile"],
            "is read by SSH delivery only",
            "With delivery kubernetes, set nexus-mirror:kubernetes.manageConfigFile instead.",
        )
    for name, path in (("configPath", containerd.config_path), ("stateDir", containerd.state_dir)):
        for directory in (*POD_DIRECTORIES, POD_SCRATCH):
            below = path.startswith(directory + "/") and directory != POD_SCRATCH
            if path == directory or below:
                problems.error(
                    key_path_child(key, name),
                    path,
                    f"the sync pods mount this host directory at the same path, and {directory} "
                    "is a directory of the pod itself",
                    "Use a directory such as /etc/containerd/certs.d or /var/lib/nexus-mirror.",
                )


def _check_image(problems: Problems, key: str, value: Any) -> str | None:
    # Imported here because components.config imports this module.
    from ..config import normalize_image

    if value is None:
        problems.error(
            key,
            value,
            "no image is set for the sync pods, and there is no default because the nodes "
            "may have no route to a public registry",
            f"Use an image with a POSIX shell (busybox, alpine) that every node can pull, such as "
            f"{IMAGE_EXAMPLE}, or one loaded on the nodes with imagePullPolicy Never.",
        )
        return None
    if not isinstance(value, str) or normalize_image(value) is None:
        problems.error(
            key,
            value,
            "invalid image reference",
            f"Use a reference such as {IMAGE_EXAMPLE}.",
        )
        return None
    return value


def _check_node_selector(
    problems: Problems, key: str, block: dict[str, Any]
) -> tuple[tuple[str, str], ...]:
    default: tuple[tuple[str, str], ...] = (("kubernetes.io/os", "linux"),)
    if "nodeSelector" not in block:
        return default
    value = block["nodeSelector"]
    if not isinstance(value, dict):
        problems.error(
            key, value, "must map label keys to values", "Such as {kubernetes.io/os: linux}."
        )
        return default
    pairs = []
    for name, label in value.items():
        item_key = key_path_child(key, key_text(name))
        checked_name = check_label_key(problems, item_key, name)
        checked_value = check_label_value(problems, item_key, label)
        if checked_name is not None and checked_value is not None:
            pairs.append((checked_name, checked_value))
    return tuple(pairs)


def _check_tolerations(
    problems: Problems, key: str, block: dict[str, Any]
) -> tuple[Toleration, ...]:
    if "tolerations" not in block:
        return (Toleration(),)
    value = block["tolerations"]
    if not isinstance(value, list):
        problems.error(
            key,
            value,
            "must be a list of tolerations",
            "Such as [{operator: Exists}] (every taint), or [] for none.",
        )
        return ()
    checked = [
        check_toleration(problems, key_path_child(key, index), item)
        for index, item in enumerate(value)
    ]
    return tuple(item for item in checked if item is not None)


def _check_name_list(
    problems: Problems, key: str, value: Any, kind: str, example: str
) -> tuple[str, ...]:
    if not isinstance(value, list):
        problems.error(key, value, f"must be a list of {kind}s", f"Such as [{example}].")
        return ()
    names = [
        check_object_name(problems, key_path_child(key, index), item, kind)
        for index, item in enumerate(value)
    ]
    return tuple(name for name in names if name is not None)


def _check_resources(problems: Problems, key: str, value: Any) -> ResourceQuantities:
    default = ResourceQuantities()
    if value is None:
        return default
    if not isinstance(value, dict):
        problems.error(
            key,
            value,
            "must be an object",
            "Such as {requests: {cpu: 10m, memory: 32Mi}, limits: {memory: 128Mi}}.",
        )
        return default
    check_keys(problems, key, value, ["requests", "limits"])
    groups: dict[str, tuple[tuple[str, str], ...]] = {}
    for group in ("requests", "limits"):
        if group not in value:
            groups[group] = getattr(default, group)
            continue
        group_key = key_path_child(key, group)
        raw = value[group]
        if not isinstance(raw, dict):
            problems.error(
                group_key,
                raw,
                "must map resource names to quantities",
                "Such as {cpu: 10m, memory: 32Mi}.",
            )
            groups[group] = ()
            continue
        check_keys(problems, group_key, raw, list(RESOURCE_NAMES))
        pairs = []
        for name in RESOURCE_NAMES:
            if name in raw:
                quantity = check_quantity(problems, key_path_child(group_key, name), raw[name])
                if quantity is not None:
                    pairs.append((name, quantity))
        groups[group] = tuple(pairs)
    limits = dict(groups["limits"])
    for name, request in groups["requests"]:
        if name in limits and quantity_value(request) > quantity_value(limits[name]):  # type: ignore[operator]
            problems.error(
                key_path_child(key_path_child(key, "requests"), name),
                request,
                f"is above the limit {limits[name]}",
                "Lower the request or raise the limit: Kubernetes rejects a request above its limit.",
            )
    return ResourceQuantities(requests=groups["requests"], limits=groups["limits"])


def _check_rollout(
    problems: Problems, key: str, block: dict[str, Any]
) -> tuple[int | str, int | str]:
    surge = check_int_or_percent(
        problems, key_path_child(key, "maxSurge"), block.get("maxSurge", 1)
    )
    unavailable = check_int_or_percent(
        problems, key_path_child(key, "maxUnavailable"), block.get("maxUnavailable", 0)
    )
    if surge is None or unavailable is None:
        return 1, 0
    if is_zero(surge) and is_zero(unavailable):
        problems.error(
            key_path_child(key, "maxSurge"),
            surge,
            "maxSurge and maxUnavailable are both 0, so the rollout could never replace a pod",
            "Set maxSurge to 1 (the default).",
        )
    elif not is_zero(unavailable):
        problems.warn(
            key_path_child(key, "maxUnavailable"),
            f"is {unavailable}: the rollout may stop a node's old sync pod before its new one runs, "
            "and the old pod removes the node's mirror files when it stops, so pulls on that node "
            "bypass the mirrors until the new pod has synced. maxUnavailable 0 with maxSurge 1 avoids this.",
        )
    return surge, unavailable


def _check_verify(problems: Problems, key: str, value: Any) -> KubernetesVerify:
    default = KubernetesVerify()
    if value is None:
        return default
    if not isinstance(value, dict):
        problems.error(
            key, value, "must be an object", "Such as {sample: 3} or {nodes: [worker-1]}."
        )
        return default
    check_keys(problems, key, value, ["nodes", "sample", "timeoutSeconds"])
    nodes: tuple[str, ...] = ()
    if "nodes" in value:
        if "sample" in value:
            problems.error(
                key_path_child(key, "sample"),
                value["sample"],
                "is set together with nodes",
                "Name the nodes, or set a sample size, not both.",
            )
        nodes = _check_name_list(
            problems, key_path_child(key, "nodes"), value["nodes"], "node name", "worker-1"
        )
        if not nodes and isinstance(value["nodes"], list) and not value["nodes"]:
            problems.error(
                key_path_child(key, "nodes"), value["nodes"], "is empty", "Name at least one node."
            )
        for index, node in enumerate(nodes):
            if len(node) > MAX_VERIFY_NODE_NAME:
                problems.error(
                    key_path_child(key_path_child(key, "nodes"), index),
                    node,
                    f"is longer than {MAX_VERIFY_NODE_NAME} characters, too long for the name "
                    "of its verification pod",
                    "Use verify.sample for this node, or verify another node.",
                )
        if len(set(nodes)) != len(nodes):
            problems.error(
                key_path_child(key, "nodes"),
                list(nodes),
                "names a node twice",
                "List each node once.",
            )
    sample = check_int(
        problems,
        key_path_child(key, "sample"),
        value.get("sample", default.sample),
        1,
        100,
        "count",
    )
    timeout = check_int(
        problems,
        key_path_child(key, "timeoutSeconds"),
        value.get("timeoutSeconds", default.timeout),
        30,
        3600,
        "number of seconds",
    )
    return KubernetesVerify(
        nodes=nodes, sample=sample or default.sample, timeout=timeout or default.timeout
    )
