"""The text each node command reads on standard input: the node script and its data.

A node command is the short, fixed ``sh -s -- MODE`` (behind ``sudo -n`` for a
user other than root); everything it needs arrives on standard input as the
script from ``node/nexus-mirror-node.sh`` followed by a generated tail. In the
tail, config values appear only as single-quoted words or in quoted
here-documents, so no value is ever read as shell code.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from importlib import resources

from .credentials import authorization_header, config_auth_tables
from .hosts_toml import file_modes, render_files, render_hosts_toml
from .model import Host, MirrorConfig, Namespace, Node

SCRIPT_NAME = "nexus-mirror-node.sh"


def node_script() -> str:
    """Return the node script exactly as it ships in the package."""
    return resources.files(__package__).joinpath("node", SCRIPT_NAME).read_text(encoding="utf-8")


def node_command(node: Node, mode: str) -> str:
    """Return the command pulumi-command runs over SSH for ``mode``.

    For a user other than root, the command first runs ``sudo -n true``. When
    sudo is missing or requires a password, the command fails with the node
    script's error line, naming the node, the step and sudo's own message.
    """
    command = f"sh -s -- {mode}"
    if not node.uses_sudo:
        return command
    error = (
        f"nexus-mirror: node {node.name}: check sudo: sudo -n failed for user {node.user}: %s. "
        f"Allow {node.user} to run sudo without a password (NOPASSWD in /etc/sudoers.d), "
        "or connect as root\\n"
    )
    check = (
        "nm_sudo=$(sudo -n true 2>&1 </dev/null) || "
        f'{{ printf {shlex.quote(error)} "${{nm_sudo:-sudo -n true failed}}" >&2; exit 1; }}'
    )
    return f"{check}; exec sudo -n {command}"


@dataclass(frozen=True)
class NodeInput:
    """Standard input of one node command."""

    text: str
    secret: bool
    files: dict[str, str]
    """Wanted files by path relative to configPath (hosts mode only)."""


def settings_lines(node: Node, verify_image: str | None = None) -> list[str]:
    """Return the NM_* assignments of the tail, every value single-quoted."""
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
    """Return ``call`` fed ``content`` by a quoted here-document.

    The shell ends the here-document at the first line equal to the
    delimiter, so the delimiter is lengthened until no line of the content
    (split at newlines, as the shell reads it) equals it.
    """
    delimiter = f"NEXUS_MIRROR_EOF_{number}"
    lines = set(content.split("\n"))
    while delimiter in lines:
        delimiter += "_"
    if not content.endswith("\n"):
        content += "\n"
    return [f"{call} <<'{delimiter}'", content + delimiter]


def _absolute(base: str, path: str) -> str:
    """Join a path relative to the namespace directory, as containerd does."""
    return path if not path or path.startswith("/") else f"{base}/{path}"


def probe_lines(node: Node, namespace: Namespace, number: int) -> tuple[list[str], int]:
    """Return the nm_probe lines of a namespace and the last here-document number used."""
    lines = []
    base = f"{node.containerd.config_path}/{namespace.name}"
    for host in namespace.hosts:
        ca = _absolute(base, next(iter(host.ca), ""))
        cert, key = next(iter(host.client), ("", ""))
        words = [
            "nm_probe",
            namespace.name,
            host.url,
            host.probe_url,
            "true" if host.skip_verify else "false",
            ca,
            _absolute(base, cert),
            _absolute(base, key or cert),
        ]
        lines.append(" ".join(shlex.quote(w) for w in words))
        if host.credentials is not None:
            # curl reads the header from a config file, so it never shows in a process list.
            number += 1
            header = f'header = "Authorization: {authorization_header(host.credentials)}"\n'
            lines.extend(_heredoc("nm_probe_auth", header, number))
    return lines, number


def _verify_namespace(node: Node, namespace: Namespace) -> Namespace:
    """Return the namespace as ctr needs it for the test pull.

    ctr never reads config.toml, so credentials given with ``auth: config`` go
    into an Authorization header here. Relative certificate paths become
    absolute because ctr reads this hosts.toml from a scratch directory.
    """
    base = f"{node.containerd.config_path}/{namespace.name}"

    def for_ctr(host: Host) -> Host:
        credentials = host.credentials
        if credentials is not None and credentials.auth == "config":
            credentials = dataclasses.replace(credentials, auth="header")
        return dataclasses.replace(
            host,
            ca=tuple(_absolute(base, path) for path in host.ca),
            client=tuple((_absolute(base, c), _absolute(base, k)) for c, k in host.client),
            credentials=credentials,
        )

    server = for_ctr(namespace.server) if namespace.server is not None else None
    return dataclasses.replace(
        namespace, hosts=tuple(for_ctr(h) for h in namespace.hosts), server=server
    )


def config_input(node: Node, config: MirrorConfig | None = None) -> NodeInput:
    """Standard input of the config command: only what decides config.toml and the restart.

    With ``auth: config`` credentials in ``config``, it also carries the
    registry.configs auth tables, one nm_config_auth call each with the
    password in a here-document, and is then a secret.
    """
    lines = settings_lines(node)
    tables = config_auth_tables(config.namespaces) if config is not None else []
    for number, table in enumerate(tables, start=1):
        call = " ".join(shlex.quote(w) for w in ("nm_config_auth", table.host, table.username))
        lines.extend(_heredoc(call, table.password, number))
    text = "\n".join([node_script().rstrip("\n"), "", *lines, 'nm_main "$@" </dev/null', ""])
    return NodeInput(text=text, secret=node.secret or bool(tables), files={})


def hosts_input(node: Node, config: MirrorConfig) -> NodeInput:
    """Standard input of the hosts command: every managed file, the probes and the test pull."""
    lines = settings_lines(node, config.verify_image or "")
    files: dict[str, str] = {}
    number = 0
    config_auth = bool(config_auth_tables(config.namespaces))
    for namespace in config.namespaces:
        modes = file_modes(namespace)
        for name, content in render_files(namespace).items():
            number += 1
            mode = modes[name]
            call = " ".join(shlex.quote(w) for w in ("nm_file", namespace.name, name, mode))
            lines.extend(_heredoc(call, content, number))
            files[f"{namespace.name}/{name}"] = content
        probes, number = probe_lines(node, namespace, number)
        lines.extend(probes)
        if config_auth and config.verify_image:
            number += 1
            verify_text = render_hosts_toml(_verify_namespace(node, namespace))
            call = f"nm_verify_file {shlex.quote(namespace.name)}"
            lines.extend(_heredoc(call, verify_text, number))
    text = "\n".join([node_script().rstrip("\n"), "", *lines, 'nm_main "$@" </dev/null', ""])
    secret = (
        node.secret
        or "verify" in config.secret_keys
        or any(namespace.secret for namespace in config.namespaces)
        or any(inline.secret for namespace in config.namespaces for inline in namespace.files)
        # Probe headers and ctr's hosts files carry every password, config auth included.
        or any(host.credentials for namespace in config.namespaces for host in namespace.hosts)
    )
    return NodeInput(text=text, secret=secret, files=files)
