"""Tests that run the node script for real, as root, inside a temporary directory.

The script reads itself and a generated tail from stdin, as on a node. The tail
is built here by ``node_input`` in the format the Pulumi program uses: NM_*
settings as single-quoted words, one ``nm_file`` here-document per managed
file, ``nm_probe`` lines, then ``nm_main "$@" </dev/null``.

hosts and delete tests set NM_MANAGE_CONFIG=false and need no daemon. config
tests start their own containerd with its own root, state directory, socket
and config.toml under tmp_path. Their restart command is a script that stops
that containerd by its pid file and starts it again detached. Set NM_TEST_SHELL to run the
script with another POSIX shell (for example ``busybox sh``).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "components" / "node" / "nexus-mirror-node.sh"
SHELL = shlex.split(os.environ.get("NM_TEST_SHELL", "sh"))
NODE = "test-node"
V2_SECTION = '[plugins."io.containerd.grpc.v1.cri".registry]'


@dataclass
class StagedFile:
    namespace: str
    name: str
    content: str
    mode: str = "0644"


@dataclass
class Probe:
    namespace: str
    host_url: str
    probe_url: str
    skip_verify: bool = False
    ca: str = ""
    cert: str = ""
    key: str = ""


@dataclass
class Settings:
    config_path: Path
    config_file: Path
    state_dir: Path
    address: Path
    manage_config: bool = False
    restart_command: str = "false"
    restart_timeout: int = 20
    log_command: str = ""
    bin_dir: str = ""
    verify_image: str = ""


def node_input(settings: Settings, files: list[StagedFile], probes: list[Probe]) -> bytes:
    """Return the script followed by the generated tail, as the Pulumi program sends it."""
    values = {
        "NM_NODE": NODE,
        "NM_CONFIG_PATH": str(settings.config_path),
        "NM_CONFIG_FILE": str(settings.config_file),
        "NM_MANAGE_CONFIG": "true" if settings.manage_config else "false",
        "NM_RESTART_COMMAND": settings.restart_command,
        "NM_RESTART_TIMEOUT": str(settings.restart_timeout),
        "NM_LOG_COMMAND": settings.log_command,
        "NM_ADDRESS": str(settings.address),
        "NM_BIN_DIR": settings.bin_dir,
        "NM_STATE_DIR": str(settings.state_dir),
        "NM_VERIFY_IMAGE": settings.verify_image,
    }
    lines = [f"{name}={shlex.quote(value)}" for name, value in values.items()]
    for number, staged in enumerate(files, start=1):
        assert staged.content.endswith("\n")
        words = ["nm_file", staged.namespace, staged.name, staged.mode]
        delimiter = f"NEXUS_MIRROR_EOF_{number}"
        lines.append(" ".join(shlex.quote(w) for w in words) + f" <<'{delimiter}'")
        lines.append(staged.content + delimiter)
    for probe in probes:
        words = [
            "nm_probe",
            probe.namespace,
            probe.host_url,
            probe.probe_url,
            "true" if probe.skip_verify else "false",
            probe.ca,
            probe.cert,
            probe.key,
        ]
        lines.append(" ".join(shlex.quote(w) for w in words))
    lines.append('nm_main "$@" </dev/null')
    return SCRIPT.read_bytes() + b"\n" + "\n".join(lines).encode() + b"\n"


def clean_env() -> dict[str, str]:
    """Return the environment without proxy settings, so probes stay on loopback."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PATH"] = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return env


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict:
        lines = self.stdout.strip().splitlines()
        assert len(lines) == 1, f"expected one JSON line on stdout, got {self.stdout!r}"
        return json.loads(lines[0])

    @property
    def last_error(self) -> str:
        return self.stderr.rstrip("\n").splitlines()[-1]


def run_script(
    mode: str,
    settings: Settings,
    files: list[StagedFile] | None = None,
    probes: list[Probe] | None = None,
    timeout: float = 120,
) -> Run:
    result = subprocess.run(
        [*SHELL, "-s", "--", mode],
        input=node_input(settings, files or [], probes or []),
        capture_output=True,
        env=clean_env(),
        timeout=timeout,
        check=False,
    )
    return Run(result.returncode, result.stdout.decode(), result.stderr.decode())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def actions(report: dict) -> list[tuple[str, str]]:
    return [(entry["path"], entry["action"]) for entry in report["files"]]


@pytest.fixture
def hosts_settings(tmp_path: Path) -> Settings:
    return Settings(
        config_path=tmp_path / "etc" / "certs.d",
        config_file=tmp_path / "etc" / "config.toml",
        state_dir=tmp_path / "state",
        address=tmp_path / "no-containerd.sock",
    )


