"""Registry credentials and client certificates, read from secret config keys.

A password or a client private key never sits in nexus-mirror:nexus or
nexus-mirror:registries. Each one is a config key of its own, set with
``pulumi config set --secret``: nexusPassword and nexusClientKeyPem for Nexus,
and for a mirror the key that its passwordKey or clientKeyPemKey names.

``auth`` chooses how containerd gets a user name and password:

- ``header`` (the default): an ``Authorization: Basic`` header in the host's
  table of hosts.toml. containerd 1.6, 1.7 and 2.x read hosts.toml on every
  pull, so a new password needs no restart. containerd 2.1 and later also send
  the header to the token server named in a registry's Bearer challenge.
- ``config``: ``registry.configs."<host:port>".auth`` in config.toml, keyed by
  the host containerd contacts. containerd reads config.toml only when it
  starts, so a new password restarts containerd. containerd 2.x still reads
  the table but marks it deprecated.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .model import Credentials, Host, InlineFile, Namespace, Node
from .validation import (
    PROJECT,
    SECRET_PLACEHOLDER,
    Problems,
    check_pem,
    key_path,
    key_path_child,
)

AUTH_MODES = ("header", "config")
DEFAULT_AUTH = "header"
NEXUS_PASSWORD = "nexusPassword"
NEXUS_CLIENT_KEY = "nexusClientKeyPem"
MIRROR_CREDENTIAL_KEYS = ["username", "passwordKey", "auth", "clientCertPem", "clientKeyPemKey"]
NEXUS_CREDENTIAL_KEYS = ["username", "auth", "clientCertPem"]
# Keys that would hold a secret in plain text inside an object; each is rejected
# with the config command that stores it as a secret key instead.
INLINE_SECRET_KEYS = ["password", "clientKeyPem"]

_KEY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,99}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BEGIN_PRIVATE_KEY = re.compile(r"-----BEGIN ((RSA|EC|DSA|ENCRYPTED) )?PRIVATE KEY-----")


@dataclass(frozen=True)
class ClientPem:
    """A client certificate given as inline PEM: delivered as two files next to hosts.toml."""

    certificate: str = field(repr=False)
    private_key: str = field(repr=False)


@dataclass(frozen=True)
class ConfigAuth:
    """One ``registry.configs."<host>".auth`` table that the config command writes."""

    host: str
    username: str
    password: str = field(repr=False)


@dataclass
class SecretKeys:
    """Top-level config values that passwords and client keys are read from.

    ``used`` collects the names read, so that parse_config accepts them as
    known keys. A key that several mirrors name is reported once.
    """

    values: Mapping[str, Any]
    secret_names: frozenset[str]
    reserved: frozenset[str]
    """Keys of nexus-mirror itself, which cannot contain a mirror's secret."""
    used: set[str] = field(default_factory=set)
    reported: set[str] = field(default_factory=set)

    def read(self, problems: Problems, name: str, needed_by: str, command: str) -> str | None:
        """Return the value of secret key ``name``, or None after reporting it missing or plain.

        ``needed_by`` is the config key that names it and ``command`` the
        ``pulumi config set --secret`` command that sets it.
        """
        full = key_path(name)
        first = name not in self.reported
        self.reported.add(name)
        if name not in self.values:
            if first:
                problems.errors.append(
                    f"{full}: is not set, but {needed_by} needs it. Set it: {command}"
                )
            return None
        self.used.add(name)
        if name not in self.secret_names:
            if first:
                problems.errors.append(
                    f"{full}: is stored in plain text (value not shown). "
                    f"Store it encrypted: {command}"
                )
            return None
        value = self.values[name]
        if not isinstance(value, str) or not value:
            if first:
                problems.secret_error(full, "must be non-empty text", f"Set it: {command}")
            return None
        return value


def password_command(name: str) -> str:
    """Return the command that stores a password as secret config key ``name``."""
    return f"pulumi config set --secret {PROJECT}:{name}"


def private_key_command(name: str) -> str:
    """Return the command that stores a PEM private key file as secret config key ``name``."""
    return f"pulumi config set --secret {PROJECT}:{name} < client.key"


def suggested_key(namespace: str, index: int, suffix: str) -> str:
    """Return a config key name for a mirror's secret: ghcr.io, 0 -> ghcrIoMirror0Password."""
    words = [word for word in re.split(r"[^A-Za-z0-9]+", namespace) if word]
    camel = words[0].lower() + "".join(word.capitalize() for word in words[1:]) if words else "m"
    if not camel[0].isalpha():
        camel = "registry" + camel
    return f"{camel}Mirror{index}{suffix}"


