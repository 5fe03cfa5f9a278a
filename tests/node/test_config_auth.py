"""Registry credentials in the node script: config.toml auth tables and probe headers.

The patcher cases run ``patch-config FILE VERSION CONFIG_PATH AUTH_FILE`` for
containerd 1.6 and 2.x. The config mode cases run the real generated input
(``config_input`` of a parsed stack config) against stand-ins for containerd
2.1 and its ctr, and the probe cases run hosts mode against a small HTTP
server that checks Basic credentials. Real containerd 1.6 is covered end to
end in tests/e2e/test_tls_auth.py.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import shlex
import socket
import stat
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.config import parse_config
from components.node_script import config_input, hosts_input

SCRIPT = Path(__file__).resolve().parents[2] / "components" / "node" / "nexus-mirror-node.sh"
SHELL = shlex.split(os.environ.get("NM_TEST_SHELL", "sh"))
CERTS = "/etc/containerd/certs.d"
V1_SECTION = "plugins.cri.registry"
V2_SECTION = 'plugins."io.containerd.grpc.v1.cri".registry'
V3_SECTION = 'plugins."io.containerd.cri.v1.images".registry'
MARKER = "# Managed by nexus-mirror: credentials for "
PASSWORD = 'pa"ss\\wörd'


def patch(
    tmp_path: Path,
    content: str | None,
    tables: list[tuple[str, str, str]],
    version: str = "1.6.20",
) -> subprocess.CompletedProcess[str]:
    """Run patch-config with auth tables (host, user, password); content None is no file."""
    file = tmp_path / "config.toml"
    if content is not None:
        file.write_text(content)
    auth = tmp_path / "auth.tsv"
    auth.write_text("".join(f"{h}\t{u}\t{p}\n" for h, u, p in tables))
    return subprocess.run(
        [*SHELL, str(SCRIPT), "patch-config", str(file), version, CERTS, str(auth)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def patched(tmp_path: Path, content: str | None, tables: list, version: str = "1.6.20") -> str:
    result = patch(tmp_path, content, tables, version)
    assert result.returncode == 0, result.stderr
    return result.stdout


def table(document: dict[str, Any], section: str, host: str) -> dict[str, Any]:
    """Return registry.configs.<host>.auth of a parsed config.toml; section as in a header."""
    node = document
    nested = tomllib.loads(f"[{section}]\n")
    while nested:
        [(key, nested)] = nested.items()
        node = node[key]
    return dict(node["configs"][host]["auth"])


# --- the patcher -------------------------------------------------------------


def test_missing_file_gets_auth_table(tmp_path: Path) -> None:
    out = patched(tmp_path, None, [("nexus.example:8082", "robot", "pw")])

    assert out == (
        f'version = 2\n\n[{V2_SECTION}]\n  config_path = "{CERTS}"\n\n'
        f"{MARKER}nexus.example:8082 (rewritten on every apply)\n"
        f'[{V2_SECTION}.configs."nexus.example:8082".auth]\n'
        '  username = "robot"\n  password = "pw"\n'
    )


def test_containerd_2_writes_version_3_table(tmp_path: Path) -> None:
    out = patched(tmp_path, None, [("nexus.example:8082", "robot", "pw")], version="2.1.0")

    document = tomllib.loads(out)
    assert document["version"] == 3
    assert table(document, V3_SECTION, "nexus.example:8082") == {
        "username": "robot",
        "password": "pw",
    }


def test_v2_file_on_containerd_2_kept(tmp_path: Path) -> None:
    source = f'version = 2\n[{V2_SECTION}]\n  config_path = "{CERTS}"\n'

    out = patched(tmp_path, source, [("n:1", "u", "p")], version="2.0.0")

    assert table(tomllib.loads(out), V2_SECTION, "n:1") == {"username": "u", "password": "p"}


def test_version_1_file_uses_plugins_cri(tmp_path: Path) -> None:
    source = f'[{V1_SECTION}]\n  config_path = "{CERTS}"\n'

    out = patched(tmp_path, source, [("n:1", "u", "p")])

    assert table(tomllib.loads(out), V1_SECTION, "n:1") == {"username": "u", "password": "p"}


def test_password_is_quoted(tmp_path: Path) -> None:
    out = patched(tmp_path, None, [("n:1", "robot", PASSWORD)])

    assert table(tomllib.loads(out), V2_SECTION, "n:1")["password"] == PASSWORD


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    source = f'version = 2\nroot = "/var/lib/c"\n\n[{V2_SECTION}]\n  config_path = "{CERTS}"\n'
    tables = [("b.example:5000", "u2", "p2"), ("a.example:5000", "u1", "p1")]
    first = patched(tmp_path, source, tables)

    second = patched(tmp_path, first, tables)

    assert second == first
    assert first.startswith(source)
    assert first.count(MARKER) == 2


def test_new_password_replaces_table(tmp_path: Path) -> None:
    first = patched(tmp_path, None, [("n:1", "robot", "old")])

    second = patched(tmp_path, first, [("n:1", "robot", "new")])

    assert "old" not in second
    assert table(tomllib.loads(second), V2_SECTION, "n:1")["password"] == "new"
    assert second.count(MARKER) == 1


def test_no_tables_removes_managed_ones(tmp_path: Path) -> None:
    source = f'version = 2\n\n[{V2_SECTION}]\n  config_path = "{CERTS}"\n'
    with_auth = patched(tmp_path, source, [("n:1", "robot", "pw"), ("m:2", "robot", "pw")])

    out = patched(tmp_path, with_auth, [])

    assert out == source


def test_tables_of_others_are_kept(tmp_path: Path) -> None:
    own = f'[{V2_SECTION}.configs."other.example".auth]\n  username = "theirs"\n'
    source = f'version = 2\n\n[{V2_SECTION}]\n  config_path = "{CERTS}"\n\n{own}'

    out = patched(tmp_path, patched(tmp_path, source, [("n:1", "robot", "pw")]), [])

    assert out == source


def test_user_table_for_same_host_rejected(tmp_path: Path) -> None:
    source = f'version = 2\n[{V2_SECTION}.configs."n:1".auth]\n  username = "theirs"\n'

    result = patch(tmp_path, source, [("n:1", "robot", "pw")])

    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert 'registry.configs."n:1".auth on line 2' in last
    assert "use auth: header" in last
    assert result.stdout == ""


@pytest.mark.parametrize(
    "lines",
    [
        '[{section}.configs."n:1"]\n  auth = {{ username = "theirs" }}\n',
        '[{section}.configs."n:1"]\n  auth.username = "theirs"\n',
        '[{section}.configs]\n  "n:1" = {{ auth = {{ username = "theirs" }} }}\n',
    ],
)
def test_user_auth_in_other_forms_rejected(tmp_path: Path, lines: str) -> None:
    source = "version = 2\n" + lines.format(section=V2_SECTION)

    result = patch(tmp_path, source, [("n:1", "robot", "pw")])

    assert result.returncode == 1, result.stdout
    assert 'registry.configs."n:1".auth' in result.stderr


def test_marker_before_foreign_table_drops_only_marker(tmp_path: Path) -> None:
    source = f"version = 2\n{MARKER}n:1 (rewritten on every apply)\n[plugins.x]\n  a = 1\n"

    out = patched(tmp_path, source, [])

    assert out == "version = 2\n[plugins.x]\n  a = 1\n" + (
        f'\n[{V2_SECTION}]\n  config_path = "{CERTS}"\n'
    )


# --- config and config-delete modes with stand-ins for containerd 2.1 ----------

FAKE_CONTAINERD_2 = """\
#!/bin/sh
# Stand-in for containerd 2.1. Its config dump prints the file itself.
case $1 in
--version) echo "containerd github.com/containerd/containerd/v2 v2.1.0 0123abcd" ;;
-c) cat "$2" ;;
*) exit 2 ;;
esac
"""
FAKE_CTR_2 = """\
#!/bin/sh
echo "TYPE                  ID        PLATFORMS      STATUS"
echo "io.containerd.cri.v1  images    -              ok"
echo "io.containerd.grpc.v1 cri       linux/amd64    ok"
"""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The containerd block of a node whose containerd and ctr are stand-ins for 2.1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("containerd", FAKE_CONTAINERD_2), ("ctr", FAKE_CTR_2)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    sock = tmp_path / "c.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    restarts = tmp_path / "restarts"
    yield {
        "configPath": str(tmp_path / "certs.d"),
        "configFile": str(tmp_path / "etc" / "config.toml"),
        "stateDir": str(tmp_path / "state"),
        "address": str(sock),
        "binDir": str(bin_dir),
        "restartTimeout": 10,
        "logCommand": "true",
        # A restarted containerd binds its socket again, so the socket gets a
        # later mtime after a pause longer than the timestamp step.
        "restartCommand": (
            f"echo restart >>{shlex.quote(str(restarts))}; sleep 0.1; "
            f"touch {shlex.quote(str(sock))}"
        ),
    }
    listener.close()


def stack(containerd: dict[str, Any], auth: str = "config", password: str = "pw-1") -> Any:
    values = {
        "nexus": {"url": "https://nexus.example.net", "username": "robot", "auth": auth},
        "nexusPassword": password,
        "registries": {"docker.io": {"nexus": {"port": 8082}}},
        "nodes": [{"name": "test-node", "host": "127.0.0.1", "containerd": containerd}],
        "sshPrivateKey": "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n",
    }
    return parse_config(values, frozenset({"nexusPassword", "sshPrivateKey"}))


def run_mode(mode: str, text: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        [*SHELL, "-s", "--", mode],
        input=text,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def restart_count(containerd: dict[str, Any]) -> int:
    path = Path(containerd["stateDir"]).parent / "restarts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_config_mode_writes_credentials_0600(node: dict[str, Any]) -> None:
    config = stack(node)
    config_file = Path(node["configFile"])

    first = report(run_mode("config", config_input(config.nodes[0], config).text))

    assert first["restarted"] is True
    assert "with registry credentials for nexus.example.net:8082" in first["message"]
    assert (
        "containerd 2.1.0 reads them but marks registry.configs as deprecated" in first["message"]
    )
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    auth = table(tomllib.loads(config_file.read_text()), V3_SECTION, "nexus.example.net:8082")
    assert auth == {"username": "robot", "password": "pw-1"}
    assert restart_count(node) == 1

    again = report(run_mode("config", config_input(config.nodes[0], config).text))

    assert again["restarted"] is False
    assert restart_count(node) == 1


def test_config_mode_new_password_restarts_once(node: dict[str, Any]) -> None:
    first = stack(node, password="pw-1")
    report(run_mode("config", config_input(first.nodes[0], first).text))
    second = stack(node, password="pw-2")

    result = report(run_mode("config", config_input(second.nodes[0], second).text))

    assert result["restarted"] is True
    assert restart_count(node) == 2
    backup = Path(node["stateDir"]) / "config.toml.bak"
    assert "pw-1" in backup.read_text()
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600


def test_config_mode_never_prints_password(node: dict[str, Any]) -> None:
    config = stack(node, password="do-not-print-me")

    result = run_mode("config", config_input(config.nodes[0], config).text)

    assert result.returncode == 0, result.stderr
    assert "do-not-print-me" not in result.stdout + result.stderr


def test_config_mode_protects_unchanged_file(node: dict[str, Any]) -> None:
    config = stack(node)
    report(run_mode("config", config_input(config.nodes[0], config).text))
    config_file = Path(node["configFile"])
    config_file.chmod(0o644)

    result = report(run_mode("config", config_input(config.nodes[0], config).text))

    assert result["restarted"] is False
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600


def test_header_auth_leaves_config_toml_alone(node: dict[str, Any]) -> None:
    config = stack(node, auth="header")
    node_input = config_input(config.nodes[0], config)

    result = report(run_mode("config", node_input.text))

    assert node_input.secret is False
    assert "nm_config_auth" not in node_input.text.split("\nNM_NODE=", 1)[1]
    assert "robot" not in Path(node["configFile"]).read_text()
    assert "credentials" not in result["message"]


def test_config_delete_removes_credentials(node: dict[str, Any]) -> None:
    config = stack(node)
    text = config_input(config.nodes[0], config).text
    report(run_mode("config", text))

    result = report(run_mode("config-delete", text))

    content = Path(node["configFile"]).read_text()
    assert "registry.configs" not in content
    assert "robot" not in content
    assert f'config_path = "{node["configPath"]}"' in content
    assert result["restarted"] is True
    assert "removed the registry credentials" in result["message"]
    assert restart_count(node) == 2

    again = report(run_mode("config-delete", text))

    assert again["restarted"] is False
    assert "nothing changed" in again["message"]
    assert restart_count(node) == 2


def test_config_auth_rejects_control_characters(node: dict[str, Any]) -> None:
    config = stack(node)
    text = config_input(config.nodes[0], config).text
    # The tail is generated from validated config. A hand-made one with a tab
    # in the password is rejected before anything is written.
    broken = text.replace("\npw-1\n", "\npw\t1\n")
    assert broken != text

    result = run_mode("config", broken)

    assert result.returncode == 1
    assert "contain a control character" in result.stderr
    assert not Path(node["configFile"]).exists()


# --- probes with credentials ---------------------------------------------------


class _BasicAuthHandler(http.server.BaseHTTPRequestHandler):
    expected = ""

    def do_GET(self) -> None:  # noqa: N802 (the http.server method name)
        ok = self.headers.get("Authorization") == self.expected
        self.send_response(200 if ok else 401)
        if not ok:
            self.send_header("WWW-Authenticate", 'Basic realm="test"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def basic_auth_registry() -> Iterator[int]:
    """A registry stand-in on loopback that returns 200 for robot:pw-1 and 401 otherwise."""
    handler = type("Handler", (_BasicAuthHandler,), {})
    handler.expected = "Basic " + base64.b64encode(b"robot:pw-1").decode()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def probe_stack(tmp_path: Path, port: int, password: str, auth: str) -> Any:
    values = {
        "nexus": {"url": "http://127.0.0.1", "username": "robot", "auth": auth},
        "nexusPassword": password,
        "registries": {"docker.io": {"nexus": {"port": port}}},
        "nodes": [
            {
                "name": "test-node",
                "host": "127.0.0.1",
                "containerd": {
                    "configPath": str(tmp_path / "certs.d"),
                    "stateDir": str(tmp_path / "state"),
                    "address": str(tmp_path / "none.sock"),
                },
            }
        ],
    }
    return parse_config(values, frozenset({"nexusPassword"}))


@pytest.mark.parametrize("auth", ["header", "config"])
def test_probe_accepts_right_credentials(
    tmp_path: Path, basic_auth_registry: int, auth: str
) -> None:
    config = probe_stack(tmp_path, basic_auth_registry, "pw-1", auth)

    result = report(run_mode("hosts", hosts_input(config.nodes[0], config).text))

    [mirror] = result["mirrors"]
    assert mirror["status"] == 200
    assert mirror["credentials"] == "accepted"
    assert "rejected" not in result["message"]


@pytest.mark.parametrize("auth", ["header", "config"])
def test_probe_reports_rejected_credentials(
    tmp_path: Path, basic_auth_registry: int, auth: str
) -> None:
    config = probe_stack(tmp_path, basic_auth_registry, "wrong", auth)

    result = run_mode("hosts", hosts_input(config.nodes[0], config).text)

    [mirror] = report(result)["mirrors"]
    assert mirror["status"] == 401
    assert mirror["up"] is True
    assert mirror["credentials"] == "rejected"
    assert "1 of 1 mirrors rejected the configured credentials" in report(result)["message"]
    assert "wrong" not in result.stderr


def test_header_hosts_toml_is_0600(tmp_path: Path, basic_auth_registry: int) -> None:
    config = probe_stack(tmp_path, basic_auth_registry, "pw-1", "header")

    report(run_mode("hosts", hosts_input(config.nodes[0], config).text))

    hosts_toml = tmp_path / "certs.d" / "docker.io" / "hosts.toml"
    assert stat.S_IMODE(hosts_toml.stat().st_mode) == 0o600
    header = tomllib.loads(hosts_toml.read_text())["host"][
        f"http://127.0.0.1:{basic_auth_registry}"
    ]
    assert header["header"]["Authorization"] == "Basic " + base64.b64encode(b"robot:pw-1").decode()
