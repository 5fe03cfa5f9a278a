"""The program (``__main__.py`` with a real stack file) under Pulumi's mocks."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pulumi
import pytest

from tests.program_run import ROOT, output_is_secret, run_program, stack_config

KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
DEV_STACK = ROOT / "Pulumi.dev.yaml"
NODES = ["control-1", "worker-1", "worker-2"]


def _hosts_report(image: str, served_by: str) -> str:
    return json.dumps(
        {
            "mode": "hosts",
            "containerdVersion": "1.7.22",
            "configPath": "/etc/containerd/certs.d",
            "criPlugin": "ok",
            "changed": True,
            "files": [
                {
                    "path": "/etc/containerd/certs.d/docker.io/hosts.toml",
                    "sha256": "0" * 64,
                    "action": "written",
                }
            ],
            "mirrors": [
                {
                    "namespace": "docker.io",
                    "url": "https://nexus.example.net:8082",
                    "status": 401,
                    "up": True,
                }
            ],
            "verification": {
                "image": image,
                "servedBy": served_by,
                "hostsTried": [served_by],
                "ok": True,
                "error": None,
            },
        }
    )


class RecordingMocks(pulumi.runtime.Mocks):
    """Mocks that return what the node script prints and record when each command ran."""

    def __init__(self, served_by: str = "nexus.example.net:8082", delay: float = 0.0) -> None:
        self.resources: dict[str, dict[str, Any]] = {}
        self.intervals: dict[str, tuple[float, float]] = {}
        self.served_by = served_by
        self.delay = delay
        self.lock = threading.Lock()

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        started = time.monotonic()
        stdout = ""
        if args.name.endswith("-config"):
            time.sleep(self.delay)
            stdout = json.dumps(
                {"mode": "config", "configChanged": True, "restarted": True, "criPlugin": "ok"}
            )
        elif args.name.endswith("-hosts"):
            stdout = _hosts_report("docker.io/library/busybox:latest", self.served_by)
        if args.typ != "command:remote:Command":
            return f"{args.name}-id", args.inputs
        with self.lock:
            self.resources[args.name] = {"type": args.typ, "inputs": args.inputs}
            self.intervals[args.name] = (started, time.monotonic())
        return f"{args.name}-id", {**args.inputs, "stdout": stdout, "stderr": ""}

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}


def _run(mocks: RecordingMocks, **overrides: Any):
    config, secret_names = stack_config(DEV_STACK, overrides, {"sshPrivateKey": KEY})
    return run_program(mocks, config, secret_names)


def _resolve(output: pulumi.Output) -> Any:
    holder: dict[str, Any] = {}

    @pulumi.runtime.test
    def read() -> Any:
        return output.apply(lambda value: holder.update(value=value))

    read()
    return holder["value"]


def test_two_commands_per_node() -> None:
    mocks = RecordingMocks()
    _run(mocks)
    expected = {f"{node}-{step}" for node in NODES for step in ("config", "hosts")}
    assert set(mocks.resources) == expected
    assert {r["type"] for r in mocks.resources.values()} == {"command:remote:Command"}


def test_commands_are_short_and_fixed() -> None:
    mocks = RecordingMocks()
    _run(mocks)
    hosts = mocks.resources["worker-1-hosts"]["inputs"]
    config_create = mocks.resources["worker-1-config"]["inputs"]["create"]
    # A user other than root checks sudo -n first, then runs the script through it.
    assert hosts["create"].endswith("; exec sudo -n sh -s -- hosts")
    assert hosts["delete"].endswith("; exec sudo -n sh -s -- delete")
    assert config_create.endswith("; exec sudo -n sh -s -- config")
    assert config_create.startswith("nm_sudo=$(sudo -n true 2>&1 </dev/null) || ")
    assert "node worker-1: check sudo:" in config_create
    assert "\n" not in config_create
    assert "delete" not in mocks.resources["worker-1-config"]["inputs"]


def test_root_user_runs_without_sudo() -> None:
    mocks = RecordingMocks()
    _run(mocks, ssh={"user": "root"})
    assert mocks.resources["worker-1-hosts"]["inputs"]["create"] == "sh -s -- hosts"


def test_stdin_carries_readable_hosts_toml() -> None:
    mocks = RecordingMocks()
    _run(mocks)
    stdin = mocks.resources["worker-1-hosts"]["inputs"]["stdin"]
    assert '[host."https://nexus.example.net:8082"]' in stdin
    assert "nm_file docker.io hosts.toml 0644 <<'NEXUS_MIRROR_EOF_" in stdin
    assert stdin.rstrip().endswith('nm_main "$@" </dev/null')


def test_config_stdin_ignores_mirrors() -> None:
    first, second = RecordingMocks(), RecordingMocks()
    _run(first)
    _run(second, registries={"docker.io": {"nexus": {"port": 9999}}})
    assert (
        first.resources["worker-1-config"]["inputs"]
        == second.resources["worker-1-config"]["inputs"]
    )
    assert (
        first.resources["worker-1-hosts"]["inputs"]["stdin"]
        != second.resources["worker-1-hosts"]["inputs"]["stdin"]
    )


def test_children_parented_to_component() -> None:
    run = _run(RecordingMocks())
    urn = _resolve(run.namespace["mirror"].commands["worker-1-hosts"].urn)
    assert "nexus-mirror:index:NexusMirror$command:remote:Command::worker-1-hosts" in urn


@pytest.mark.parametrize(("limit", "overlap"), [(1, False), (3, True)])
def test_restarts_limited_by_rollout(limit: int, overlap: bool) -> None:
    mocks = RecordingMocks(delay=0.3)
    _run(mocks, rollout={"maxParallelRestarts": limit})
    spans = sorted(mocks.intervals[f"{node}-config"] for node in NODES)
    overlapping = any(
        later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)
    )
    assert overlapping is overlap


def test_hosts_after_own_config() -> None:
    mocks = RecordingMocks(delay=0.2)
    _run(mocks)
    for node in NODES:
        assert mocks.intervals[f"{node}-hosts"][0] >= mocks.intervals[f"{node}-config"][1]


def test_private_key_is_secret() -> None:
    run = _run(RecordingMocks())
    connection = run.namespace["mirror"].commands["worker-1-hosts"].connection
    assert output_is_secret(connection) is True


def test_stdin_secret_only_with_secret_registries() -> None:
    run = _run(RecordingMocks())
    stdin = run.namespace["mirror"].commands["worker-1-hosts"].stdin
    assert output_is_secret(stdin) is False
    config, secret_names = stack_config(DEV_STACK, None, {"sshPrivateKey": KEY})
    secret_names.append("nexus-mirror:registries")
    secret_run = run_program(RecordingMocks(), config, secret_names)
    secret_stdin = secret_run.namespace["mirror"].commands["worker-1-hosts"].stdin
    assert output_is_secret(secret_stdin) is True
    hosts_toml = secret_run.namespace["mirror"].hosts_toml
    assert output_is_secret(hosts_toml.apply(lambda files: files["docker.io"])) is True


def test_outputs_per_node() -> None:
    run = _run(RecordingMocks())
    assert set(run.outputs["hostsToml"]) == {"docker.io", "ghcr.io", "quay.io", "registry.k8s.io"}
    node = run.outputs["nodes"]["worker-1"]
    assert node["host"] == "10.0.0.11"
    assert node["containerdVersion"] == "1.7.22"
    assert node["configChanged"] is True
    assert node["restarted"] is True
    assert node["criPlugin"] == "ok"
    assert node["verification"]["servedBy"] == "nexus.example.net:8082"
    assert node["verification"]["throughMirror"] is True


def test_upstream_serving_is_not_through_mirror() -> None:
    run = _run(RecordingMocks(served_by="registry-1.docker.io"))
    assert run.outputs["nodes"]["worker-1"]["verification"]["throughMirror"] is False


def test_invalid_config_declares_nothing() -> None:
    mocks = RecordingMocks()
    with pytest.raises(Exception, match=r"nodes\[0\]\.port"):
        _run(mocks, nodes=[{"host": "10.0.0.1", "port": 0}])
    assert mocks.resources == {}


def test_manage_config_off_skips_config_command() -> None:
    mocks = RecordingMocks()
    _run(mocks, containerd={"manageConfigFile": False})
    assert not [name for name in mocks.resources if name.endswith("-config")]


def test_example_stack_file_validates(tmp_path: Path) -> None:
    from components.render import render_stack

    written = render_stack(DEV_STACK, tmp_path)
    assert (tmp_path / "worker-1/etc/containerd/certs.d/docker.io/hosts.toml") in written
