"""End to end: secrets stay secret over real SSH, and a pinned host key is enforced.

The stack uses a passphrase-protected SSH key and a secret registries key whose
mirror sends credential headers. The test runs ``pulumi up`` (replayed over
SSH) with a test pull, a CRI pull and ``pulumi destroy``. It then searches
everything the program and the lab emitted for the secret values: the inputs
the engine would store in plain text, the program's log output, the stack
outputs, the output of every SSH command, containerd's log and every file on
the node.
"""

from __future__ import annotations

import json
import logging
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pulumi
import pytest

from tests.e2e.ca import self_signed_pem
from tests.e2e.conftest import Stack
from tests.e2e.cri import ImageServiceClient
from tests.e2e.lab import IMAGE_REFERENCE, Lab, mirror_log
from tests.e2e.replay import (
    COMMAND_TYPE,
    CommandFailed,
    ReplayMocks,
    is_marked_secret,
    mask_secrets,
)
from tests.e2e.stack import write_stack_file
from tests.program_run import ProgramRun, run_program, stack_config

# Quotes and a space: the passphrase must reach ssh intact.
PASSPHRASE = "lab pass 'q\" 9z4x"
HEADER_VALUES = ("Bearer e2e-token-4r5t6y", "e2e-api-key-7u8i9o", "e2e-list-value-1a2s")


