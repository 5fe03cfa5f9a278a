"""Node reports to stack outputs.

Each node command prints one JSON document on stdout. These functions merge a
node's config and hosts reports into the ``nodes`` stack output and decide
whether the test pull was served by a mirror rather than by the upstream.
"""

from __future__ import annotations

import json
from typing import Any

from .config import normalize_image
from .model import MirrorConfig


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


def node_output(
    config: MirrorConfig, host: str, config_stdout: str | None, hosts_stdout: str | None
) -> dict[str, Any]:
    """Merge the two reports of one node into its entry of the ``nodes`` output."""
    config_report = parse_report(config_stdout)
    hosts_report = parse_report(hosts_stdout)
    verification = hosts_report.get("verification")
    if isinstance(verification, dict):
        served_by = verification.get("servedBy")
        mirrors = mirror_authorities(config, str(verification.get("image", "")))
        verification = {
            **verification,
            "throughMirror": bool(served_by) and served_by in mirrors,
        }
    return {
        "host": host,
        "containerdVersion": hosts_report.get("containerdVersion")
        or config_report.get("containerdVersion"),
        "configPath": hosts_report.get("configPath") or config_report.get("configPath"),
        "configChanged": bool(config_report.get("configChanged", False)),
        "restarted": bool(config_report.get("restarted", False)),
        "criPlugin": hosts_report.get("criPlugin") or config_report.get("criPlugin"),
        "files": hosts_report.get("files", []),
        "mirrors": hosts_report.get("mirrors", []),
        "verification": verification,
    }
