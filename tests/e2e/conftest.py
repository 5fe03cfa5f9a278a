"""Fixtures of the end-to-end tests: one loopback lab per test module, nodes reset per test."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.lab import Lab, build_image, cri_plugin_status, start_lab, stop_lab
from tests.e2e.pulumi_cli import CliStack, cli_requested
from tests.e2e.replay import ReplayMocks, ReplayState, destroy
from tests.e2e.stack import lab_config, write_stack_file
from tests.program_run import ProgramRun, run_program, stack_config

# A failed command fails its resource's registration in the Pulumi runtime,
# and asyncio logs each such future again when it is collected ("Future
# exception was never retrieved"). The test gets the failure as CommandFailed.
logging.getLogger("asyncio").setLevel(logging.CRITICAL)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A running lab with two containerd nodes and the test image in the upstream registry."""
    directory = Path(tempfile.mkdtemp(prefix="nm-e2e-", dir="/tmp"))
    started = start_lab(directory, nodes=2)
    try:
        build_image(started)
        for node in started.nodes:
            shutil.copy2(node.config, node.dir / "config.toml.pristine")
        yield started
    finally:
        stop_lab(directory)
        shutil.rmtree(directory, ignore_errors=True)


def reset_node(lab: Lab, name: str) -> None:
    """Put a lab node back as it was started: its own config.toml, no certs.d, no state."""
    node = lab.node(name)
    pristine = node.dir / "config.toml.pristine"
    changed = node.config.read_bytes() != pristine.read_bytes()
    shutil.copy2(pristine, node.config)
    shutil.rmtree(node.certs_dir, ignore_errors=True)
    shutil.rmtree(node.dir / "nexus-mirror-state", ignore_errors=True)
    if changed or cri_plugin_status(node) != "ok":
        subprocess.run(
            ["sh", "-c", node.restart_command], check=True, timeout=60, capture_output=True
        )


@dataclass
class Stack:
    """One stack on the lab: its file, its replayed state and the runs made so far."""

    lab: Lab
    directory: Path
    state: ReplayState = field(default_factory=ReplayState)

    def up(self, config: dict[str, Any], private_key: str | None = None) -> ProgramRun:
        """Write the stack file and apply it: ``pulumi up`` through the replay.

        PRIVATE_KEY replaces the lab's SSH key as nexus-mirror:sshPrivateKey.
        """
        stack_file = write_stack_file(self.directory / "Pulumi.lab.yaml", config)
        key = self.lab.ssh_key.read_text() if private_key is None else private_key
        values, secret_names = stack_config(stack_file, secrets={"sshPrivateKey": key})
        mocks = ReplayMocks(self.state)
        try:
            run = run_program(mocks, values, secret_names, stack="lab")
        except BaseException:
            # Commands of other nodes that had started still finish on their nodes.
            mocks.wait_idle()
            raise
        mocks.delete_unregistered()
        return run

    def destroy(self) -> None:
        destroy(self.state)

    def executions(self, operation: str | None = None, resource_suffix: str = "") -> list:
        return [
            e
            for e in self.state.executions
            if (operation is None or e.operation == operation)
            and e.resource.endswith(resource_suffix)
        ]

    def config(self, nodes: list[str] | None = None, **overrides: Any) -> dict[str, Any]:
        return lab_config(self.lab, nodes, **overrides)


@pytest.fixture
def stack(lab: Lab, tmp_path: Path) -> Iterator[Stack]:
    """A new stack on freshly reset lab nodes, replayed or, when asked for, with the Pulumi CLI."""
    for node in lab.nodes:
        reset_node(lab, node.name)
    if cli_requested():
        yield CliStack(lab, tmp_path)  # type: ignore[misc]
    else:
        yield Stack(lab, tmp_path)
