"""The KubernetesMirror component: one stack's mirrors on every node through a DaemonSet.

The cluster's DaemonSet controller carries the files to every selected node,
new nodes included, so no node is reached over SSH. Resources, in the order
Pulumi creates them (and deletes them in reverse):

- the namespace, as a NamespacePatch: created when missing, and left in
  place on destroy because other workloads may share it;
- the ConfigMaps with the scripts and the rendered files, and the Secret
  with the files that contain credentials or private keys;
- the DaemonSet, whose pod template carries a hash of both, so that a change
  rolls the pods at most ``maxSurge`` (plus ``maxUnavailable``) nodes at a
  time. Pulumi deletes it with foreground propagation, so ``pulumi destroy``
  waits until its pods are gone. A pod on a reachable node is gone after its
  preStop hook removed the node's files;
- with ``verify.image``, one pod per verified node that pulls the image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from ..hosts_toml import render_hosts_toml
from ..model import Kubernetes, MirrorConfig
from .bundle import BundleError, build_bundle
from .manifests import (
    NAMES,
    config_map_manifest,
    daemon_set_manifest,
    namespace_manifest,
    secret_manifest,
)
from .verification import node_counts, pull_result, verification_by_node
from .verify_pods import verify_pod_manifests

TYPE_TOKEN = "nexus-mirror:index:KubernetesMirror"


class KubernetesMirror(pulumi.ComponentResource):
    """Containerd registry mirrors on every node of a cluster, delivered by a DaemonSet."""

    hosts_toml: pulumi.Output[dict[str, str]]
    """Rendered hosts.toml by registry namespace."""
    nodes: pulumi.Output[dict[str, Any]]
    """Verification results by node name (empty without ``verify.image``)."""
    kubernetes: pulumi.Output[dict[str, Any]]
    """Namespace, object names and the DaemonSet's node counts."""
    resources: dict[str, pulumi.CustomResource]
    """The child resources by Pulumi resource name, such as ``daemon-set``."""

    def __init__(
        self, name: str, config: MirrorConfig, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(TYPE_TOKEN, name, None, opts)
        settings = config.kubernetes
        if settings is None:
            raise ValueError("KubernetesMirror needs a stack with delivery kubernetes")
        try:
            bundle = build_bundle(config)
        except BundleError as error:
            raise pulumi.RunError(f"nexus-mirror:registries: {error}") from None
        for warning in config.warnings:
            pulumi.log.warn(warning, resource=self)
        self.resources = {}
        provider = self._make_provider(settings)

        def options(*depends_on: pulumi.Resource, replace: bool = False) -> pulumi.ResourceOptions:
            return pulumi.ResourceOptions(
                parent=self,
                provider=provider,
                depends_on=list(depends_on),
                delete_before_replace=replace,
            )

        namespace = k8s.core.v1.NamespacePatch(
            "namespace", metadata=namespace_manifest(settings)["metadata"], opts=options()
        )
        scripts = self._config_map(
            "scripts", settings, NAMES.scripts, bundle.scripts, options(namespace)
        )
        files = self._config_map(
            "files", settings, NAMES.files, bundle.config_data, options(namespace)
        )
        secret = k8s.core.v1.Secret(
            "files",
            metadata=secret_manifest(settings, {})["metadata"],
            type="Opaque",
            string_data=pulumi.Output.secret(bundle.secret_data),
            opts=options(namespace),
        )
        daemon_set_spec = daemon_set_manifest(config, bundle)
        daemon_set = k8s.apps.v1.DaemonSet(
            "daemon-set",
            metadata=daemon_set_spec["metadata"],
            spec=daemon_set_spec["spec"],
            opts=options(scripts, files, secret),
        )
        self.resources.update(
            {"namespace": namespace, "scripts": scripts, "files": files, "secret": secret}
        )
        self.resources["daemon-set"] = daemon_set

        results = []
        for manifest in verify_pod_manifests(config, bundle):
            pod_name = manifest["metadata"]["name"]
            pod = k8s.core.v1.Pod(
                pod_name.removeprefix("nexus-mirror-"),
                metadata=manifest["metadata"],
                spec=manifest["spec"],
                opts=options(daemon_set, replace=True),
            )
            self.resources[pod_name] = pod
            results.append(
                pulumi.Output.all(pod.spec, pod.status).apply(_pull_reader(config, pod_name))
            )

        self.hosts_toml = pulumi.Output.from_input(_hosts_toml(config))
        self.nodes = pulumi.Output.all(*results).apply(verification_by_node)
        self.kubernetes = daemon_set.status.apply(_summary_reader(settings))
        self.register_outputs(
            {"hostsToml": self.hosts_toml, "nodes": self.nodes, "kubernetes": self.kubernetes}
        )

    def _make_provider(self, settings: Kubernetes) -> k8s.Provider | None:
        """Return a provider for ``context`` or ``kubeconfig``, or None for the default provider.

        The default provider reads the ``kubernetes:*`` stack config and KUBECONFIG.
        """
        if settings.context is None and settings.kubeconfig is None:
            return None
        provider = k8s.Provider(
            "kubernetes",
            context=settings.context,
            kubeconfig=settings.kubeconfig,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.resources["kubernetes"] = provider
        return provider

    @staticmethod
    def _config_map(
        resource_name: str,
        settings: Kubernetes,
        name: str,
        data: dict[str, str],
        opts: pulumi.ResourceOptions,
    ) -> k8s.core.v1.ConfigMap:
        manifest = config_map_manifest(settings, name, resource_name, data)
        return k8s.core.v1.ConfigMap(
            resource_name, metadata=manifest["metadata"], data=manifest["data"], opts=opts
        )


def _pull_reader(config: MirrorConfig, pod_name: str) -> Callable[[list[Any]], dict[str, Any]]:
    def read(values: list[Any]) -> dict[str, Any]:
        return pull_result(config, pod_name, values[0], values[1])

    return read


def _summary_reader(settings: Kubernetes) -> Callable[[Any], dict[str, Any]]:
    def read(status: Any) -> dict[str, Any]:
        return {
            "namespace": settings.namespace,
            "daemonSet": NAMES.daemon_set,
            "configMap": NAMES.files,
            "secret": NAMES.files,
            "scriptsConfigMap": NAMES.scripts,
            **node_counts(status),
        }

    return read


def _hosts_toml(config: MirrorConfig) -> dict[str, Any]:
    hosts_toml: dict[str, Any] = {}
    for namespace in config.namespaces:
        text = render_hosts_toml(namespace)
        hosts_toml[namespace.name] = pulumi.Output.secret(text) if namespace.secret else text
    return hosts_toml
