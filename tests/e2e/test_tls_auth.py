"""End to end behind TLS: credentials, private CAs, client certificates and path routing.

lab/tls.sh puts nginx with a lab CA in front of the lab's mirror registry, the
way many Nexus installations sit behind a TLS-terminating reverse proxy. One
server block needs basic authentication and one a client certificate. One
serves the mirror under /v2/docker-hub like Nexus path-based routing, and one
is plain TLS. Each scenario applies the program over real SSH to containerd 1.6 and
proves its outcome with a CRI PullImage call and nginx's access log.
"""

from __future__ import annotations

import base64
import json
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.cri import CriError, ImageServiceClient
from tests.e2e.lab import IMAGE_REFERENCE, REPO_ROOT, Lab, cri_plugin_status, parse_lab_env
from tests.e2e.replay import COMMAND_TYPE, ReplayMocks, is_marked_secret, mask_secrets
from tests.e2e.stack import write_stack_file
from tests.program_run import ProgramRun, output_is_secret, run_program, stack_config

TLS_SCRIPT = REPO_ROOT / "lab" / "tls.sh"
USER = "puller"
# Quote, backslash, colon, space and non-ASCII text: every place that writes
# the password must quote it right.
PASSWORD = 's3cr"et\\ p:w é1'
NEW_PASSWORD = "rotated-Pa55:word"
MANIFEST_PATH = "/v2/library/nm-test/manifests/1?ns=docker.io"


@dataclass(frozen=True)
class Tls:
    """nginx of lab/tls.sh: ports and files from DIR/tls/tls.env."""

    lab: Lab
    tls_port: int
    auth_port: int
    client_port: int
    path_port: int
    path_repository: str
    ca_pem: str
    other_ca_pem: str
    client_cert: str
    client_key: str
    access_log: Path
    error_log: Path

    def set_password(self, password: str) -> None:
        """Make the basic-authentication server block accept only ``password``."""
        _run_tls_script("password", self.lab.dir, password)

    def access_lines(self, since: int = 0) -> list[str]:
        return self.access_log.read_text(errors="replace").splitlines()[since:]


def _run_tls_script(command: str, lab_dir: Path, password: str | None = None) -> None:
    arguments = ["sh", str(TLS_SCRIPT), command, str(lab_dir)]
    if password is not None:
        arguments += ["--user", USER]
    result = subprocess.run(
        arguments,
        input=f"{password}\n" if password is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"lab/tls.sh {command} failed:\n{result.stdout}{result.stderr}")


@pytest.fixture(scope="module")
def tls(lab: Lab) -> Iterator[Tls]:
    """nginx with TLS and authentication in front of the module's lab."""
    _run_tls_script("start", lab.dir, PASSWORD)
    try:
        env = parse_lab_env(lab.dir / "tls" / "tls.env")
        yield Tls(
            lab=lab,
            tls_port=int(env["TLS_PORT"]),
            auth_port=int(env["AUTH_PORT"]),
            client_port=int(env["CLIENT_PORT"]),
            path_port=int(env["PATH_PORT"]),
            path_repository=env["PATH_REPOSITORY"],
            ca_pem=Path(env["CA_PEM"]).read_text(),
            other_ca_pem=Path(env["OTHER_CA_PEM"]).read_text(),
            client_cert=Path(env["CLIENT_CERT"]).read_text(),
            client_key=Path(env["CLIENT_KEY"]).read_text(),
            access_log=Path(env["ACCESS_LOG"]),
            error_log=Path(env["ERROR_LOG"]),
        )
    finally:
        _run_tls_script("stop", lab.dir)


@pytest.fixture(autouse=True)
def default_password(tls: Tls) -> None:
    """Every test starts with nginx accepting PASSWORD."""
    tls.set_password(PASSWORD)


class RecordingMocks(ReplayMocks):
    """The replay, also keeping each command's inputs as the engine sends them, secrets marked."""

    def __init__(self, state: Any, raw_inputs: dict[str, dict[str, Any]]) -> None:
        super().__init__(state)
        self.raw_inputs = raw_inputs

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        if args.typ == COMMAND_TYPE:
            self.raw_inputs[args.name] = dict(args.inputs)
        return super().new_resource(args)


