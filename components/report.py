"""Node reports to stack outputs.

Each node command prints one JSON document on stdout. These functions merge a
node's config and hosts reports into the ``nodes`` stack output and decide
whether the test pull was served by a mirror rather than by the upstream.
"""

from __future__ import annotations

import json
from typing import Any

from .config import normalize_image
from .model import MirrorConfig, Node


def parse_report(stdout: str | None) -> dict[str, Any]:
    """Load a node report; an empty or missing one becomes an empty dict."""
    if not stdout:
        return {}
    # Only the last line is the report: anything before it came from the restart command.
    last = stdout.strip().splitlines()[-1]
    try:
        loaded = json.loads(last)
    except json.JSONDecodeError:
        return {"error": "the node printed no JSON report"}
    return loaded if isinstance(loaded, dict) else {}


def mirror_authorities(config: MirrorConfig, image: str) -> set[str]:
    """Return the ``host[:port]`` of every mirror configured for the image's registry."""
    normalized = normalize_image(image)
    if normalized is None:
        return set()
    registry = normalized[1]
    by_name = {namespace.name: namespace for namespace in config.namespaces}
    namespace = by_name.get(registry) or by_name.get("_default")
    if namespace is None:
        return set()
    return {host.authority for host in namespace.hosts}


def _version(text: str | None) -> tuple[int, ...] | None:
    parts = (text or "").split(".")
    if len(parts) < 3 or not all(part.isdigit() for part in parts[:3]):
        return None
    return tuple(int(part) for part in parts[:3])


def node_warnings(config: MirrorConfig, node: Node, report: dict[str, Any]) -> list[str]:
    """Return what a node's report shows to be wrong although the apply succeeded."""
    warnings = []
    effective = report.get("configPath")
    wanted = node.containerd.config_path
    if report and effective is not None and effective.rstrip("/") != wanted:
        shown = effective or "nothing"
        warnings.append(
            f"containerd's config_path is {shown}, but the mirrors were written to {wanted}, so "
            "pulls bypass them; set nexus-mirror:containerd.configPath to containerd's value "
            "or let nexus-mirror manage config.toml."
        )

    if report and report.get("criPlugin") is None:
        warnings.append(
            f"containerd did not respond on {node.containerd.address}, so nothing proves it reads "
            "the mirrors; check nexus-mirror:containerd.address and that containerd runs."
        )

    verification = report.get("verification")
    if isinstance(verification, dict) and verification.get("ok") is False:
        warnings.append(
            f"the test pull of {verification.get('image')} failed: {verification.get('error')}"
        )

    version = _version(report.get("containerdVersion"))
    if version is not None and version < (1, 6, 17):
        if any(namespace.name == "_default" for namespace in config.namespaces):
            warnings.append(
                f"containerd {report['containerdVersion']} ignores _default (read from 1.6.17 on)."
            )

    for mirror in report.get("mirrors", []):
        if isinstance(mirror, dict) and mirror.get("up") is False:
            warnings.append(
                f"mirror {mirror.get('url')} for {mirror.get('namespace')} answered "
                f"{mirror.get('status') or 'nothing'} to GET /v2/ from the node."
            )

    return warnings


def node_output(
    config: MirrorConfig, node: Node, config_stdout: str | None, hosts_stdout: str | None
) -> dict[str, Any]:
    """Merge the two reports of one node into its entry of the ``nodes`` output."""
    host = node.host
    config_report = parse_report(config_stdout)
    hosts_report = parse_report(hosts_stdout)
    verification = hosts_report.get("verification")
    if isinstance(verification, dict):
        served_by = verification.get("servedBy")
        mirrors = mirror_authorities(config, str(verification.get("image", "")))
        verification = {
            **verification,
            # A pull that failed after a mirror responded (an HTML page taken
            # for a manifest) was served by nothing.
            "throughMirror": verification.get("ok") is True
            and bool(served_by)
            and served_by in mirrors,
        }
    return {
        "host": host,
        "containerdVersion": hosts_report.get("containerdVersion")
        or config_report.get("containerdVersion"),
        "configPath": hosts_report.get("configPath") or config_report.get("configPath"),
        "configChanged": bool(config_report.get("configChanged", False)),
        "restarted": bool(config_report.get("restarted", False)),
        # The hosts step runs last, so its status is the current one, even null
        # (containerd did not respond). The config report may be stale.
        "criPlugin": hosts_report["criPlugin"]
        if "criPlugin" in hosts_report
        else config_report.get("criPlugin"),
        "files": hosts_report.get("files", []),
        "mirrors": hosts_report.get("mirrors", []),
        "verification": verification,
        "warnings": node_warnings(config, node, hosts_report),
    }
