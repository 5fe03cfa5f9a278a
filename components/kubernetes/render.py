"""Every object of a Kubernetes stack as a manifest, for review without Pulumi."""

from __future__ import annotations

from typing import Any

from ..model import MirrorConfig
from .bundle import Bundle
from .manifests import (
    NAMES,
    config_map_manifest,
    daemon_set_manifest,
    kubernetes_settings,
    namespace_manifest,
    secret_manifest,
)
from .verify_pods import verify_pod_manifests


def all_manifests(config: MirrorConfig, bundle: Bundle) -> list[dict[str, Any]]:
    """Return every object the component declares, in creation order, for review.

    The Secret's stringData contains the real values, so a caller that shows
    it must replace them.
    """
    settings = kubernetes_settings(config)
    return [
        namespace_manifest(settings),
        config_map_manifest(settings, NAMES.scripts, "scripts", bundle.scripts),
        config_map_manifest(settings, NAMES.files, "files", bundle.config_data),
        secret_manifest(settings, bundle.secret_data),
        daemon_set_manifest(config, bundle),
        *verify_pod_manifests(config, bundle),
    ]
