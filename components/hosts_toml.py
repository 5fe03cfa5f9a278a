"""Rendering of containerd ``hosts.toml`` files with tomlkit.

Every file is parsed back with tomllib and compared with the model before it
is shipped, so a rendering bug cannot reach a node as a file containerd
ignores (a file it cannot parse makes pulls bypass the mirror silently).
"""

from __future__ import annotations

import tomllib
from typing import Any

import tomlkit
from tomlkit.items import Table

from .credentials import authorization_header
from .model import Host, Namespace

MANAGED_MARKER = "# Managed by nexus-mirror."
HEADER_LINES = (
    MANAGED_MARKER + " Changes made here are overwritten on the next apply;",
    "# set nexus-mirror:registries in the stack config instead.",
)


class RenderError(Exception):
    """Raised when a rendered file does not read back as the model it came from."""


def _host_fields(host: Host) -> dict[str, Any]:
    """Return the TOML keys containerd reads for one host, in a fixed order."""
    fields: dict[str, Any] = {"capabilities": list(host.capabilities)}
    if host.ca:
        fields["ca"] = host.ca[0] if len(host.ca) == 1 else list(host.ca)
    if host.client:
        fields["client"] = _client_value(host.client)
    if host.skip_verify:
        fields["skip_verify"] = True
    if host.override_path:
        fields["override_path"] = True
    headers: dict[str, Any] = {
        name: values[0] if len(values) == 1 else list(values) for name, values in host.headers
    }
    if host.credentials is not None and host.credentials.auth == "header":
        headers["Authorization"] = authorization_header(host.credentials)
    if headers:
        fields["header"] = headers
    return fields


def _client_value(client: tuple[tuple[str, str], ...]) -> Any:
    """Write client certificates in one array type.

    Older TOML parsers reject arrays that mix strings and arrays, so when pairs
    and single files are mixed, a single file holding both certificate and key
    is written as the pair [file, file], which Go's TLS loader reads the same.
    """
    if all(not key for _, key in client):
        return client[0][0] if len(client) == 1 else [cert for cert, _ in client]
    return [[cert, key or cert] for cert, key in client]


def _fill(table: Any, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        if name == "header":
            header = tomlkit.table()
            for header_name, header_value in value.items():
                header[header_name] = header_value
            table["header"] = header
        else:
            table[name] = value


def expected_data(namespace: Namespace) -> dict[str, Any]:
    """Return what the rendered file must mean, as tomllib would load it."""
    data: dict[str, Any] = {}
    if namespace.server is not None:
        data["server"] = namespace.server.url
        data.update(_host_fields(namespace.server))
    data["host"] = {host.url: _host_fields(host) for host in namespace.hosts}
    return data


def render_hosts_toml(namespace: Namespace) -> str:
    """Render the hosts.toml of one namespace, deterministic for the same model."""
    document = tomlkit.document()
    for line in HEADER_LINES:
        document.add(tomlkit.comment(line[2:]))
    if namespace.server is not None:
        document.add(tomlkit.nl())
        document["server"] = namespace.server.url
        _fill(document, _host_fields(namespace.server))
    # Mirrors are [host."<url>"] tables; containerd tries them in file order.
    hosts = tomlkit.table(is_super_table=True)
    for host in namespace.hosts:
        table: Table = tomlkit.table()
        _fill(table, _host_fields(host))
        hosts[host.url] = table
    document["host"] = hosts
    text = tomlkit.dumps(document)
    text = text.replace("\n[host.", "\n\n[host.").replace("\n\n\n", "\n\n").lstrip("\n")
    if not text.endswith("\n"):
        text += "\n"
    _check_round_trip(namespace, text)
    return text


def _ordered(value: Any) -> Any:
    """Return ``value`` with every table turned into its list of (key, value) pairs."""
    if isinstance(value, dict):
        return [(key, _ordered(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [_ordered(item) for item in value]
    return value


def _check_round_trip(namespace: Namespace, text: str) -> None:
    loaded = tomllib.loads(text)
    expected = expected_data(namespace)
    if loaded != expected:
        # Values never go into the message: any header value may be a token.
        detail = f": it reads as keys {sorted(loaded)} and mirrors {list(loaded.get('host', {}))}"
        raise RenderError(
            f"hosts.toml for {namespace.name} does not read back as configured{detail}"
        )
    order = list(loaded.get("host", {}))
    if order != [host.url for host in namespace.hosts]:
        raise RenderError(f"hosts.toml for {namespace.name} lists mirrors out of order: {order!r}")
    # Tables compare equal in any order. The file must also keep the order of
    # the stack config (server keys, mirrors, headers), so reviews read alike.
    if _ordered(loaded) != _ordered(expected):
        raise RenderError(
            f"hosts.toml for {namespace.name} reads back with keys or headers out of order"
        )
    if not text.startswith(MANAGED_MARKER):
        raise RenderError(f"hosts.toml for {namespace.name} lost its first-line marker")


def render_files(namespace: Namespace) -> dict[str, str]:
    """Return every file of the namespace directory: hosts.toml and inline PEM files."""
    files = {"hosts.toml": render_hosts_toml(namespace)}
    for inline in namespace.files:
        files[inline.name] = inline.content
    return files


def file_modes(namespace: Namespace) -> dict[str, str]:
    """Return the octal mode of every file that render_files returns.

    hosts.toml is 0600 when it has any header, because headers often carry
    tokens even in plain-text config (credentials with ``auth: header`` become
    an Authorization header), and 0644 otherwise. Every file of a namespace
    built from secret config is 0600. Other inline files keep their own mode,
    which is 0600 for a client private key.
    """
    hosts = [*namespace.hosts, *([namespace.server] if namespace.server else [])]
    private = namespace.secret or namespace.holds_credentials or any(host.headers for host in hosts)
    modes = {"hosts.toml": "0600" if private else "0644"}
    for inline in namespace.files:
        modes[inline.name] = "0600" if namespace.secret else inline.mode
    return modes