HOSTS_TOML = """\
server = "https://registry-1.docker.io"

[host."https://nexus.example.net:8082"]
  capabilities = ["pull", "resolve"]
  ca = "nexus-ca.pem"
"""
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def docker_files() -> list[StagedFile]:
    return [
        StagedFile("docker.io", "hosts.toml", HOSTS_TOML),
        StagedFile("docker.io", "nexus-ca.pem", CA_PEM),
        StagedFile("docker.io", "client.key", "-----BEGIN PRIVATE KEY-----\nx\n", "0600"),
    ]


# --- hosts and delete modes ------------------------------------------------


def test_hosts_writes_files_with_modes(hosts_settings: Settings) -> None:
    run = run_script("hosts", hosts_settings, docker_files())

    assert run.returncode == 0, run.stderr
    directory = hosts_settings.config_path / "docker.io"
    assert (directory / "hosts.toml").read_text() == HOSTS_TOML
    assert (directory / "nexus-ca.pem").read_text() == CA_PEM
    assert mode_of(directory / "hosts.toml") == 0o644
    assert mode_of(directory / "client.key") == 0o600
    assert (directory / "hosts.toml").stat().st_uid == 0
    assert mode_of(directory) == 0o755
    assert mode_of(hosts_settings.config_path) == 0o755
    assert mode_of(hosts_settings.state_dir) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == [
        "client.key",
        "hosts.toml",
        "nexus-ca.pem",
    ]
    report = run.report
    assert report["changed"] is True
    assert {entry["action"] for entry in report["files"]} == {"written"}
    for entry in report["files"]:
        assert entry["sha256"] == sha256(Path(entry["path"]))


def test_hosts_manifest_lists_files_and_dirs(hosts_settings: Settings) -> None:
    run = run_script("hosts", hosts_settings, docker_files())

    assert run.returncode == 0, run.stderr
    manifest = (hosts_settings.state_dir / "managed").read_text().splitlines()
    directory = hosts_settings.config_path / "docker.io"
    assert f"dir {hosts_settings.config_path}" in manifest
    assert f"dir {directory}" in manifest
    assert f"dir {hosts_settings.config_path.parent}" in manifest
    assert f"{sha256(directory / 'hosts.toml')} {directory / 'hosts.toml'}" in manifest
    assert len(manifest) == 6
    assert mode_of(hosts_settings.state_dir / "managed") == 0o600


def test_hosts_replaces_changed_file_by_rename(hosts_settings: Settings) -> None:
    run_script("hosts", hosts_settings, docker_files())
    target = hosts_settings.config_path / "docker.io" / "hosts.toml"
    inode_before = target.stat().st_ino
    files = docker_files()
    files[0] = StagedFile("docker.io", "hosts.toml", HOSTS_TOML + "# changed\n")

    run = run_script("hosts", hosts_settings, files)

    assert run.returncode == 0, run.stderr
    assert target.read_text() == HOSTS_TOML + "# changed\n"
    assert target.stat().st_ino != inode_before
    assert (str(target), "written") in actions(run.report)
    assert not [p for p in target.parent.iterdir() if "nexus-mirror" in p.name]


def test_hosts_second_run_unchanged(hosts_settings: Settings) -> None:
    run_script("hosts", hosts_settings, docker_files())
    manifest_before = (hosts_settings.state_dir / "managed").read_bytes()

    run = run_script("hosts", hosts_settings, docker_files())

    assert run.returncode == 0, run.stderr
    report = run.report
    assert report["changed"] is False
    assert [entry["action"] for entry in report["files"]] == ["unchanged"] * 3
    assert "nothing changed" in report["message"]
    assert (hosts_settings.state_dir / "managed").read_bytes() == manifest_before


def test_hosts_restores_wrong_mode(hosts_settings: Settings) -> None:
    run_script("hosts", hosts_settings, docker_files())
    key = hosts_settings.config_path / "docker.io" / "client.key"
    key.chmod(0o644)

    run = run_script("hosts", hosts_settings, docker_files())

    assert run.returncode == 0, run.stderr
    assert mode_of(key) == 0o600
    assert (str(key), "written") in actions(run.report)


def test_existing_hosts_toml_backed_up_and_restored(hosts_settings: Settings) -> None:
    directory = hosts_settings.config_path / "docker.io"
    directory.mkdir(parents=True)
    original = b'server = "https://mirror.internal"\n'
    target = directory / "hosts.toml"
    target.write_bytes(original)
    target.chmod(0o640)

    applied = run_script("hosts", hosts_settings, docker_files())

    assert applied.returncode == 0, applied.stderr
    backup = hosts_settings.state_dir / "backup" / "docker.io" / "hosts.toml"
    assert backup.read_bytes() == original
    assert target.read_text() == HOSTS_TOML

    deleted = run_script("delete", hosts_settings, docker_files())

    assert deleted.returncode == 0, deleted.stderr
    assert target.read_bytes() == original
    assert mode_of(target) == 0o640
    assert not backup.exists()
    assert (str(target), "removed") in actions(deleted.report)
    assert (str(target), "restored") in actions(deleted.report)
    assert sorted(p.name for p in directory.iterdir()) == ["hosts.toml"]
    assert not (hosts_settings.state_dir / "managed").exists()


