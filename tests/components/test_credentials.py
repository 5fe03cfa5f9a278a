"""Credentials and client certificates: validation of every key, rendering and node input."""

from __future__ import annotations

import base64
import re
import tomllib
from typing import Any

import pytest

from components.config import parse_config
from components.credentials import (
    authorization_header,
    config_auth_tables,
    suggested_key,
)
from components.hosts_toml import file_modes, render_files, render_hosts_toml
from components.model import Credentials
from components.node_script import config_input, hosts_input
from components.validation import SECRET_PLACEHOLDER, ConfigError

PASSWORD = "Sup3r-secret"
CERT = "-----BEGIN CERTIFICATE-----\nMIIBclient\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIGHkey\n-----END PRIVATE KEY-----\n"
NODES = [{"name": "n1", "host": "10.0.0.1"}]


def nexus_stack(nexus: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """Values with docker.io through Nexus port 8082, plus the given keys."""
    return {
        "nexus": {"url": "https://nexus.example.net", **(nexus or {})},
        "registries": {"docker.io": {"nexus": {"port": 8082}}},
        "nodes": NODES,
        **top,
    }


def mirror_stack(mirror: dict[str, Any], **top: Any) -> dict[str, Any]:
    """Values with ghcr.io through one mirror, plus the given top-level keys."""
    return {
        "registries": {"ghcr.io": {"mirrors": [{"url": "https://cache.internal", **mirror}]}},
        "nodes": NODES,
        **top,
    }


def problems(values: dict[str, Any], secrets: frozenset[str] = frozenset()) -> list[str]:
    with pytest.raises(ConfigError) as failure:
        parse_config(values, secrets)
    return failure.value.problems


def only_problem(values: dict[str, Any], secrets: frozenset[str] = frozenset()) -> str:
    found = problems(values, secrets)
    assert len(found) == 1, found
    return found[0]


def host_of(config: Any, namespace: str = "docker.io", index: int = 0) -> Any:
    return next(n for n in config.namespaces if n.name == namespace).hosts[index]


# --- Nexus credentials -----------------------------------------------------------


def test_nexus_username_and_secret_password() -> None:
    config = parse_config(
        nexus_stack({"username": "robot"}, nexusPassword=PASSWORD), frozenset({"nexusPassword"})
    )

    credentials = host_of(config).credentials
    assert credentials == Credentials("robot", PASSWORD, "header")


def test_nexus_auth_config() -> None:
    config = parse_config(
        nexus_stack({"username": "robot", "auth": "config"}, nexusPassword=PASSWORD),
        frozenset({"nexusPassword"}),
    )

    assert host_of(config).credentials.auth == "config"
    assert config_auth_tables(config.namespaces)[0].host == "nexus.example.net:8082"


def test_nexus_credentials_reach_every_nexus_host() -> None:
    values = nexus_stack({"username": "robot"}, nexusPassword=PASSWORD)
    values["registries"]["ghcr.io"] = {"nexus": {"repository": "ghcr-proxy"}}

    config = parse_config(values, frozenset({"nexusPassword"}))

    assert host_of(config, "ghcr.io").credentials == host_of(config).credentials


def test_nexus_password_in_plain_text_rejected() -> None:
    message = only_problem(nexus_stack({"username": "robot"}, nexusPassword=PASSWORD))

    assert message == (
        "nexus-mirror:nexusPassword: is stored in plain text (value not shown). "
        "Store it encrypted: pulumi config set --secret nexus-mirror:nexusPassword"
    )


def test_nexus_password_inline_rejected() -> None:
    message = only_problem(nexus_stack({"username": "robot", "password": PASSWORD}), frozenset())

    assert message.startswith("nexus-mirror:nexus.password: a password must not be stored")
    assert "pulumi config set --secret nexus-mirror:nexusPassword" in message
    assert PASSWORD not in message


def test_nexus_password_inline_rejected_beside_secret_one() -> None:
    values = nexus_stack({"username": "robot", "password": PASSWORD}, nexusPassword=PASSWORD)

    message = only_problem(values, frozenset({"nexusPassword"}))

    assert message.startswith("nexus-mirror:nexus.password:")


def test_nexus_username_without_password_rejected() -> None:
    message = only_problem(nexus_stack({"username": "robot"}))

    assert message == (
        "nexus-mirror:nexusPassword: is not set, but nexus-mirror:nexus.username needs it. "
        "Set it: pulumi config set --secret nexus-mirror:nexusPassword"
    )


def test_nexus_password_without_username_rejected() -> None:
    message = only_problem(nexus_stack(nexusPassword=PASSWORD), frozenset({"nexusPassword"}))

    assert "nexus-mirror:nexus.username is not" in message
    assert "pulumi config rm nexus-mirror:nexusPassword" in message


def test_nexus_password_without_nexus_rejected() -> None:
    values = mirror_stack({}, nexusPassword=PASSWORD)

    message = only_problem(values, frozenset({"nexusPassword"}))

    assert message.startswith("nexus-mirror:nexusPassword: is set, but nexus-mirror:nexus is not")


@pytest.mark.parametrize(
    ("username", "problem"),
    [
        ("", "must be a non-empty user name"),
        ("ro:bot", "user name contains ':'"),
        ("ro\tbot", "control character"),
        (42, "must be a non-empty user name"),
    ],
)
def test_nexus_username_checked(username: Any, problem: str) -> None:
    values = nexus_stack({"username": username}, nexusPassword=PASSWORD)

    message = only_problem(values, frozenset({"nexusPassword"}))

    assert message.startswith("nexus-mirror:nexus.username: ")
    assert problem in message


@pytest.mark.parametrize("password", ["line\nbreak", "tab\there", "del\x7f"])
def test_password_control_characters_rejected(password: str) -> None:
    values = nexus_stack({"username": "robot"}, nexusPassword=password)

    message = only_problem(values, frozenset({"nexusPassword"}))

    assert message.startswith("nexus-mirror:nexusPassword: password contains")
    assert "value not shown" in message
    assert password not in message


def test_auth_must_be_header_or_config() -> None:
    values = nexus_stack({"username": "robot", "auth": "token"}, nexusPassword=PASSWORD)

    message = only_problem(values, frozenset({"nexusPassword"}))

    assert message.startswith("nexus-mirror:nexus.auth: must be header or config (got 'token')")


def test_auth_without_username_rejected() -> None:
    message = only_problem(nexus_stack({"auth": "config"}))

    assert message.startswith("nexus-mirror:nexus.auth: auth has no effect without username")


def test_auth_defaults_to_header() -> None:
    config = parse_config(
        nexus_stack({"username": "robot"}, nexusPassword=PASSWORD), frozenset({"nexusPassword"})
    )

    assert host_of(config).credentials.auth == "header"
    assert config_auth_tables(config.namespaces) == []


def test_render_placeholder_password_accepted() -> None:
    values = nexus_stack({"username": "robot"}, nexusPassword=SECRET_PLACEHOLDER)

    config = parse_config(values, frozenset({"nexusPassword"}))

    text = render_hosts_toml(config.namespaces[0])
    assert 'Authorization = "Basic [secret]"' in text


# --- mirror credentials ------------------------------------------------------------


def test_mirror_username_and_password_key() -> None:
    values = mirror_stack({"username": "robot", "passwordKey": "ghcrPassword"}, ghcrPassword="pw")

    config = parse_config(values, frozenset({"ghcrPassword"}))

    assert host_of(config, "ghcr.io").credentials == Credentials("robot", "pw", "header")


def test_mirror_password_key_with_namespace_prefix() -> None:
    values = mirror_stack(
        {"username": "robot", "passwordKey": "nexus-mirror:ghcrPassword", "auth": "config"},
        ghcrPassword="pw",
    )

    config = parse_config(values, frozenset({"ghcrPassword"}))

    assert host_of(config, "ghcr.io").credentials == Credentials("robot", "pw", "config")


def test_unreferenced_top_level_key_still_unknown() -> None:
    values = mirror_stack({"username": "robot", "passwordKey": "ghcrPassword"}, ghcrPassword="pw")
    values["ghcrPasword"] = "typo"

    message = only_problem(values, frozenset({"ghcrPassword", "ghcrPasword"}))

    assert message.startswith("nexus-mirror:ghcrPasword: unknown key")
    assert "typo" not in message


def test_mirror_password_key_not_set() -> None:
    message = only_problem(mirror_stack({"username": "robot", "passwordKey": "ghcrPassword"}))

    assert message == (
        "nexus-mirror:ghcrPassword: is not set, but "
        'nexus-mirror:registries["ghcr.io"].mirrors[0].passwordKey needs it. '
        "Set it: pulumi config set --secret nexus-mirror:ghcrPassword"
    )


def test_mirror_password_key_in_plain_text() -> None:
    values = mirror_stack({"username": "robot", "passwordKey": "ghcrPassword"}, ghcrPassword="pw")

    message = only_problem(values)

    assert message == (
        "nexus-mirror:ghcrPassword: is stored in plain text (value not shown). "
        "Store it encrypted: pulumi config set --secret nexus-mirror:ghcrPassword"
    )


@pytest.mark.parametrize("name", ["sshPrivateKey", "registries", "nexus"])
def test_mirror_password_key_cannot_name_own_setting(name: str) -> None:
    message = only_problem(mirror_stack({"username": "robot", "passwordKey": name}))

    assert "is a setting of nexus-mirror itself" in message


@pytest.mark.parametrize("name", ["", "has space", "1starts-with-digit", 7, "x" * 101])
def test_mirror_password_key_must_be_key_name(name: Any) -> None:
    message = only_problem(mirror_stack({"username": "robot", "passwordKey": name}))

    assert message.startswith('nexus-mirror:registries["ghcr.io"].mirrors[0].passwordKey: ')
    assert "must name a config key" in message


def test_mirror_password_inline_rejected_with_suggested_key() -> None:
    message = only_problem(mirror_stack({"username": "robot", "password": PASSWORD}))

    assert message.startswith(
        'nexus-mirror:registries["ghcr.io"].mirrors[0].password: a password must not be stored'
    )
    assert "pulumi config set --secret nexus-mirror:ghcrIoMirror0Password" in message
    assert "passwordKey: ghcrIoMirror0Password" in message
    assert PASSWORD not in message


def test_mirror_password_inline_never_shown_in_secret_registries() -> None:
    found = problems(mirror_stack({"username": "robot", "password": PASSWORD}), frozenset())
    found += problems(
        mirror_stack({"username": "robot", "password": PASSWORD}), frozenset({"registries"})
    )

    assert all(PASSWORD not in message for message in found)


def test_mirror_username_without_password_key() -> None:
    message = only_problem(mirror_stack({"username": "robot"}))

    assert message.startswith('nexus-mirror:registries["ghcr.io"].mirrors[0].username: ')
    assert "passwordKey: ghcrIoMirror0Password" in message


def test_mirror_password_key_without_username() -> None:
    message = only_problem(mirror_stack({"passwordKey": "pw"}, pw="x"), frozenset({"pw"}))

    assert "a password needs a user name" in message


def test_authorization_header_beside_username_rejected() -> None:
    mirror = {"username": "robot", "passwordKey": "pw", "headers": {"authorization": "Bearer x"}}

    found = problems(mirror_stack(mirror, pw="x"), frozenset({"pw"}))

    assert any("two Authorization headers would be sent" in message for message in found), found
    assert all("Bearer x" not in message for message in found)


def test_mirror_auth_config_without_managed_config_file() -> None:
    values = mirror_stack(
        {"username": "robot", "passwordKey": "pw", "auth": "config"},
        pw="x",
        containerd={"manageConfigFile": False},
    )

    message = only_problem(values, frozenset({"pw"}))

    assert message.startswith("nexus-mirror:containerd.manageConfigFile: auth: config writes")
    assert "cache.internal" in message
    assert "n1" in message


def test_config_auth_same_host_other_credentials_rejected() -> None:
    values = {
        "registries": {
            "ghcr.io": {
                "mirrors": [
                    {"url": "https://cache.internal/a", "username": "u", "passwordKey": "one"}
                ]
            },
            "quay.io": {
                "mirrors": [
                    {"url": "https://cache.internal/b", "username": "u", "passwordKey": "two"}
                ]
            },
        },
        "nodes": NODES,
        "one": "x",
        "two": "y",
    }
    for mirror in (values["registries"]["ghcr.io"], values["registries"]["quay.io"]):
        mirror["mirrors"][0]["auth"] = "config"

    message = only_problem(values, frozenset({"one", "two"}))

    assert message.startswith('nexus-mirror:registries["quay.io"].mirrors[0].auth: config.toml')
    assert "cache.internal" in message
    assert "(values not shown)" in message


def test_config_auth_same_host_same_credentials_one_table() -> None:
    values = {
        "registries": {
            name: {
                "mirrors": [
                    {
                        "url": f"https://cache.internal/{name}",
                        "username": "u",
                        "passwordKey": "pw",
                        "auth": "config",
                    }
                ]
            }
            for name in ("ghcr.io", "quay.io")
        },
        "nodes": NODES,
        "pw": "x",
    }

    config = parse_config(values, frozenset({"pw"}))

    [table] = config_auth_tables(config.namespaces)
    assert (table.host, table.username, table.password) == ("cache.internal", "u", "x")


# --- client certificates -------------------------------------------------------------


def test_nexus_client_certificate_files() -> None:
    values = nexus_stack({"clientCertPem": CERT}, nexusClientKeyPem=KEY)

    config = parse_config(values, frozenset({"nexusClientKeyPem"}))

    namespace = config.namespaces[0]
    assert host_of(config).client == (("nexus-client.pem", "nexus-client.key"),)
    files = render_files(namespace)
    assert files["nexus-client.pem"] == CERT
    assert files["nexus-client.key"] == KEY
    modes = file_modes(namespace)
    assert modes["nexus-client.key"] == "0600"
    assert modes["nexus-client.pem"] == "0644"
    assert modes["hosts.toml"] == "0644"


def test_mirror_client_certificate_after_paths() -> None:
    mirror = {
        "client": "/etc/pki/both.pem",
        "clientCertPem": CERT,
        "clientKeyPemKey": "cacheKey",
    }

    config = parse_config(mirror_stack(mirror, cacheKey=KEY), frozenset({"cacheKey"}))

    assert host_of(config, "ghcr.io").client == (
        ("/etc/pki/both.pem", ""),
        ("mirror-0-client.pem", "mirror-0-client.key"),
    )


def test_client_certificate_without_key() -> None:
    message = only_problem(mirror_stack({"clientCertPem": CERT}))

    assert "a client certificate needs its private key" in message
    assert "clientKeyPemKey: ghcrIoMirror0ClientKey" in message
    assert "< client.key" in message


def test_client_key_without_certificate() -> None:
    message = only_problem(nexus_stack(nexusClientKeyPem=KEY), frozenset({"nexusClientKeyPem"}))

    assert message.startswith("nexus-mirror:nexus.clientCertPem: is not set")


def test_client_key_in_plain_text() -> None:
    message = only_problem(nexus_stack({"clientCertPem": CERT}, nexusClientKeyPem=KEY))

    assert message == (
        "nexus-mirror:nexusClientKeyPem: is stored in plain text (value not shown). "
        "Store it encrypted: pulumi config set --secret nexus-mirror:nexusClientKeyPem < client.key"
    )


def test_client_key_inline_rejected() -> None:
    message = only_problem(mirror_stack({"clientCertPem": CERT, "clientKeyPem": KEY}))

    assert "clientKeyPem: a private key must not be stored" in message
    assert "MIGHkey" not in message


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("not a key", "is not a PEM private key"),
        (CERT, "is not a PEM private key"),
        ("-----BEGIN PRIVATE KEY-----\nMIGH\n", "is not a PEM private key"),
        (
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nx\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "encrypted private key",
        ),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nx\n-----END RSA PRIVATE KEY-----\n",
            "encrypted private key",
        ),
    ],
)
def test_client_key_checked(key: str, problem: str) -> None:
    values = nexus_stack({"clientCertPem": CERT}, nexusClientKeyPem=key)

    message = only_problem(values, frozenset({"nexusClientKeyPem"}))

    assert message.startswith("nexus-mirror:nexusClientKeyPem: ")
    assert problem in message
    assert "value not shown" in message