class RecordingReplay(ReplayMocks):
    """The replay, also keeping each command's inputs as the engine receives them."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(stack.state)
        self.raw_inputs: dict[str, dict[str, Any]] = {}

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        if args.typ == COMMAND_TYPE:
            self.raw_inputs[args.name] = dict(args.inputs)
        return super().new_resource(args)


def _encrypted_key(lab: Lab, directory: Path) -> str:
    """Return a copy of the lab's SSH key, encrypted with PASSPHRASE."""
    copy = directory / "id_passphrase"
    shutil.copy(lab.ssh_key, copy)
    copy.chmod(0o600)
    subprocess.run(
        ["ssh-keygen", "-q", "-p", "-P", "", "-N", PASSPHRASE, "-f", str(copy)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    unlocked = subprocess.run(
        ["ssh-keygen", "-y", "-P", "", "-f", str(copy)], capture_output=True, timeout=60
    )
    assert unlocked.returncode != 0, "the key copy is not encrypted"
    return copy.read_text()


def _key_lines(text: str) -> list[str]:
    """Return the base64 lines of a private key, each of which must stay secret."""
    return [line for line in text.splitlines() if line and "-----" not in line]


def _registries(lab: Lab, ca_pem: str) -> dict[str, Any]:
    return {
        "docker.io": {
            "mirrors": [
                {
                    "url": f"http://127.0.0.1:{lab.mirror_port}",
                    "caPem": ca_pem,
                    "headers": {
                        "Authorization": HEADER_VALUES[0],
                        "X-Api-Key": HEADER_VALUES[1],
                        "X-Trace": ["plain", HEADER_VALUES[2]],
                    },
                }
            ]
        }
    }


def _up(
    stack: Stack, config: dict[str, Any], secrets: dict[str, str]
) -> tuple[ProgramRun, RecordingReplay]:
    stack_file = write_stack_file(stack.directory / "Pulumi.lab.yaml", config)
    values, secret_names = stack_config(stack_file, secrets=secrets)
    mocks = RecordingReplay(stack)
    try:
        run = run_program(mocks, values, secret_names, stack="lab")
    except BaseException:
        mocks.wait_idle()
        raise
    mocks.delete_unregistered()
    return run, mocks


def _files_holding(root: Path, secrets: list[str], skip: set[Path]) -> list[str]:
    """Return ``path: secret`` for every file below ``root`` that contains a secret."""
    found = []
    for path in root.rglob("*"):
        if path in skip or not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def test_secrets_stay_out_of_everything_emitted(
    stack: Stack,
    lab: Lab,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    key = _encrypted_key(lab, tmp_path)
    ca_pem = self_signed_pem()
    secrets = [PASSPHRASE, *HEADER_VALUES, *_key_lines(key), *_key_lines(lab.ssh_key.read_text())]
    config = stack.config(verify={"image": IMAGE_REFERENCE})
    del config["registries"]
    node = lab.node("node-a")
    stage_dirs_before = set(Path("/tmp").glob("nexus-mirror.*"))

    run, mocks = _up(
        stack,
        config,
        {
            "sshPrivateKey": key,
            "sshPrivateKeyPassword": PASSPHRASE,
            "registries": json.dumps(_registries(lab, ca_pem)),
        },
    )

    report = run.outputs["nodes"]["node-a"]
    assert report["verification"]["ok"] is True, report
    assert report["verification"]["throughMirror"] is True
    before = len(mirror_log(lab).splitlines())
    with ImageServiceClient(node.socket) as client:
        if client.image_status(IMAGE_REFERENCE):
            client.remove_image(IMAGE_REFERENCE)
        client.pull_image(IMAGE_REFERENCE)
    assert any("ns=docker.io" in line for line in mirror_log(lab).splitlines()[before:])

    # The files that hold credentials are readable by root only.
    hosts_toml = node.certs_dir / "docker.io" / "hosts.toml"
    ca_file = node.certs_dir / "docker.io" / "mirror-0-ca.pem"
    for path in (hosts_toml, ca_file):
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600, path
        assert (info.st_uid, info.st_gid) == (0, 0), path
    assert all(value in hosts_toml.read_text() for value in HEADER_VALUES)

    # What the engine stores, shows in a preview and logs.
    assert set(mocks.raw_inputs) == {"node-a-config", "node-a-hosts"}
    for name, inputs in mocks.raw_inputs.items():
        plain = json.dumps(mask_secrets(inputs))
        assert [s for s in secrets if s in plain] == [], name
        assert is_marked_secret(inputs["connection"]), name
    assert is_marked_secret(mocks.raw_inputs["node-a-hosts"]["stdin"])
    assert [s for s in secrets if s in json.dumps(run.outputs["nodes"])] == []
    hosts_output = run.namespace["mirror"].hosts_toml.apply(lambda files: files["docker.io"])
    assert _is_secret(hosts_output)

    stack.destroy()
    assert not hosts_toml.exists()

    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    # The capture works: the program's warnings are in it, the secret mirror's URL masked.
    assert "the URL is plain HTTP" in logged
    assert [s for s in secrets if s in logged] == []
    executions = stack.executions()
    assert {e.operation for e in executions} == {"create", "delete"}
    for execution in executions:
        assert [s for s in secrets if s in execution.command] == [], execution.resource
        emitted = execution.stdout + execution.stderr
        assert [s for s in secrets if s in emitted] == [], execution.resource
    assert [s for s in secrets if s in node.log.read_text(errors="replace")] == []
    # No file on the node contains a secret once the stack is destroyed. The
    # node script's scratch directories are gone too: one of them contained
    # ctr's debug log of the test pull, which lists request headers.
    assert _files_holding(node.dir, secrets, skip=set()) == []
    new_stage_dirs = set(Path("/tmp").glob("nexus-mirror.*")) - stage_dirs_before
    assert [d for d in new_stage_dirs if _files_holding(d, secrets, set())] == []


def _is_secret(output: pulumi.Output[Any]) -> bool:
    import asyncio

    holder: dict[str, bool] = {}

    @pulumi.runtime.test
    def read() -> Any:
        async def check() -> None:
            holder["value"] = await output.is_secret()

        return asyncio.ensure_future(check())

    read()
    return holder["value"]


def test_wrong_host_key_fails_before_anything_runs(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    other = tmp_path / "other_host_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    wrong = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    node = lab.node("node-a")
    config_before = node.config.read_bytes()
    config = stack.config()
    config["nodes"][0]["hostKey"] = wrong

    with pytest.raises(CommandFailed) as failure:
        stack.up(config)

    assert "Host key verification failed" in str(failure.value)
    assert node.config.read_bytes() == config_before
    assert not node.certs_dir.exists()
    assert all(e.returncode == 255 for e in stack.executions())


def test_known_hosts_line_pins_the_key(stack: Stack, lab: Lab) -> None:
    # The line ssh-keyscan prints, host name first, is accepted as hostKey.
    line = next(
        line
        for line in lab.known_hosts.read_text().splitlines()
        if line.startswith(f"[{lab.ssh_host}]:{lab.ssh_port} ")
    )
    config = stack.config()
    config["nodes"][0]["hostKey"] = line
    run = stack.up(config)
    assert run.outputs["nodes"]["node-a"]["criPlugin"] == "ok"
    connection = stack.state.resources["node-a-hosts"]["inputs"]["connection"]
    assert connection["hostKey"] == " ".join(line.split()[1:3])