@dataclass
class Apply:
    """One ``pulumi up`` through the replay: outputs and the inputs the engine stores."""

    run: ProgramRun
    raw_inputs: dict[str, dict[str, Any]]
    executions_before: int

    @property
    def report(self) -> dict[str, Any]:
        return self.run.outputs["nodes"]["node-a"]


def up(stack: Stack, config: dict[str, Any], secrets: dict[str, str] | None = None) -> Apply:
    """Apply ``config`` with ``secrets`` set as secret config keys."""
    stack_file = write_stack_file(stack.directory / "Pulumi.lab.yaml", config)
    values, secret_names = stack_config(
        stack_file, secrets={"sshPrivateKey": stack.lab.ssh_key.read_text(), **(secrets or {})}
    )
    before = len(stack.state.executions)
    raw_inputs: dict[str, dict[str, Any]] = {}
    mocks = RecordingMocks(stack.state, raw_inputs)
    try:
        run = run_program(mocks, values, secret_names, stack="lab")
    except BaseException:
        mocks.wait_idle()
        raise
    mocks.delete_unregistered()
    return Apply(run, raw_inputs, before)


def nexus_config(stack: Stack, tls: Tls, port: int, **nexus: Any) -> dict[str, Any]:
    """Config with docker.io through Nexus at https://127.0.0.1:PORT, trusting the lab CA."""
    return stack.config(
        nexus={"url": "https://127.0.0.1", "caPem": tls.ca_pem, **nexus},
        registries={"docker.io": {"nexus": {"port": port}}},
        verify={"image": IMAGE_REFERENCE},
    )


def mirror_config(stack: Stack, port: int, **mirror: Any) -> dict[str, Any]:
    """Config with docker.io through one mirror at https://127.0.0.1:PORT."""
    return stack.config(
        registries={"docker.io": {"mirrors": [{"url": f"https://127.0.0.1:{port}", **mirror}]}},
        verify={"image": IMAGE_REFERENCE},
    )


def pull(lab: Lab, image: str = IMAGE_REFERENCE) -> None:
    """Pull ``image`` by CRI on node-a; raise CriError when containerd cannot."""
    with ImageServiceClient(lab.node("node-a").socket, timeout=60) as client:
        if client.image_status(image) is not None:
            client.remove_image(image)
        client.pull_image(image)
        assert client.image_status(image) is not None


def pull_fails(lab: Lab) -> str:
    """Pull the test image by CRI and return the error; fail the test when the pull works."""
    try:
        pull(lab)
    except CriError as error:
        return error.details
    raise AssertionError(f"the CRI pull of {IMAGE_REFERENCE} succeeded")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def restarts(stack: Stack, since: int) -> int:
    """Count containerd restarts by the node script since execution number ``since``."""
    executions = stack.state.executions[since:]
    return sum(e.stderr.count("nexus-mirror: restarting containerd") for e in executions)


def hosts_dir(lab: Lab) -> Path:
    return lab.node("node-a").certs_dir / "docker.io"


# --- no credential leaves the secret places -----------------------------------


def needles(*passwords: str, key_pem: str | None = None) -> list[str]:
    """Return every form a credential could take in text: raw, escaped and Base64."""
    found = []
    for password in passwords:
        found += [
            password,
            json.dumps(password)[1:-1],
            json.dumps(password, ensure_ascii=False)[1:-1],
        ]
        found.append(base64.b64encode(f"{USER}:{password}".encode()).decode())
    if key_pem is not None:
        found += [line for line in key_pem.splitlines() if line and "-----" not in line]
    return sorted(set(found))