def test_client_certificate_must_be_certificate() -> None:
    values = nexus_stack({"clientCertPem": KEY}, nexusClientKeyPem=KEY)

    message = only_problem(values, frozenset({"nexusClientKeyPem"}))

    assert message.startswith("nexus-mirror:nexus.clientCertPem: must hold PEM certificates")


@pytest.mark.parametrize("accepted", [KEY, KEY.replace("PRIVATE", "EC PRIVATE"), KEY.rstrip()])
def test_client_key_forms_accepted(accepted: str) -> None:
    values = nexus_stack({"clientCertPem": CERT}, nexusClientKeyPem=accepted)

    config = parse_config(values, frozenset({"nexusClientKeyPem"}))

    assert render_files(config.namespaces[0])["nexus-client.key"].endswith("-----\n")


# --- rendering and node input ------------------------------------------------------


def test_authorization_header_is_basic() -> None:
    header = authorization_header(Credentials("robot", 'pa"ss:wörd'))

    assert header == "Basic " + base64.b64encode('robot:pa"ss:wörd'.encode()).decode()


def test_credentials_repr_hides_password() -> None:
    assert PASSWORD not in repr(Credentials("robot", PASSWORD))


@pytest.mark.parametrize(
    ("namespace", "index", "expected"),
    [
        ("ghcr.io", 0, "ghcrIoMirror0Password"),
        ("registry.internal:5000", 2, "registryInternal5000Mirror2Password"),
        ("_default", 1, "defaultMirror1Password"),
        ("10.0.0.5:5000", 0, "registry100055000Mirror0Password"),
    ],
)
def test_suggested_key_names(namespace: str, index: int, expected: str) -> None:
    name = suggested_key(namespace, index, "Password")

    assert name == expected
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", name)