def test_delete_removes_created_dirs(hosts_settings: Settings) -> None:
    run_script("hosts", hosts_settings, docker_files())

    run = run_script("delete", hosts_settings, docker_files())

    assert run.returncode == 0, run.stderr
    assert run.report["mode"] == "delete"
    assert run.report["changed"] is True
    assert not hosts_settings.config_path.parent.exists()
    assert not (hosts_settings.state_dir / "managed").exists()
    again = run_script("delete", hosts_settings, docker_files())
    assert again.returncode == 0, again.stderr
    assert again.report["changed"] is False
    assert again.report["files"] == []


def test_removed_namespace_leaves_unmanaged_files(hosts_settings: Settings) -> None:
    config_path = hosts_settings.config_path
    quay = config_path / "quay.io"
    quay.mkdir(parents=True)
    (quay / "extra.crt").write_text("operator's certificate\n")
    unmanaged = config_path / "registry.local:5000"
    unmanaged.mkdir()
    (unmanaged / "hosts.toml").write_text('server = "http://registry.local:5000"\n')
    files = [
        *docker_files(),
        StagedFile("quay.io", "hosts.toml", 'server = "https://quay.io"\n'),
        StagedFile("ghcr.io", "hosts.toml", 'server = "https://ghcr.io"\n'),
    ]
    first = run_script("hosts", hosts_settings, files)
    assert first.returncode == 0, first.stderr

    run = run_script("hosts", hosts_settings, docker_files())

    assert run.returncode == 0, run.stderr
    assert (str(quay / "hosts.toml"), "removed") in actions(run.report)
    assert (str(config_path / "ghcr.io" / "hosts.toml"), "removed") in actions(run.report)
    assert sorted(p.name for p in quay.iterdir()) == ["extra.crt"]
    assert not (config_path / "ghcr.io").exists()
    assert (unmanaged / "hosts.toml").read_text() == 'server = "http://registry.local:5000"\n'
    assert (config_path / "docker.io" / "hosts.toml").read_text() == HOSTS_TOML
    manifest = (hosts_settings.state_dir / "managed").read_text()
    assert "quay.io" not in manifest
    assert "ghcr.io" not in manifest


def test_modified_managed_file_kept(hosts_settings: Settings) -> None:
    files = [*docker_files(), StagedFile("quay.io", "hosts.toml", 'server = "https://quay.io"\n')]
    run_script("hosts", hosts_settings, files)
    target = hosts_settings.config_path / "quay.io" / "hosts.toml"
    target.write_text('server = "https://quay.io"\n# edited by hand\n')

    run = run_script("hosts", hosts_settings, docker_files())

    assert run.returncode == 0, run.stderr
    assert target.read_text() == 'server = "https://quay.io"\n# edited by hand\n'
    assert (str(target), "kept-modified") in actions(run.report)
    assert "changed after nexus-mirror wrote it" in run.stderr
    manifest = (hosts_settings.state_dir / "managed").read_text().splitlines()
    assert not [line for line in manifest if line.endswith("quay.io/hosts.toml")]
    assert f"dir {target.parent}" in manifest
    deleted = run_script("delete", hosts_settings, docker_files())
    assert deleted.returncode == 0, deleted.stderr
    assert target.exists()


def test_hosts_dir_change_restores_both_originals(tmp_path: Path, hosts_settings: Settings) -> None:
    first_dir = hosts_settings.config_path / "docker.io"
    second_path = tmp_path / "other" / "certs.d"
    second_dir = second_path / "docker.io"
    for directory, text in [(first_dir, "# first original\n"), (second_dir, "# second original\n")]:
        directory.mkdir(parents=True)
        (directory / "hosts.toml").write_text(text)
    assert run_script("hosts", hosts_settings, docker_files()).returncode == 0
    hosts_settings.config_path = second_path

    moved = run_script("hosts", hosts_settings, docker_files())

    assert moved.returncode == 0, moved.stderr
    assert (first_dir / "hosts.toml").read_text() == "# first original\n"
    assert sorted(p.name for p in first_dir.iterdir()) == ["hosts.toml"]
    assert (second_dir / "hosts.toml").read_text() == HOSTS_TOML
    deleted = run_script("delete", hosts_settings, docker_files())
    assert deleted.returncode == 0, deleted.stderr
    assert (second_dir / "hosts.toml").read_text() == "# second original\n"
    assert (first_dir / "hosts.toml").read_text() == "# first original\n"


