"""The end-to-end stack driven by the real Pulumi CLI, where it is installed.

Set ``NEXUS_MIRROR_E2E_PULUMI=cli`` to run the end-to-end tests with
``pulumi up`` and ``pulumi destroy`` on a file backend instead of the replay.
The engine's event log supplies what the replay records itself: which
command ran, with which operation, and when.
"""

# NOTE: the Pulumi CLI and its plugins cannot be installed on the machines
# this project is developed on, so this module has not been run there.

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.lab import Lab
from tests.e2e.replay import CommandFailed, Execution
from tests.e2e.stack import lab_config, write_stack_file
from tests.program_run import ROOT

VARIABLE = "NEXUS_MIRROR_E2E_PULUMI"


def cli_requested() -> bool:
    """Return True when the tests should use the Pulumi CLI; fail if it is missing."""
    if os.environ.get(VARIABLE) != "cli":
        return False
    if shutil.which("pulumi") is None:
        raise RuntimeError(f"{VARIABLE}=cli is set, but the pulumi command is not on PATH")
    return True


@dataclass
class CliRun:
    """Stack outputs of one ``pulumi up``."""

    outputs: dict[str, Any]


@dataclass
class CliStack:
    """A stack on the lab applied with the Pulumi CLI; same interface as the replayed stack."""

    lab: Lab
    directory: Path
    recorded: list[Execution] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = "lab-" + hashlib.sha256(str(self.directory).encode()).hexdigest()[:8]
        self.stack_file = self.directory / f"Pulumi.{self.name}.yaml"
        state = self.directory / "pulumi-state"
        state.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "PULUMI_BACKEND_URL": f"file://{state}",
            "PULUMI_CONFIG_PASSPHRASE": "nexus-mirror-e2e",
            "PULUMI_SKIP_UPDATE_CHECK": "true",
        }
        self._pulumi("stack", "init", self.name, with_config=False)

    def _pulumi(self, *arguments: str, with_config: bool = True, stdin: str | None = None) -> str:
        command = ["pulumi", *arguments, "--stack", self.name, "--non-interactive"]
        if with_config:
            command += ["--config-file", str(self.stack_file)]
        result = subprocess.run(
            command,
            cwd=ROOT,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode != 0:
            raise CommandFailed(
                f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result.stdout

    def _record(self, event_log: Path) -> None:
        started: dict[str, tuple[str, float]] = {}
        for line in event_log.read_text().splitlines():
            event = json.loads(line)
            if "resourcePreEvent" in event:
                metadata = event["resourcePreEvent"]["metadata"]
                if metadata.get("type") == "command:remote:Command" and metadata["op"] != "same":
                    started[metadata["urn"]] = (metadata["op"], event["timestamp"])
            elif "resOutputsEvent" in event:
                urn = event["resOutputsEvent"]["metadata"]["urn"]
                if urn in started:
                    operation, begin = started.pop(urn)
                    name = urn.rsplit("::", 1)[-1]
                    self.recorded.append(
                        Execution(name, operation, "", 0, "", "", begin, event["timestamp"])
                    )

    def up(self, config: dict[str, Any]) -> CliRun:
        write_stack_file(self.stack_file, config)
        self._pulumi(
            "config",
            "set",
            "--secret",
            "nexus-mirror:sshPrivateKey",
            stdin=self.lab.ssh_key.read_text(),
        )
        event_log = self.directory / "events.jsonl"
        event_log.unlink(missing_ok=True)
        try:
            self._pulumi("up", "--yes", "--skip-preview", "--event-log", str(event_log))
        finally:
            if event_log.exists():
                self._record(event_log)
        return CliRun(json.loads(self._pulumi("stack", "output", "--json", "--show-secrets")))

    def destroy(self) -> None:
        self._pulumi("destroy", "--yes", "--skip-preview")

    def executions(
        self, operation: str | None = None, resource_suffix: str = ""
    ) -> list[Execution]:
        return [
            e
            for e in self.recorded
            if (operation is None or e.operation == operation)
            and e.resource.endswith(resource_suffix)
        ]

    def config(self, nodes: list[str] | None = None, **overrides: Any) -> dict[str, Any]:
        return lab_config(self.lab, nodes, **overrides)