def authorization_header(credentials: Credentials) -> str:
    """Return the value of the ``Authorization`` header for Basic authentication."""
    if credentials.password == SECRET_PLACEHOLDER:
        # render shows encrypted values as a placeholder, so the header does too.
        return f"Basic {SECRET_PLACEHOLDER}"
    token = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(token).decode("ascii")


def _check_username(problems: Problems, key: str, value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        problems.error(key, value, "must be a non-empty user name", "Set it to the registry user.")
        return None
    if ":" in value:
        # Basic authentication sends user:password, so a colon would split the name.
        problems.error(
            key,
            value,
            "user name contains ':'",
            "Basic authentication cannot send it. Use a user name without ':'.",
        )
        return None
    if _CONTROL.search(value):
        problems.error(key, value, "user name contains a control character", "Remove it.")
        return None
    return value


def _check_password(problems: Problems, name: str, value: str) -> str | None:
    if value == SECRET_PLACEHOLDER:
        return value
    if _CONTROL.search(value):
        problems.secret_error(
            key_path(name),
            "password contains a line break or another control character",
            f"Set it again without one: {password_command(name)}",
        )
        return None
    return value


def _check_private_key(problems: Problems, name: str, value: str) -> str | None:
    if value == SECRET_PLACEHOLDER:
        return value
    fix = private_key_command(name)
    match = _BEGIN_PRIVATE_KEY.search(value)
    if match is None or "PRIVATE KEY-----" not in value[match.end() :]:
        problems.secret_error(
            key_path(name),
            "is not a PEM private key (-----BEGIN PRIVATE KEY----- to -----END PRIVATE KEY-----)",
            f"Set it from the key file: {fix}",
        )
        return None
    if match.group(2) == "ENCRYPTED" or "Proc-Type: 4,ENCRYPTED" in value:
        problems.secret_error(
            key_path(name),
            "is an encrypted private key, which containerd cannot read",
            f"Decrypt it (openssl pkey -in client.key -out client.key.plain) and set that: {fix}.plain",
        )
        return None
    if "\0" in value:
        problems.secret_error(key_path(name), "contains NUL", f"Set it from the key file: {fix}")
        return None
    return value.strip("\n") + "\n"


def _reject_inline_secrets(
    problems: Problems, key: str, value: dict[str, Any], password_fix: str, key_fix: str
) -> None:
    if "password" in value:
        problems.errors.append(
            f"{key_path_child(key, 'password')}: a password must not be stored in this object, "
            f"where it is plain text (value not shown). {password_fix}"
        )
    if "clientKeyPem" in value:
        problems.errors.append(
            f"{key_path_child(key, 'clientKeyPem')}: a private key must not be stored in this "
            f"object, where it is plain text (value not shown). {key_fix}"
        )


def _check_auth_mode(problems: Problems, key: str, value: dict[str, Any], has_user: bool) -> str:
    if "auth" not in value:
        return DEFAULT_AUTH
    auth_key = key_path_child(key, "auth")
    mode = value["auth"]
    if mode not in AUTH_MODES:
        problems.error(
            auth_key,
            mode,
            "must be header or config",
            "Use header (hosts.toml, no restart) or config (config.toml, restarts containerd).",
        )
        return DEFAULT_AUTH
    if not has_user:
        problems.error(
            auth_key, mode, "auth has no effect without username", "Set username, or remove auth."
        )
    return str(mode)


def _check_client_pem(
    problems: Problems,
    key: str,
    value: dict[str, Any],
    private_key: str | None,
    key_named: bool,
    missing_key_fix: str,
) -> ClientPem | None:
    cert_key = key_path_child(key, "clientCertPem")
    certificate = None
    if "clientCertPem" in value:
        certificate = check_pem(problems, cert_key, value["clientCertPem"])
        if certificate is not None and not key_named and "clientKeyPem" not in value:
            problems.errors.append(
                f"{cert_key}: a client certificate needs its private key. {missing_key_fix}"
            )
    elif key_named and "clientKeyPem" not in value:
        problems.errors.append(
            f"{cert_key}: is not set, but the client private key needs its certificate. "
            "Paste the client certificate PEM into clientCertPem."
        )
    if certificate is None or private_key is None:
        return None
    return ClientPem(certificate=certificate, private_key=private_key)


def check_mirror_credentials(
    problems: Problems,
    key: str,
    value: dict[str, Any],
    secrets: SecretKeys,
    suggestion: tuple[str, int],
) -> tuple[Credentials | None, ClientPem | None]:
    """Validate username, passwordKey, auth, clientCertPem and clientKeyPemKey of a mirror.

    ``suggestion`` is (namespace, mirror index), for the key names that fixes propose.
    """
    password_name = suggested_key(*suggestion, "Password")
    client_key_name = suggested_key(*suggestion, "ClientKey")
    password_fix = (
        f"Store it as a secret key of its own: {password_command(password_name)}, "
        f"then set passwordKey: {password_name} here."
    )
    key_fix = (
        f"Store it as a secret key of its own: {private_key_command(client_key_name)}, "
        f"then set clientKeyPemKey: {client_key_name} here."
    )
    _reject_inline_secrets(problems, key, value, password_fix, key_fix)

    username = None
    if "username" in value:
        username = _check_username(problems, key_path_child(key, "username"), value["username"])
    password = None
    if "passwordKey" in value:
        name = _check_key_name(
            problems, key_path_child(key, "passwordKey"), value["passwordKey"], secrets
        )
        if name is not None:
            read = secrets.read(
                problems, name, f"{key_path_child(key, 'passwordKey')}", password_command(name)
            )
            password = _check_password(problems, name, read) if read is not None else None
            if "username" not in value:
                problems.error(
                    key_path_child(key, "passwordKey"),
                    value["passwordKey"],
                    "a password needs a user name",
                    "Set username for this mirror.",
                )
    elif "username" in value and "password" not in value:
        problems.error(
            key_path_child(key, "username"),
            value["username"],
            "a user name needs a password",
            f"Set passwordKey: {password_name} here and store the password: {password_command(password_name)}",
        )
    auth = _check_auth_mode(problems, key, value, "username" in value)

    private_key = None
    key_named = "clientKeyPemKey" in value
    if key_named:
        name = _check_key_name(
            problems, key_path_child(key, "clientKeyPemKey"), value["clientKeyPemKey"], secrets
        )
        if name is not None:
            read = secrets.read(
                problems,
                name,
                f"{key_path_child(key, 'clientKeyPemKey')}",
                private_key_command(name),
            )
            private_key = _check_private_key(problems, name, read) if read is not None else None
    missing_key_fix = (
        f"Set clientKeyPemKey: {client_key_name} here and store the key: "
        f"{private_key_command(client_key_name)}"
    )
    client = _check_client_pem(problems, key, value, private_key, key_named, missing_key_fix)

    credentials = None
    if username is not None and password is not None:
        credentials = Credentials(username=username, password=password, auth=auth)
    return credentials, client


def check_nexus_credentials(
    problems: Problems, value: dict[str, Any], secrets: SecretKeys
) -> tuple[Credentials | None, ClientPem | None]:
    """Validate nexus-mirror:nexus.username, auth, clientCertPem and the two Nexus secret keys."""
    key = key_path("nexus")
    password_fix = (
        f"Store it as its own secret key: {password_command(NEXUS_PASSWORD)}, then remove it here."
    )
    key_fix = (
        f"Store it as its own secret key: {private_key_command(NEXUS_CLIENT_KEY)}, "
        "then remove it here."
    )
    _reject_inline_secrets(problems, key, value, password_fix, key_fix)

    username = None
    if "username" in value:
        username = _check_username(problems, key_path_child(key, "username"), value["username"])
    password = None
    if "username" in value and ("password" not in value or NEXUS_PASSWORD in secrets.values):
        read = secrets.read(
            problems,
            NEXUS_PASSWORD,
            key_path_child(key, "username"),
            password_command(NEXUS_PASSWORD),
        )
        password = _check_password(problems, NEXUS_PASSWORD, read) if read is not None else None
    elif NEXUS_PASSWORD in secrets.values:
        secrets.used.add(NEXUS_PASSWORD)
        problems.errors.append(
            f"{key_path(NEXUS_PASSWORD)}: is set, but {key_path_child(key, 'username')} is not. "
            f"Set the Nexus user: pulumi config set --path {key_path_child(key, 'username')} NAME, "
            f"or remove the password: pulumi config rm {key_path(NEXUS_PASSWORD)}"
        )
    auth = _check_auth_mode(problems, key, value, "username" in value)

    private_key = None
    key_named = NEXUS_CLIENT_KEY in secrets.values
    if key_named:
        read = secrets.read(
            problems,
            NEXUS_CLIENT_KEY,
            key_path_child(key, "clientCertPem"),
            private_key_command(NEXUS_CLIENT_KEY),
        )
        private_key = (
            _check_private_key(problems, NEXUS_CLIENT_KEY, read) if read is not None else None
        )
    missing_key_fix = f"Store the key: {private_key_command(NEXUS_CLIENT_KEY)}"
    client = _check_client_pem(problems, key, value, private_key, key_named, missing_key_fix)

    credentials = None
    if username is not None and password is not None:
        credentials = Credentials(username=username, password=password, auth=auth)
    return credentials, client


def _check_key_name(problems: Problems, key: str, value: Any, secrets: SecretKeys) -> str | None:
    """Check a passwordKey or clientKeyPemKey: the name of a top-level config key."""
    name = value.removeprefix(f"{PROJECT}:") if isinstance(value, str) else value
    if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
        problems.error(
            key,
            value,
            "must name a config key",
            "Use a key name of letters, digits, '_' and '-', such as ghcrMirrorPassword.",
        )
        return None
    if name in secrets.reserved:
        problems.error(
            key,
            value,
            f"{key_path(name)} is a setting of nexus-mirror itself",
            "Name a key of its own, such as ghcrMirrorPassword.",
        )
        return None
    return name


def client_files(prefix: str, client: ClientPem) -> tuple[list[InlineFile], tuple[str, str]]:
    """Return the certificate and key files of a client certificate and their [cert, key] pair."""
    cert_name, key_name = f"{prefix}-client.pem", f"{prefix}-client.key"
    files = [
        InlineFile(cert_name, client.certificate),
        InlineFile(key_name, client.private_key, mode="0600", secret=True),
    ]
    return files, (cert_name, key_name)


def check_header_conflict(problems: Problems, key: str, host: Host) -> None:
    """Reject an Authorization header beside username: containerd would send both."""
    if host.credentials is None or host.credentials.auth != "header":
        return
    for name, _ in host.headers:
        if name.lower() == "authorization":
            problems.errors.append(
                f"{key_path_child(key_path_child(key, 'headers'), name)}: is set together with "
                "username (value not shown), so two Authorization headers would be sent. "
                "Remove the header, or remove username and passwordKey."
            )


def config_auth_tables(namespaces: Iterable[Namespace]) -> list[ConfigAuth]:
    """Return the ``registry.configs`` auth tables of every host with ``auth: config``, by host."""
    tables: dict[str, ConfigAuth] = {}
    for namespace in namespaces:
        hosts = list(namespace.hosts)
        if namespace.server is not None:
            hosts.append(namespace.server)
        for host in hosts:
            credentials = host.credentials
            if credentials is None or credentials.auth != "config":
                continue
            tables.setdefault(
                host.authority,
                ConfigAuth(host.authority, credentials.username, credentials.password),
            )
    return [tables[name] for name in sorted(tables)]


def check_config_auth(problems: Problems, namespaces: Iterable[Namespace]) -> None:
    """Reject two different credentials for one host: config.toml has one table per host."""
    first: dict[str, Host] = {}
    for namespace in namespaces:
        for host in namespace.hosts:
            credentials = host.credentials
            if credentials is None or credentials.auth != "config":
                continue
            earlier = first.setdefault(host.authority, host)
            if earlier.credentials != credentials:
                problems.errors.append(
                    f"{key_path_child(host.config_key, 'auth')}: config.toml holds one user and "
                    f"password per host, and {earlier.config_key} already sets other credentials "
                    f"for {host.authority} (values not shown). Use the same username and password, "
                    "or auth: header for one of them."
                )


def referenced_keys(registries: Any) -> set[str]:
    """Return the config keys that mirrors name in passwordKey or clientKeyPemKey."""
    names: set[str] = set()
    if not isinstance(registries, dict):
        return names
    for registry in registries.values():
        mirrors = registry.get("mirrors") if isinstance(registry, dict) else None
        for mirror in mirrors if isinstance(mirrors, list) else []:
            if not isinstance(mirror, dict):
                continue
            for field_name in ("passwordKey", "clientKeyPemKey"):
                value = mirror.get(field_name)
                if isinstance(value, str):
                    names.add(value.removeprefix(f"{PROJECT}:"))
    return names


def check_credential_use(
    problems: Problems, namespaces: Iterable[Namespace], nodes: Iterable[Node]
) -> None:
    """Check what credentials need from the nodes: config auth writes config.toml."""
    namespaces = list(namespaces)
    check_config_auth(problems, namespaces)
    tables = config_auth_tables(namespaces)
    unmanaged = [node.name for node in nodes if not node.containerd.manage_config_file]
    if tables and unmanaged:
        problems.errors.append(
            f"{key_path('containerd', 'manageConfigFile')}: auth: config writes the credentials "
            f"for {', '.join(table.host for table in tables)} to config.toml, which is not "
            f"managed on {', '.join(unmanaged)}. Use auth: header, or set manageConfigFile: true "
            "for those nodes."
        )
