"""The text each node command reads on standard input: the node script and its data.

A node command is the short, fixed ``sh -s -- MODE`` (behind ``sudo -n`` for a
user other than root); everything it needs arrives on standard input as the
script from ``node/nexus-mirror-node.sh`` followed by a generated tail. In the
tail, config values appear only as single-quoted words or in quoted
here-documents, so no value is ever read as shell code.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from importlib import resources

from .hosts_toml import render_files
from .model import MirrorConfig, Namespace, Node

SCRIPT_NAME = "nexus-mirror-node.sh"


def node_script() -> str:
    """Return the node script exactly as it ships in the package."""
    return resources.files(__package__).joinpath("node", SCRIPT_NAME).read_text(encoding="utf-8")


def node_command(node: Node, mode: str) -> str:
    """Return the command pulumi-command runs over SSH for ``mode``."""
    command = f"sh -s -- {mode}"
    return f"sudo -n {command}" if node.uses_sudo else command


@dataclass(frozen=True)
class NodeInput:
    """Standard input of one node command."""

    text: str
    secret: bool
    files: dict[str, str]
    """Wanted files by path relative to configPath (hosts mode only)."""


def _settings(node: Node, verify_image: str | None = None) -> list[str]:
    settings = node.containerd
    values = {
        "NM_NODE": node.name,
        "NM_CONFIG_PATH": settings.config_path,
        "NM_CONFIG_FILE": settings.config_file,
        "NM_MANAGE_CONFIG": "true" if settings.manage_config_file else "false",
        "NM_RESTART_COMMAND": settings.restart_command,
        "NM_RESTART_TIMEOUT": str(settings.restart_timeout),
        "NM_LOG_COMMAND": settings.log_command,
        "NM_ADDRESS": settings.address,
        "NM_BIN_DIR": settings.bin_dir,
        "NM_STATE_DIR": settings.state_dir,
    }
    if verify_image is not None:
        values["NM_VERIFY_IMAGE"] = verify_image
    return [f"{name}={shlex.quote(value)}" for name, value in values.items()]


def _heredoc(call: str, content: str, number: int) -> list[str]:
    delimiter = f"NEXUS_MIRROR_EOF_{number}"
    if delimiter in content.splitlines():
        raise ValueError(f"file content contains the line {delimiter}")
    if not content.endswith("\n"):
        content += "\n"
    return [f"{call} <<'{delimiter}'", content + delimiter]


def _probe_lines(node: Node, namespace: Namespace) -> list[str]:
    lines = []
    base = f"{node.containerd.config_path}/{namespace.name}"
    for host in namespace.hosts:
        ca = next(iter(host.ca), "")
        if ca and not ca.startswith("/"):
            ca = f"{base}/{ca}"
        cert, key = next(iter(host.client), ("", ""))
        words = [
            "nm_probe",
            namespace.name,
            host.url,
            host.probe_url,
            "true" if host.skip_verify else "false",
            ca,
            cert,
            key or cert if cert else "",
        ]
        lines.append(" ".join(shlex.quote(w) for w in words))
    return lines


def config_input(node: Node) -> NodeInput:
    """Standard input of the config command: only what decides config.toml and the restart."""
    text = "\n".join(
        [node_script().rstrip("\n"), "", *_settings(node), 'nm_main "$@" </dev/null', ""]
    )
    return NodeInput(text=text, secret=False, files={})


def hosts_input(node: Node, config: MirrorConfig) -> NodeInput:
    """Standard input of the hosts command: every managed file, the probes and the test pull."""
    lines = _settings(node, config.verify_image or "")
    files: dict[str, str] = {}
    number = 0
    for namespace in config.namespaces:
        for name, content in render_files(namespace).items():
            number += 1
            mode = "0644"
            call = " ".join(shlex.quote(w) for w in ("nm_file", namespace.name, name, mode))
            lines.extend(_heredoc(call, content, number))
            files[f"{namespace.name}/{name}"] = content
        lines.extend(_probe_lines(node, namespace))
    text = "\n".join([node_script().rstrip("\n"), "", *lines, 'nm_main "$@" </dev/null', ""])
    secret = any(namespace.secret for namespace in config.namespaces)
    return NodeInput(text=text, secret=secret, files=files)