def test_hosts_report_is_valid_json(hosts_settings: Settings) -> None:
    run = run_script("hosts", hosts_settings, docker_files())

    assert run.returncode == 0, run.stderr
    report = run.report
    assert report["mode"] == "hosts"
    assert report["node"] == NODE
    assert report["containerdVersion"] == "1.6.20"
    assert report["configPath"] is None
    assert report["criPlugin"] is None
    assert report["mirrors"] == []
    assert report["verification"] is None
    assert isinstance(report["message"], str)
    assert set(report) == {
        "mode",
        "node",
        "containerdVersion",
        "configPath",
        "criPlugin",
        "changed",
        "files",
        "mirrors",
        "verification",
        "message",
    }


def test_hosts_report_escapes_odd_paths(tmp_path: Path) -> None:
    base = tmp_path / 'odd "dir" \\ tab\there é'
    settings = Settings(
        config_path=base / "certs.d",
        config_file=base / "config.toml",
        state_dir=base / "state",
        address=base / "none.sock",
    )

    run = run_script("hosts", settings, docker_files())

    assert run.returncode == 0, run.stderr
    paths = [entry["path"] for entry in run.report["files"]]
    assert paths[0] == str(base / "certs.d" / "docker.io" / "hosts.toml")


def test_hosts_reports_effective_config_path(hosts_settings: Settings) -> None:
    hosts_settings.config_file.parent.mkdir(parents=True)
    hosts_settings.config_file.write_text(
        f'version = 2\n{V2_SECTION}\n  config_path = "{hosts_settings.config_path}"\n'
    )

    run = run_script("hosts", hosts_settings, docker_files())

    assert run.returncode == 0, run.stderr
    assert run.report["configPath"] == str(hosts_settings.config_path)
    assert "config_path" not in run.report["message"]
    # No containerd runs here; the files wait for it.
    assert "Warning: containerd does not respond on" in run.report["message"]


def test_hosts_warns_when_config_path_differs(hosts_settings: Settings) -> None:
    hosts_settings.config_file.parent.mkdir(parents=True)
    hosts_settings.config_file.write_text("version = 2\n")

    run = run_script("hosts", hosts_settings, docker_files())

    assert run.returncode == 0, run.stderr
    assert run.report["configPath"] == ""
    assert "does not read these files" in run.report["message"]


def test_invalid_namespace_rejected(hosts_settings: Settings) -> None:
    run = run_script("hosts", hosts_settings, [StagedFile("../etc", "hosts.toml", "x\n")])

    assert run.returncode == 1
    assert run.last_error.startswith(f"nexus-mirror: node {NODE}: write hosts files: ")
    assert not hosts_settings.config_path.exists()