def header_stack() -> Any:
    return parse_config(
        nexus_stack({"username": "robot"}, nexusPassword=PASSWORD, verify={"image": "nginx"}),
        frozenset({"nexusPassword"}),
    )


def config_auth_stack() -> Any:
    values = nexus_stack(
        {"username": "robot", "auth": "config", "caPem": CERT},
        nexusPassword=PASSWORD,
        verify={"image": "nginx"},
    )
    return parse_config(values, frozenset({"nexusPassword"}))


def test_header_hosts_toml_is_private() -> None:
    config = header_stack()
    namespace = config.namespaces[0]

    assert namespace.holds_credentials is True
    assert file_modes(namespace)["hosts.toml"] == "0600"
    host = tomllib.loads(render_hosts_toml(namespace))["host"]["https://nexus.example.net:8082"]
    token = base64.b64encode(f"robot:{PASSWORD}".encode()).decode()
    assert host["header"] == {"Authorization": f"Basic {token}"}


def test_header_hosts_input_is_secret() -> None:
    config = header_stack()

    node_input = hosts_input(config.nodes[0], config)

    assert node_input.secret is True
    assert "nm_file docker.io hosts.toml 0600 <<" in node_input.text
    assert "nm_probe_auth <<" in node_input.text
    assert "nm_verify_file docker.io <<" not in node_input.text
    assert config_input(config.nodes[0], config).secret is False


