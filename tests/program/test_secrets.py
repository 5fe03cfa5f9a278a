"""Secrets under Pulumi's mocks: what the engine would store, show in a preview or log.

The SSH private key, its passphrase and every header value of a secret
``registries`` key may appear only inside values marked secret: never in
command text, plain inputs (what ``pulumi preview --diff`` prints), logs,
stack outputs or error messages.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

import pulumi
import pytest
import yaml

from tests.e2e.replay import is_marked_secret, mask_secrets
from tests.program_run import ROOT, ProgramRun, output_is_secret, run_program, stack_config

DEV_STACK = ROOT / "Pulumi.dev.yaml"
KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "c2VjcmV0LWtleS1ib2R5LTlmOGU3ZA==\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
KEY_BODY = "c2VjcmV0LWtleS1ib2R5LTlmOGU3ZA=="
PASSPHRASE = "passphrase-5t6y"
HEADER_VALUES = ["Bearer header-secret-1q2w", "header-secret-3e4r", "header-secret-list-7u8i"]
SECRETS = [KEY_BODY, PASSPHRASE, *HEADER_VALUES]
REGISTRIES = {
    "docker.io": {
        "nexus": {"port": 8082},
        "mirrors": [
            {
                "url": "https://mirror.internal",
                "headers": {
                    "Authorization": HEADER_VALUES[0],
                    "X-Api-Key": HEADER_VALUES[1],
                    "X-Trace": ["plain", HEADER_VALUES[2]],
                },
            }
        ],
    },
    "ghcr.io": {"nexus": {"repository": "ghcr-proxy"}},
}
REPORT = {
    "mode": "hosts",
    "containerdVersion": "1.7.22",
    "configPath": "/etc/containerd/certs.d",
    "criPlugin": "ok",
    "changed": True,
    "files": [],
    "mirrors": [],
    "verification": None,
}


class RecordingMocks(pulumi.runtime.Mocks):
    """Mocks that keep every resource's inputs as the engine receives them, secrets marked."""

    def __init__(self) -> None:
        self.inputs: dict[str, dict[str, Any]] = {}

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.inputs[args.name] = dict(args.inputs)
        stdout = json.dumps(REPORT) if args.name.endswith("-hosts") else ""
        return f"{args.name}-id", {**args.inputs, "stdout": stdout, "stderr": ""}

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}


def _leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def _run(
    mocks: RecordingMocks,
    *,
    preview: bool = False,
    registries: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    extra_secrets: dict[str, str] | None = None,
) -> ProgramRun:
    secrets = {
        "sshPrivateKey": KEY,
        "sshPrivateKeyPassword": PASSPHRASE,
        "registries": json.dumps(registries or REGISTRIES),
        **(extra_secrets or {}),
    }
    config, secret_names = stack_config(DEV_STACK, overrides, secrets)
    return run_program(mocks, config, secret_names, preview=preview)


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Any:
    """Return a function that gives everything the program logged or printed so far."""
    caplog.set_level(logging.DEBUG)

    def read() -> str:
        out, err = capfd.readouterr()
        return caplog.text + out + err

    return read


@pytest.mark.parametrize("preview", [False, True], ids=["up", "preview"])
def test_secrets_only_in_secret_inputs(preview: bool) -> None:
    mocks = RecordingMocks()
    _run(mocks, preview=preview)
    commands = {name: inputs for name, inputs in mocks.inputs.items() if "create" in inputs}
    assert len(commands) == 6
    for name, inputs in commands.items():
        assert _leaks(json.dumps(mask_secrets(inputs))) == [], name
        for operation in ("create", "update", "delete"):
            assert _leaks(str(inputs.get(operation, ""))) == [], (name, operation)
        connection = inputs["connection"]
        marked = connection if is_marked_secret(connection) else None
        if marked is None:
            assert is_marked_secret(connection["privateKey"]), name
            assert is_marked_secret(connection["privateKeyPassword"]), name


def test_hosts_stdin_is_secret_with_secret_registries() -> None:
    mocks = RecordingMocks()
    run = _run(mocks)
    for node in ("control-1", "worker-1", "worker-2"):
        assert is_marked_secret(mocks.inputs[f"{node}-hosts"]["stdin"]), node
        # The config command's input contains no registry value, so it stays readable in diffs.
        assert not is_marked_secret(mocks.inputs[f"{node}-config"]["stdin"]), node
        assert output_is_secret(run.namespace["mirror"].commands[f"{node}-hosts"].stdin) is True
    stdin = mocks.inputs["worker-1-hosts"]["stdin"]["value"]
    assert all(value in stdin for value in HEADER_VALUES)


def test_hosts_stdin_is_secret_with_secret_containerd() -> None:
    mocks = RecordingMocks()
    registries = {"docker.io": {"nexus": {"port": 8082}}}
    config, secret_names = stack_config(
        DEV_STACK,
        {"registries": registries},
        {
            "sshPrivateKey": KEY,
            "containerd": json.dumps(
                {"restartCommand": f"systemctl restart containerd # {PASSPHRASE}"}
            ),
        },
    )
    run_program(mocks, config, secret_names)
    assert is_marked_secret(mocks.inputs["worker-1-config"]["stdin"])
    assert is_marked_secret(mocks.inputs["worker-1-hosts"]["stdin"])