class _RegistryStub(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self.send_response(401 if self.path == "/v2/" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def registry_stub() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RegistryStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_probes_report_status(hosts_settings: Settings, registry_stub: int) -> None:
    closed = free_port()
    probes = [
        Probe(
            "docker.io",
            f"http://127.0.0.1:{registry_stub}",
            f"http://127.0.0.1:{registry_stub}/v2/",
        ),
        Probe("docker.io", f"http://127.0.0.1:{closed}", f"http://127.0.0.1:{closed}/v2/"),
    ]

    run = run_script("hosts", hosts_settings, docker_files(), probes)

    assert run.returncode == 0, run.stderr
    mirrors = run.report["mirrors"]
    errors = [mirror.pop("error") for mirror in mirrors]
    assert mirrors == [
        {
            "namespace": "docker.io",
            "url": f"http://127.0.0.1:{registry_stub}",
            "status": 401,
            "up": True,
            "credentials": None,
        },
        {
            "namespace": "docker.io",
            "url": f"http://127.0.0.1:{closed}",
            "status": None,
            "up": False,
            "credentials": None,
        },
    ]
    assert errors[0] is None
    assert errors[1].startswith("request failed: curl: (7) Failed to connect to 127.0.0.1")
    assert "1 of 2 mirrors are down" in run.report["message"]


class _HtmlStub(http.server.BaseHTTPRequestHandler):
    """A proxy's login page in place of a registry: 200 with HTML for every path."""

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        page = b"<html><body>Sign in</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "Text/HTML; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def test_probe_html_page_is_not_up(hosts_settings: Settings) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        run = run_script(
            "hosts", hosts_settings, docker_files(), [Probe("docker.io", url, f"{url}/v2/")]
        )
    finally:
        server.shutdown()
        server.server_close()

    assert run.returncode == 0, run.stderr
    [mirror] = run.report["mirrors"]
    assert mirror["status"] == 200
    assert mirror["up"] is False
    assert mirror["error"] == "HTTP 200 with an HTML page, not the registry API"


def test_stale_scratch_directory_removed(hosts_settings: Settings) -> None:
    """A run removes the scratch directory of a killed run, and only such a one."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    # Named as mktemp names them: nexus-mirror. and six characters.
    stale = Path("/tmp") / f"nexus-mirror.{secrets.token_hex(3)}"
    stale.mkdir(mode=0o700)
    (stale / "pid").write_text(f"{dead.pid}\n")
    live = Path("/tmp") / f"nexus-mirror.{secrets.token_hex(3)}"
    live.mkdir(mode=0o700)
    (live / "pid").write_text(f"{os.getpid()}\n")
    try:
        run = run_script("hosts", hosts_settings, docker_files())

        assert run.returncode == 0, run.stderr
        assert not stale.exists()
        assert live.is_dir()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)


def test_stale_temporary_file_removed(hosts_settings: Settings) -> None:
    """A killed run's temporary file next to a managed file is gone after the next run."""
    first = run_script("hosts", hosts_settings, docker_files())
    assert first.returncode == 0, first.stderr
    left = hosts_settings.config_path / "docker.io" / ".hosts.toml.nexus-mirror.AbC123"
    left.write_text("partial")

    run = run_script("hosts", hosts_settings, docker_files())

    assert run.returncode == 0, run.stderr
    assert not left.exists()
    assert f"removed {left}, left by an earlier run" in run.stderr


JSON_CASES = [
    "plain",
    'quote " and backslash \\',
    "newline\nreturn\rtab\t",
    "".join(chr(c) for c in range(1, 32)) + "\x7f",
    "utf-8: é ü 日本 🐳",
]


@pytest.mark.parametrize("value", JSON_CASES)
def test_json_string_round_trip(value: str) -> None:
    out = json_str(value.encode())

    assert json.loads(out) == value


@pytest.mark.parametrize(
    "raw",
    [b"\xff", b"a\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"],
)
def test_json_string_escapes_invalid_utf8(raw: bytes) -> None:
    out = json_str(raw)

    assert out.isascii()
    assert json.loads(out) == raw.decode("latin-1")


def json_str(raw: bytes) -> str:
    """Call nm_json_str of the script, sourced so that it only defines its functions."""
    result = subprocess.run(
        [*SHELL, "-c", '. "$1" && nm_json_str "$2"', "sh", str(SCRIPT), raw],
        capture_output=True,
        timeout=30,
        check=True,
    )
    return result.stdout.decode("utf-8")


def test_config_rejects_invalid_toml(hosts_settings: Settings, tmp_path: Path) -> None:
    restarts = tmp_path / "restarts"
    hosts_settings.manage_config = True
    hosts_settings.restart_command = f"echo restart >>{shlex.quote(str(restarts))}"
    hosts_settings.config_file.parent.mkdir(parents=True)
    content = 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  enable_cdi = yes\n'
    hosts_settings.config_file.write_text(content)

    run = run_script("config", hosts_settings)

    assert run.returncode == 1
    assert run.last_error.startswith(f"nexus-mirror: node {NODE}: check config.toml: ")
    assert f"{hosts_settings.config_file} (with config_path set)" in run.last_error
    assert ".nexus-mirror." not in run.last_error
    assert hosts_settings.config_file.read_text() == content
    assert not restarts.exists()
    assert sorted(p.name for p in hosts_settings.config_file.parent.iterdir()) == ["config.toml"]


# --- config mode against a real containerd ---------------------------------

RESTART_SCRIPT = """\
#!/bin/sh
# Stop the test containerd by its pid file, then start it again detached.
dir={dir}
echo restart >>"$dir/restarts"
if [ -f "$dir/containerd.pid" ]; then
    pid=$(cat "$dir/containerd.pid")
    kill "$pid" 2>/dev/null
    i=0
    while [ -d "/proc/$pid" ] && [ "$(cut -d ' ' -f 3 "/proc/$pid/stat" 2>/dev/null)" != Z ] &&
        [ "$i" -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
fi
config=$dir/config.toml
# The break-next-start file makes this one start also load registry.mirrors,
# which the CRI plugin rejects beside config_path.
if [ -e "$dir/break-next-start" ]; then
    rm -f "$dir/break-next-start"
    cat "$dir/config.toml" "$dir/mirrors.toml" >"$dir/broken.toml"
    config=$dir/broken.toml
fi
containerd -c "$config" </dev/null >>"$dir/containerd.log" 2>&1 &
echo $! >"$dir/containerd.pid"
"""


@dataclass
class Daemon:
    """A containerd started by the test, with everything under ``dir``."""

    dir: Path
    socket: Path
    config: Path
    settings: Settings
    base_config: str
    restarts_at_start: int = field(default=0)

    @property
    def pid(self) -> int:
        return int((self.dir / "containerd.pid").read_text())

    @property
    def restarts(self) -> int:
        counter = self.dir / "restarts"
        total = len(counter.read_text().splitlines()) if counter.exists() else 0
        return total - self.restarts_at_start

    def cri_status(self) -> str | None:
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), "--connect-timeout", "2s", "plugins", "ls"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        for line in result.stdout.splitlines():
            columns = line.split()
            if columns[:2] == ["io.containerd.grpc.v1", "cri"]:
                return columns[-1]
        return None


def wait_for_cri(daemon: Daemon, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.socket.is_socket() and daemon.cri_status() == "ok":
            return
        time.sleep(0.1)
    log = (daemon.dir / "containerd.log").read_text()
    raise AssertionError(f"test containerd did not start:\n{log[-3000:]}")


def stop_process(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    assert shutil.which("containerd"), "containerd must be installed"
    assert shutil.which("ctr"), "ctr must be installed"
    directory = tmp_path / "c"
    directory.mkdir()
    sock = directory / "containerd.sock"
    base = (
        "# test containerd, everything under the test directory\n"
        "version = 2\n"
        f'root = "{directory}/root"\n'
        f'state = "{directory}/state"\n'
        "\n"
        "[grpc]\n"
        f'  address = "{sock}"\n'
        "\n"
        "[ttrpc]\n"
        f'  address = "{sock}.ttrpc"\n'
        "\n"
        '[plugins."io.containerd.internal.v1.opt"]\n'
        f'  path = "{directory}/opt"\n'
    )
    config = directory / "config.toml"
    config.write_text(base)
    (directory / "mirrors.toml").write_text(
        '[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
        '  endpoint = ["https://127.0.0.1:9"]\n'
    )
    restart = directory / "restart.sh"
    restart.write_text(RESTART_SCRIPT.format(dir=shlex.quote(str(directory))))
    restart.chmod(0o755)
    settings = Settings(
        config_path=tmp_path / "certs.d",
        config_file=config,
        state_dir=tmp_path / "state",
        address=sock,
        manage_config=True,
        restart_command=shlex.quote(str(restart)),
        restart_timeout=20,
        log_command=f"tail -n 200 {shlex.quote(str(directory / 'containerd.log'))}",
    )
    subprocess.run(
        ["sh", str(restart)], check=True, timeout=30, stdin=subprocess.DEVNULL, env=clean_env()
    )
    started = Daemon(directory, sock, config, settings, base, restarts_at_start=1)
    try:
        wait_for_cri(started)
        yield started
    finally:
        stop_process(started.pid)


def test_config_first_run_patches_and_restarts(daemon: Daemon) -> None:
    pid_before = daemon.pid

    run = run_script("config", daemon.settings)

    assert run.returncode == 0, run.stderr
    config_path = str(daemon.settings.config_path)
    assert daemon.config.read_text() == (
        daemon.base_config + f'\n{V2_SECTION}\n  config_path = "{config_path}"\n'
    )
    assert daemon.restarts == 1
    assert daemon.pid != pid_before
    assert daemon.cri_status() == "ok"
    report = run.report
    assert report["mode"] == "config"
    assert report["node"] == NODE
    assert report["containerdVersion"] == "1.6.20"
    assert report["configFile"] == str(daemon.config)
    assert report["configVersion"] == 2
    assert report["configPath"] == config_path
    assert report["configChanged"] is True
    assert report["restarted"] is True
    assert report["criPlugin"] == "ok"
    assert report["restartFinishedAt"] >= report["restartStartedAt"] > 1_600_000_000
    state = daemon.settings.state_dir
    assert (state / "config.toml.orig").read_text() == daemon.base_config
    assert (state / "config.toml.bak").read_text() == daemon.base_config
    assert mode_of(daemon.config) == 0o644


def test_config_second_run_changes_nothing(daemon: Daemon) -> None:
    first = run_script("config", daemon.settings)
    assert first.returncode == 0, first.stderr
    content = daemon.config.read_bytes()
    pid = daemon.pid

    run = run_script("config", daemon.settings)

    assert run.returncode == 0, run.stderr
    assert daemon.config.read_bytes() == content
    assert daemon.restarts == 1
    assert daemon.pid == pid
    report = run.report
    assert report["configChanged"] is False
    assert report["restarted"] is False
    assert report["restartStartedAt"] is None
    assert report["restartFinishedAt"] is None
    assert report["criPlugin"] == "ok"
    assert "nothing changed" in report["message"]


def test_config_rejects_registry_mirrors(daemon: Daemon) -> None:
    content = daemon.base_config + "\n" + (daemon.dir / "mirrors.toml").read_text()
    daemon.config.write_text(content)
    pid = daemon.pid

    run = run_script("config", daemon.settings)

    assert run.returncode == 1
    assert run.stdout == ""
    assert run.last_error.startswith(f"nexus-mirror: node {NODE}: check config.toml: ")
    assert "registry.mirrors for docker.io" in run.last_error
    assert "nexus-mirror:registries" in run.last_error
    assert daemon.config.read_text() == content
    assert daemon.restarts == 0
    assert daemon.pid == pid
    assert not (daemon.settings.state_dir / "config.toml.bak").exists()
    assert not [p for p in daemon.dir.iterdir() if "nexus-mirror" in p.name]


def test_config_rejects_tls_on_containerd_1(daemon: Daemon) -> None:
    content = daemon.base_config + (
        '\n[plugins."io.containerd.grpc.v1.cri".registry.configs."nexus.example:8082".tls]\n'
        "  insecure_skip_verify = true\n"
    )
    daemon.config.write_text(content)

    run = run_script("config", daemon.settings)

    assert run.returncode == 1
    assert "registry.configs.<host>.tls for nexus.example:8082" in run.last_error
    assert daemon.config.read_text() == content
    assert daemon.restarts == 0


def test_config_rolls_back_when_cri_breaks(daemon: Daemon) -> None:
    (daemon.dir / "break-next-start").touch()

    run = run_script("config", daemon.settings)

    assert run.returncode == 1
    assert run.stdout == ""
    assert run.last_error.startswith(f"nexus-mirror: node {NODE}: wait for CRI: ")
    assert "`mirrors` cannot be set when `config_path` is provided" in run.last_error
    assert "restored" in run.last_error
    assert "nexus-mirror: containerd log: " in run.stderr
    assert daemon.config.read_text() == daemon.base_config
    assert daemon.restarts == 2
    assert daemon.cri_status() == "ok"


def test_config_report_only_when_not_managed(daemon: Daemon) -> None:
    daemon.settings.manage_config = False

    run = run_script("config", daemon.settings)

    assert run.returncode == 0, run.stderr
    assert daemon.config.read_text() == daemon.base_config
    assert daemon.restarts == 0
    report = run.report
    assert report["configChanged"] is False
    assert report["configVersion"] == 2
    assert report["configPath"] == ""
    assert report["criPlugin"] == "ok"
    assert "does not read the hosts files" in report["message"]


def test_config_creates_missing_file(daemon: Daemon, tmp_path: Path) -> None:
    """A missing config.toml is created. The test daemon keeps reading its own file."""
    missing = tmp_path / "etc" / "containerd" / "config.toml"
    daemon.settings.config_file = missing

    run = run_script("config", daemon.settings)

    assert run.returncode == 0, run.stderr
    config_path = daemon.settings.config_path
    assert missing.read_text() == f'version = 2\n\n{V2_SECTION}\n  config_path = "{config_path}"\n'
    assert mode_of(missing) == 0o644
    assert (daemon.settings.state_dir / "config.toml.orig-absent").exists()
    assert run.report["configVersion"] == 2
    assert daemon.restarts == 1


FAKE_CONTAINERD_2 = """\
#!/bin/sh
# Stand-in for containerd 2.1: its config dump prints the file with
# single-quoted strings, as containerd 2.x (go-toml v2) does.
case $1 in
--version) echo "containerd github.com/containerd/containerd/v2 v2.1.0 0123abcd" ;;
-c) sed "s/\\"/'/g" "$2" ;;
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
def containerd_2(tmp_path: Path) -> Iterator[Settings]:
    """Settings for config mode with stand-ins for containerd 2.1 and its ctr."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("containerd", FAKE_CONTAINERD_2), ("ctr", FAKE_CTR_2)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "c.sock"))
    restarts = tmp_path / "restarts"
    yield Settings(
        config_path=tmp_path / "certs.d",
        config_file=tmp_path / "etc" / "config.toml",
        state_dir=tmp_path / "state",
        address=tmp_path / "c.sock",
        manage_config=True,
        # A restarted containerd binds its socket again. touch gives it a later
        # mtime, after a pause longer than the file system's timestamp step.
        restart_command=(
            f"echo restart >>{shlex.quote(str(restarts))}; sleep 0.1; "
            f"touch {shlex.quote(str(tmp_path / 'c.sock'))}"
        ),
        bin_dir=str(bin_dir),
    )
    listener.close()


def test_containerd_2_creates_version_3(containerd_2: Settings) -> None:
    run = run_script("config", containerd_2)

    assert run.returncode == 0, run.stderr
    section = '[plugins."io.containerd.cri.v1.images".registry]'
    assert containerd_2.config_file.read_text() == (
        f'version = 3\n\n{section}\n  config_path = "{containerd_2.config_path}"\n'
    )
    report = run.report
    assert report["containerdVersion"] == "2.1.0"
    assert report["configVersion"] == 3
    assert report["configPath"] == str(containerd_2.config_path)
    assert report["criPlugin"] == "ok"
    assert report["restarted"] is True


def test_containerd_2_rejects_v3_mirrors(containerd_2: Settings) -> None:
    containerd_2.config_file.parent.mkdir()
    content = (
        "version = 3\n"
        "[plugins.'io.containerd.cri.v1.images'.registry.mirrors.'docker.io']\n"
        "  endpoint = ['https://127.0.0.1:9']\n"
    )
    containerd_2.config_file.write_text(content)

    run = run_script("config", containerd_2)

    assert run.returncode == 1
    assert "registry.mirrors for docker.io" in run.last_error
    assert containerd_2.config_file.read_text() == content


def test_containerd_2_accepts_tls_configs(containerd_2: Settings) -> None:
    """containerd 2.x ignores registry.configs.<host>.tls with a warning."""
    containerd_2.config_file.parent.mkdir()
    containerd_2.config_file.write_text(
        "version = 3\n"
        "[plugins.'io.containerd.cri.v1.images'.registry.configs.'r.example'.tls]\n"
        "  insecure_skip_verify = true\n"
    )

    run = run_script("config", containerd_2)

    assert run.returncode == 0, run.stderr
    assert run.report["configChanged"] is True


# --- hosts mode test pull against a real containerd and registry -----------


def push_test_image(registry: str, repository: str) -> None:
    """Push a one-layer OCI image as ``repository:latest`` with the registry API."""
    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w") as archive:
        data = b"hello\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    layer = layer_tar.getvalue()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()],
            },
            "config": {},
        }
    ).encode()

    def upload(blob: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        start = urllib.request.Request(f"{registry}/v2/{repository}/blobs/uploads/", method="POST")
        with urllib.request.urlopen(start, timeout=10) as response:
            location = response.headers["Location"]
        if location.startswith("/"):
            location = registry + location
        separator = "&" if "?" in location else "?"
        put = urllib.request.Request(
            f"{location}{separator}digest={digest}", data=blob, method="PUT"
        )
        put.add_header("Content-Type", "application/octet-stream")
        urllib.request.urlopen(put, timeout=10).close()
        return digest

    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": upload(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": upload(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    put = urllib.request.Request(
        f"{registry}/v2/{repository}/manifests/latest", data=manifest, method="PUT"
    )
    put.add_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
    urllib.request.urlopen(put, timeout=10).close()


@pytest.fixture
def local_registry(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("docker-registry")
    assert binary, "docker-registry must be installed"
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry-data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = (tmp_path / "registry.log").open("wb")
    process = subprocess.Popen(
        [binary, "serve", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"{url}/v2/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def test_hosts_verification_names_mirror(daemon: Daemon, local_registry: str) -> None:
    push_test_image(local_registry, "test/img")
    mirror = local_registry.removeprefix("http://")
    # The namespace is a loopback port where nothing listens, so a pull that
    # bypassed the mirror would fail instead of leaving the machine.
    upstream = f"127.0.0.1:{free_port()}"
    hosts_toml = (
        f'server = "http://{upstream}"\n\n'
        f'[host."{local_registry}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        f'  [host."{local_registry}".header]\n'
        '    Authorization = "Basic c2VjcmV0LXZhbHVl"\n'
    )
    settings = daemon.settings
    settings.manage_config = False
    settings.verify_image = f"{upstream}/test/img:latest"
    files = [StagedFile(upstream, "hosts.toml", hosts_toml)]
    probes = [Probe(upstream, local_registry, f"{local_registry}/v2/")]

    run = run_script("hosts", settings, files, probes)

    assert run.returncode == 0, run.stderr
    verification = run.report["verification"]
    assert verification == {
        "image": f"{upstream}/test/img:latest",
        "servedBy": mirror,
        "hostsTried": [mirror],
        "ok": True,
        "error": None,
    }
    assert run.report["criPlugin"] == "ok"
    assert run.report["mirrors"][0]["status"] == 200
    assert "c2VjcmV0LXZhbHVl" not in run.stdout + run.stderr


def test_hosts_verification_reports_fallback(daemon: Daemon, local_registry: str) -> None:
    push_test_image(local_registry, "test/img")
    down = f"http://127.0.0.1:{free_port()}"
    upstream = local_registry.removeprefix("http://")
    hosts_toml = (
        f'server = "{local_registry}"\n\n[host."{down}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    settings = daemon.settings
    settings.manage_config = False
    settings.verify_image = f"{upstream}/test/img:latest"
    files = [StagedFile(upstream, "hosts.toml", hosts_toml)]
    probes = [Probe(upstream, down, f"{down}/v2/")]

    run = run_script("hosts", settings, files, probes)

    assert run.returncode == 0, run.stderr
    verification = run.report["verification"]
    assert verification["servedBy"] == upstream
    assert verification["hostsTried"] == [down.removeprefix("http://"), upstream]
    assert verification["ok"] is False
    assert "not a configured mirror" in verification["error"]


def test_host_port_directory_shadowing_rejected(hosts_settings: Settings) -> None:
    shadow = hosts_settings.config_path / "registry.local_5000_"
    shadow.mkdir(parents=True)
    (shadow / "hosts.toml").write_text('server = "https://registry.local:5000"\n')
    files = [StagedFile("registry.local:5000", "hosts.toml", 'server = "https://m"\n')]

    run = run_script("hosts", hosts_settings, files)

    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert "check hosts directories" in last
    assert "registry.local_5000_" in last
    assert not (hosts_settings.config_path / "registry.local:5000").exists()