def test_config_auth_inputs() -> None:
    config = config_auth_stack()

    config_text = config_input(config.nodes[0], config)
    hosts = hosts_input(config.nodes[0], config)

    assert config_text.secret is True
    assert f"nm_config_auth nexus.example.net:8082 robot <<'NEXUS_MIRROR_EOF_1'\n{PASSWORD}\n" in (
        config_text.text
    )
    assert hosts.secret is True
    assert "Authorization" not in hosts.files["docker.io/hosts.toml"]
    assert "nm_file docker.io hosts.toml 0644 <<" in hosts.text
    assert "nm_probe_auth <<" in hosts.text


def test_config_auth_verify_file_for_ctr() -> None:
    config = config_auth_stack()

    text = hosts_input(config.nodes[0], config).text

    start = text.index("nm_verify_file docker.io <<'")
    delimiter = text[start:].split("'")[1]
    body = text[start:].split("\n", 1)[1].split(f"\n{delimiter}\n", 1)[0]
    host = tomllib.loads(body)["host"]["https://nexus.example.net:8082"]
    assert host["ca"] == "/etc/containerd/certs.d/docker.io/nexus-ca.pem"
    assert host["header"]["Authorization"].startswith("Basic ")


def test_no_verify_file_without_verify_image() -> None:
    values = nexus_stack({"username": "robot", "auth": "config"}, nexusPassword=PASSWORD)
    config = parse_config(values, frozenset({"nexusPassword"}))

    assert "nm_verify_file docker.io <<" not in hosts_input(config.nodes[0], config).text