def assert_no_leak(stack: Stack, tls: Tls, applied: list[Apply], secrets: list[str]) -> None:
    """Search everything outside secrets and 0600 files for every form of the credentials."""
    # What the replay recorded: commands, their output and the stored state.
    places: dict[str, str] = {}
    for number, execution in enumerate(stack.state.executions):
        name = f"execution {number} {execution.resource} {execution.operation}"
        places[f"{name} command"] = execution.command
        places[f"{name} stdout"] = execution.stdout
        places[f"{name} stderr"] = execution.stderr
    for name, resource in stack.state.resources.items():
        places[f"state outputs of {name}"] = json.dumps(resource["outputs"], ensure_ascii=False)
    for number, apply in enumerate(applied):
        places[f"apply {number} nodes output"] = json.dumps(
            apply.run.outputs["nodes"], ensure_ascii=False
        )
        for name, inputs in apply.raw_inputs.items():
            places[f"apply {number} stored inputs of {name}"] = json.dumps(
                mask_secrets(inputs), ensure_ascii=False
            )
        mirror = apply.run.namespace["mirror"]
        if any(secret in json.dumps(apply.run.outputs["hostsToml"]) for secret in secrets):
            assert output_is_secret(mirror.hosts_toml), (
                "hostsToml contains credentials in plain text"
            )

    # Logs of containerd, nginx, the mirror registry and sshd.
    node = stack.lab.node("node-a")
    places["containerd log"] = node.log.read_text(errors="replace")
    places["nginx access log"] = tls.access_log.read_text(errors="replace")
    places["nginx error log"] = tls.error_log.read_text(errors="replace")
    places["mirror registry log"] = stack.lab.mirror_log.read_text(errors="replace")
    places["sshd log"] = Path(stack.lab.env["SSH_LOG"]).read_text(errors="replace")

    leaks = [
        f"{place} contains {secret!r}"
        for place, text in places.items()
        for secret in secrets
        if secret in text
    ]
    assert not leaks, leaks

    # Files on the node that contain credentials are readable by root only.
    for path in [*node.certs_dir.rglob("*"), *(node.dir / "nexus-mirror-state").rglob("*")]:
        if path.is_file() and any(secret in path.read_text(errors="replace") for secret in secrets):
            assert mode_of(path) == 0o600, f"{path} holds credentials with mode {mode_of(path):o}"
    if any(secret in node.config.read_text() for secret in secrets):
        assert mode_of(node.config) == 0o600


# --- basic authentication ----------------------------------------------------


def test_header_auth_pulls_and_keeps_secrets(stack: Stack, lab: Lab, tls: Tls) -> None:
    before = len(tls.access_lines())
    config = nexus_config(stack, tls, tls.auth_port, username=USER)

    applied = up(stack, config, {"nexusPassword": PASSWORD})

    report = applied.report
    [mirror] = report["mirrors"]
    assert mirror["url"] == f"https://127.0.0.1:{tls.auth_port}"
    assert mirror["status"] == 200
    assert mirror["credentials"] == "accepted"
    assert report["verification"]["ok"] is True, report["verification"]
    assert report["verification"]["throughMirror"] is True
    hosts_toml = hosts_dir(lab) / "hosts.toml"
    assert mode_of(hosts_toml) == 0o600
    assert "Authorization = " in hosts_toml.read_text()
    assert mode_of(hosts_dir(lab) / "nexus-ca.pem") == 0o644
    # Header credentials leave config.toml alone: its one change is config_path.
    assert USER not in lab.node("node-a").config.read_text()
    pull(lab)
    lines = tls.access_lines(before)
    assert any(
        line.startswith(f"{tls.auth_port} 200 {USER} ") and MANIFEST_PATH in line for line in lines
    ), lines[-5:]
    # The hosts command's input contains the header, so the engine stores it
    # encrypted. The config command's input contains no credential and stays readable.
    hosts_stdin = applied.raw_inputs["node-a-hosts"]["stdin"]
    assert is_marked_secret(hosts_stdin)
    assert any(needle in hosts_stdin["value"] for needle in needles(PASSWORD))
    assert not is_marked_secret(applied.raw_inputs["node-a-config"]["stdin"])
    assert "delete" not in applied.raw_inputs["node-a-config"]
    assert_no_leak(stack, tls, [applied], needles(PASSWORD))