def test_secret_header_files_are_private() -> None:
    mocks = RecordingMocks()
    _run(mocks)
    stdin = mocks.inputs["worker-1-hosts"]["stdin"]["value"]
    assert "nm_file docker.io hosts.toml 0600 <<" in stdin
    assert "nm_file ghcr.io hosts.toml 0600 <<" in stdin


def test_outputs_hold_no_plain_secret() -> None:
    run = _run(RecordingMocks())
    assert _leaks(json.dumps(run.outputs["nodes"])) == []
    hosts_toml = run.namespace["mirror"].hosts_toml
    assert output_is_secret(hosts_toml.apply(lambda files: files["docker.io"])) is True
    assert all(value in run.outputs["hostsToml"]["docker.io"] for value in HEADER_VALUES)


def test_logs_hold_no_secret(captured: Any) -> None:
    _run(RecordingMocks())
    _run(RecordingMocks(), preview=True)
    text = captured()
    assert _leaks(text) == []


def test_plain_credential_header_is_warned_about(captured: Any) -> None:
    config, secret_names = stack_config(
        DEV_STACK, {"registries": REGISTRIES}, {"sshPrivateKey": KEY}
    )
    run_program(RecordingMocks(), config, secret_names)
    text = captured()
    assert 'X-Api-Key"]: looks like it carries a credential' in text
    assert "pulumi config set --secret --path" in text


def test_invalid_secret_config_hides_values() -> None:
    registries = {
        "docker.io": {
            "mirrors": [
                {
                    "url": "https://mirror.internal",
                    "headers": {"X-Api-Key": HEADER_VALUES[1] + "\nX-Injected: 1"},
                },
                {"url": f"mirror-{HEADER_VALUES[2]}.internal"},
            ]
        }
    }
    with pytest.raises(pulumi.RunError) as failure:
        _run(RecordingMocks(), registries=registries)
    message = str(failure.value)
    assert 'headers["X-Api-Key"][0]: header value contains a line break or NUL' in message
    assert "mirrors[1].url: URL has no scheme" in message
    assert _leaks(message) == []


def test_plain_private_key_is_rejected_without_showing_it() -> None:
    config, secret_names = stack_config(DEV_STACK, {"sshPrivateKey": KEY})
    with pytest.raises(pulumi.RunError) as failure:
        run_program(RecordingMocks(), config, secret_names)
    assert "sshPrivateKey: is stored in plain text (value not shown)" in str(failure.value)
    assert KEY_BODY not in str(failure.value)


def test_unpinned_host_keys_are_warned_about(captured: Any) -> None:
    _run(RecordingMocks())
    text = captured()
    assert "host keys are not verified for control-1, worker-1, worker-2" in text


def test_pinned_host_keys_give_no_warning(captured: Any) -> None:
    host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEbIVg2Ulq2ZVqd0ZJwkHlbAXSiAwsNRS5ld0vgCaY0m"
    nodes = [
        {"name": name, "host": f"10.0.0.{10 + index}", "hostKey": host_key}
        for index, name in enumerate(["control-1", "worker-1"])
    ]
    mocks = RecordingMocks()
    _run(mocks, overrides={"nodes": nodes})
    assert "host keys are not verified" not in captured()
    connection = mocks.inputs["worker-1-hosts"]["connection"]
    connection = connection["value"] if is_marked_secret(connection) else connection
    assert connection["hostKey"] == host_key


CIPHERTEXT = "v1:cmVuZGVyLWNpcGhlcnRleHQtOWk4dQ=="


def _render(tmp_path: Any, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    document = {"config": {f"nexus-mirror:{name}": value for name, value in config.items()}}
    (tmp_path / "Pulumi.review.yaml").write_text(yaml.safe_dump(document))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "components",
            "render",
            "--stack",
            "review",
            "--dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _render_config(header: Any, private_key: Any) -> dict[str, Any]:
    return {
        "registries": {
            "docker.io": {
                "mirrors": [{"url": "https://mirror.internal", "headers": {"X-Api-Key": header}}]
            }
        },
        "nodes": [{"name": "node-1", "host": "10.0.0.1"}],
        "sshPrivateKey": private_key,
    }


def test_render_shows_placeholder_for_secure_values(tmp_path: Any) -> None:
    result = _render(tmp_path, _render_config({"secure": CIPHERTEXT}, {"secure": CIPHERTEXT}))
    assert result.returncode == 0, result.stderr
    files = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert files
    emitted = result.stdout + result.stderr + "".join(path.read_text() for path in files)
    assert CIPHERTEXT not in emitted
    hosts_toml = tmp_path / "out/node-1/etc/containerd/certs.d/docker.io/hosts.toml"
    assert 'X-Api-Key = "[secret]"' in hosts_toml.read_text()


def test_render_hides_plain_private_key(tmp_path: Any) -> None:
    result = _render(tmp_path, _render_config({"secure": CIPHERTEXT}, KEY))
    assert result.returncode == 1
    assert "sshPrivateKey: is stored in plain text (value not shown)" in result.stderr
    assert KEY_BODY not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


def test_render_warns_about_plain_header_without_its_value(tmp_path: Any) -> None:
    result = _render(tmp_path, _render_config(HEADER_VALUES[1], {"secure": CIPHERTEXT}))
    assert result.returncode == 0, result.stderr
    assert 'X-Api-Key"]: looks like it carries a credential' in result.stderr
    assert HEADER_VALUES[1] not in result.stdout + result.stderr