def test_probe_uses_absolute_client_paths() -> None:
    config = parse_config(
        nexus_stack({"clientCertPem": CERT}, nexusClientKeyPem=KEY),
        frozenset({"nexusClientKeyPem"}),
    )

    text = hosts_input(config.nodes[0], config).text

    base = "/etc/containerd/certs.d/docker.io"
    assert f"{base}/nexus-client.pem {base}/nexus-client.key" in text
    assert "nm_file docker.io nexus-client.key 0600 <<" in text
    assert "nm_file docker.io nexus-client.pem 0644 <<" in text


def test_no_credentials_leave_inputs_plain() -> None:
    config = parse_config(nexus_stack(), frozenset())

    assert hosts_input(config.nodes[0], config).secret is False
    assert config_input(config.nodes[0], config).secret is False
    assert config.namespaces[0].holds_credentials is False


def test_secrets_never_in_any_message() -> None:
    cases = [
        (nexus_stack({"username": "ro:bot"}, nexusPassword=PASSWORD), {"nexusPassword"}),
        (nexus_stack({"username": "robot", "password": PASSWORD}), set()),
        (nexus_stack({"username": "robot"}, nexusPassword=PASSWORD), set()),
        (nexus_stack(nexusPassword=PASSWORD), {"nexusPassword"}),
        (mirror_stack({"password": PASSWORD}), set()),
        (mirror_stack({"username": "u", "passwordKey": "k"}, k=PASSWORD), set()),
        (mirror_stack({"clientCertPem": CERT, "clientKeyPemKey": "k"}, k=PASSWORD), {"k"}),
    ]
    for values, secrets in cases:
        for message in problems(values, frozenset(secrets)):
            assert PASSWORD not in message, message