def test_wrong_and_missing_credentials_fail(stack: Stack, lab: Lab, tls: Tls) -> None:
    wrong = up(
        stack, nexus_config(stack, tls, tls.auth_port, username=USER), {"nexusPassword": "wrong"}
    )

    [mirror] = wrong.report["mirrors"]
    assert mirror["status"] == 401
    assert mirror["credentials"] == "rejected"
    verification = wrong.report["verification"]
    assert verification["ok"] is False
    assert f"127.0.0.1:{tls.auth_port} answered 401" in verification["error"], verification
    assert "missing or rejected" in verification["error"]
    hosts = stack.state.executions[-1]
    assert "mirrors rejected the configured credentials" in hosts.stderr
    assert pull_fails(lab)

    missing = up(stack, nexus_config(stack, tls, tls.auth_port))

    [mirror] = missing.report["mirrors"]
    assert mirror["status"] == 401
    assert mirror["credentials"] is None
    verification = missing.report["verification"]
    assert verification["ok"] is False
    assert "the mirror requires credentials" in verification["error"], verification
    assert pull_fails(lab)
    assert_no_leak(stack, tls, [wrong, missing], needles(PASSWORD, "wrong"))


def test_header_password_change_needs_no_restart(stack: Stack, lab: Lab, tls: Tls) -> None:
    config = nexus_config(stack, tls, tls.auth_port, username=USER)
    first = up(stack, config, {"nexusPassword": PASSWORD})
    pull(lab)
    pid = lab.node("node-a").pid_file.read_text()
    tls.set_password(NEW_PASSWORD)
    assert pull_fails(lab)

    count = len(stack.state.executions)
    second = up(stack, config, {"nexusPassword": NEW_PASSWORD})

    assert [e.resource for e in stack.state.executions[count:]] == ["node-a-hosts"]
    assert restarts(stack, count) == 0
    assert lab.node("node-a").pid_file.read_text() == pid
    assert second.report["mirrors"][0]["credentials"] == "accepted"
    assert second.report["verification"]["ok"] is True
    pull(lab)
    assert_no_leak(stack, tls, [first, second], needles(PASSWORD, NEW_PASSWORD))


def test_config_auth_restarts_once_per_password(stack: Stack, lab: Lab, tls: Tls) -> None:
    node = lab.node("node-a")
    config = nexus_config(stack, tls, tls.auth_port, username=USER, auth="config")
    first = up(stack, config, {"nexusPassword": PASSWORD})

    assert restarts(stack, first.executions_before) == 1
    text = node.config.read_text()
    assert f'registry.configs."127.0.0.1:{tls.auth_port}".auth]' in text
    assert mode_of(node.config) == 0o600
    assert "Authorization" not in (hosts_dir(lab) / "hosts.toml").read_text()
    assert first.report["verification"]["ok"] is True, first.report["verification"]
    assert first.report["mirrors"][0]["credentials"] == "accepted"
    config_inputs = first.raw_inputs["node-a-config"]
    assert is_marked_secret(config_inputs["stdin"])
    assert config_inputs["delete"] == "sh -s -- config-delete"
    pull(lab)

    tls.set_password(NEW_PASSWORD)
    second = up(stack, config, {"nexusPassword": NEW_PASSWORD})

    assert restarts(stack, second.executions_before) == 1
    assert second.report["restarted"] is True
    backup = node.dir / "nexus-mirror-state" / "config.toml.bak"
    assert mode_of(backup) == 0o600
    assert second.report["verification"]["ok"] is True
    pull(lab)
    assert_no_leak(stack, tls, [first, second], needles(PASSWORD, NEW_PASSWORD))

    # A second apply with the same password changes nothing.
    third = up(stack, config, {"nexusPassword": NEW_PASSWORD})
    assert restarts(stack, third.executions_before) == 0

    # Destroy removes the credentials from config.toml and keeps config_path.
    count = len(stack.state.executions)
    stack.destroy()
    assert [e.operation for e in stack.state.executions[count:]] == ["delete", "delete"]
    assert restarts(stack, count) == 1
    text = node.config.read_text()
    assert "registry.configs" not in text
    assert "config_path" in text
    assert cri_plugin_status(node) == "ok"


# --- CA certificates and skip_verify -------------------------------------------


