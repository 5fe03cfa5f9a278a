"""Stack files for the loopback lab: the same keys a user writes for a real cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.e2e.lab import Lab


def host_key(lab: Lab) -> str:
    """Return the lab sshd's host key as ``type base64``, for ``hostKey``."""
    for line in lab.known_hosts.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == f"[{lab.ssh_host}]:{lab.ssh_port}":
            return f"{fields[1]} {fields[2]}"
    raise ValueError(f"{lab.known_hosts} has no key for [{lab.ssh_host}]:{lab.ssh_port}")


def lab_config(lab: Lab, nodes: list[str] | None = None, **overrides: Any) -> dict[str, Any]:
    """Return the ``nexus-mirror`` config for the lab: docker.io through the lab's mirror."""
    node_entries = []
    for name in nodes or ["node-a"]:
        node = lab.node(name)
        node_entries.append(
            {
                "name": name,
                "host": lab.ssh_host,
                "port": lab.ssh_port,
                "hostKey": host_key(lab),
                "containerd": {
                    "configPath": str(node.certs_dir),
                    "configFile": str(node.config),
                    "restartCommand": node.restart_command,
                    "logCommand": node.log_command,
                    "address": str(node.socket),
                    "stateDir": str(node.dir / "nexus-mirror-state"),
                    "restartTimeout": 30,
                },
            }
        )
    config: dict[str, Any] = {
        "nexus": {"url": f"http://{lab.ssh_host}"},
        "registries": {"docker.io": {"nexus": {"port": lab.mirror_port}}},
        "nodes": node_entries,
        "ssh": {"user": lab.ssh_user},
    }
    config.update(overrides)
    return config


def write_stack_file(path: Path, config: dict[str, Any]) -> Path:
    """Write ``config`` as a Pulumi stack file, every key in the nexus-mirror namespace."""
    document = {"config": {f"nexus-mirror:{name}": value for name, value in config.items()}}
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path
