"""Stack outputs of Kubernetes delivery, read from the objects' live state.

pulumi-kubernetes returns each object as the API server last showed it. The
DaemonSet's status gives the node counts. Each verification pod's status
shows whether kubelet pulled ``verify.image`` through containerd, when an
image ID is set, or gave up, with a waiting reason such as ErrImagePull.

kubelet does not report which host served a pull. A pull that succeeded went
through a mirror for sure only when the registry has ``fallback: false``:
otherwise containerd may have fallen back to the upstream, and
``throughMirror`` is null (unknown).
"""

from __future__ import annotations

import re
from typing import Any

from ..config import normalize_image
from ..model import MirrorConfig
from .verify_pods import PULL_FAILURES


def field(value: Any, name: str) -> Any:
    """Return field ``name`` (camelCase) of an output object, a snake_case dict or a camelCase dict."""
    if value is None:
        return None
    snake = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()
    # Output types subclass dict but read their fields through snake_case properties.
    if type(value) is dict:
        return value[name] if name in value else value.get(snake)
    return getattr(value, snake, None)


def node_counts(status: Any) -> dict[str, int | None]:
    """Return the node counts of a DaemonSet status (None before the first status)."""
    return {
        "desiredNodes": field(status, "desiredNumberScheduled"),
        "readyNodes": field(status, "numberReady"),
        "updatedNodes": field(status, "updatedNumberScheduled"),
        "availableNodes": field(status, "numberAvailable"),
    }


def _fallback_forbidden(config: MirrorConfig, image: str) -> bool:
    normalized = normalize_image(image)
    if normalized is None:
        return False
    by_name = {namespace.name: namespace for namespace in config.namespaces}
    namespace = by_name.get(normalized[1]) or by_name.get("_default")
    return namespace is not None and not namespace.fallback


def pull_result(config: MirrorConfig, pod_name: str, spec: Any, status: Any) -> dict[str, Any]:
    """Return the verification entry of one pod: its node and how its pull ended."""
    image = config.verify_image or ""
    statuses = field(status, "containerStatuses") or []
    container = statuses[0] if statuses else None
    image_id = field(container, "imageID") or ""
    waiting = field(field(container, "state"), "waiting")
    reason = field(waiting, "reason")
    pulled = bool(image_id)
    error = None
    if not pulled:
        message = field(waiting, "message") or ""
        error = f"{reason}: {message}".rstrip(": ") if reason else "the pod reports no pull yet"
    through_mirror: bool | None = None
    if pulled and _fallback_forbidden(config, image):
        through_mirror = True
    elif not pulled:
        through_mirror = False
    return {
        "pod": pod_name,
        "node": field(spec, "nodeName"),
        "image": image,
        "pulled": pulled,
        "imageID": image_id or None,
        "ok": pulled,
        "pullFailed": reason in PULL_FAILURES,
        "error": error,
        "throughMirror": through_mirror,
    }


def verification_by_node(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Key the pod results by node; two sample pods on one node keep the first result."""
    by_node: dict[str, dict[str, Any]] = {}
    for result in results:
        node = result["node"] or result["pod"]
        by_node.setdefault(node, {"verification": result})
    return by_node