def test_ca_trusted_only_where_configured(stack: Stack, lab: Lab, tls: Tls) -> None:
    untrusted = up(stack, mirror_config(stack, tls.tls_port))
    assert untrusted.report["mirrors"][0]["up"] is False
    assert "certificate" in untrusted.report["verification"]["error"]
    assert "x509" in pull_fails(lab)

    other = up(stack, mirror_config(stack, tls.tls_port, caPem=tls.other_ca_pem))
    assert other.report["mirrors"][0]["up"] is False
    assert "x509" in pull_fails(lab)

    trusted = up(stack, mirror_config(stack, tls.tls_port, caPem=tls.ca_pem))
    assert trusted.report["mirrors"][0]["status"] == 200
    assert trusted.report["verification"]["ok"] is True
    assert (hosts_dir(lab) / "mirror-0-ca.pem").read_text() == tls.ca_pem
    pull(lab)

    skipped = up(stack, mirror_config(stack, tls.tls_port, skipVerify=True))
    warnings = skipped.run.namespace["mirror_config"].warnings
    assert any("skipVerify" in w and "not verified" in w for w in warnings), warnings
    assert "skip_verify = true" in (hosts_dir(lab) / "hosts.toml").read_text()
    assert skipped.report["verification"]["ok"] is True
    pull(lab)


# --- client certificates ---------------------------------------------------------


def test_client_certificate_required_and_accepted(stack: Stack, lab: Lab, tls: Tls) -> None:
    without = up(stack, mirror_config(stack, tls.client_port, caPem=tls.ca_pem))
    assert without.report["mirrors"][0]["status"] == 400
    assert without.report["verification"]["ok"] is False
    assert pull_fails(lab)

    client = {"clientCertPem": tls.client_cert, "clientKeyPemKey": "labClientKey"}
    mirror = up(
        stack,
        mirror_config(stack, tls.client_port, caPem=tls.ca_pem, **client),
        {"labClientKey": tls.client_key},
    )
    assert mirror.report["mirrors"][0]["status"] == 200
    assert mirror.report["verification"]["ok"] is True, mirror.report["verification"]
    assert mode_of(hosts_dir(lab) / "mirror-0-client.key") == 0o600
    assert mode_of(hosts_dir(lab) / "mirror-0-client.pem") == 0o644
    hosts_toml = (hosts_dir(lab) / "hosts.toml").read_text()
    assert 'client = [["mirror-0-client.pem", "mirror-0-client.key"]]' in hosts_toml
    pull(lab)

    nexus = up(
        stack,
        nexus_config(stack, tls, tls.client_port, clientCertPem=tls.client_cert),
        {"nexusClientKeyPem": tls.client_key},
    )
    assert nexus.report["mirrors"][0]["status"] == 200
    assert nexus.report["verification"]["ok"] is True
    assert mode_of(hosts_dir(lab) / "nexus-client.key") == 0o600
    assert not (hosts_dir(lab) / "mirror-0-client.key").exists()
    pull(lab)
    lines = tls.access_lines()
    assert any(line.startswith(f'{tls.client_port} 200 - "SUCCESS"') for line in lines)
    assert_no_leak(stack, tls, [without, mirror, nexus], needles(key_pem=tls.client_key))


# --- path-based routing ------------------------------------------------------------


def test_path_prefix_reached_with_override_path(stack: Stack, lab: Lab, tls: Tls) -> None:
    before = len(tls.access_lines())
    config = stack.config(
        nexus={"url": f"https://127.0.0.1:{tls.path_port}", "caPem": tls.ca_pem},
        registries={"docker.io": {"nexus": {"repository": tls.path_repository}}},
        verify={"image": IMAGE_REFERENCE},
    )

    applied = up(stack, config)

    url = f"https://127.0.0.1:{tls.path_port}/v2/{tls.path_repository}"
    hosts_toml = (hosts_dir(lab) / "hosts.toml").read_text()
    assert f'[host."{url}"]' in hosts_toml
    assert "override_path = true" in hosts_toml
    assert applied.report["mirrors"][0]["status"] == 200
    assert applied.report["verification"]["ok"] is True, applied.report["verification"]
    pull(lab)
    path = f"/v2/{tls.path_repository}/library/nm-test/manifests/1?ns=docker.io"
    lines = [line for line in tls.access_lines(before) if line.startswith(f"{tls.path_port} ")]
    assert any(" 200 " in line and path in line for line in lines), lines[-5:]
    # Nothing reached the path without the prefix, for which this server block returns 404.
    assert not any(" 404 " in line for line in lines), lines
