"""Replaying pulumi-command over real SSH: the e2e tests' stand-in for the engine.

Under Pulumi's mocks the program registers its resources as usual; this
``Mocks`` runs each ``command:remote:Command`` the way pulumi-command's remote
provider does: ``create`` for a new resource, ``update`` (or ``create`` when
there is none) when any input changed, nothing when none did, and the old
``delete`` with the old inputs once a resource is gone from the program or the
stack is destroyed. Commands run with the OpenSSH client, with the
resource's connection settings and its stdin. A failing command fails the
resource with pulumi-command's own message shape and leaves its last state.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi

COMMAND_TYPE = "command:remote:Command"
# How Pulumi's RPC layer marks a secret value; the mocks receive inputs in that form.
_SIG_KEY = "4dabf18193072939515e22adb298388d"
_SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"
# Inputs whose change makes pulumi-command run update (or create) again.
RUN_INPUTS = (
    "create",
    "update",
    "delete",
    "stdin",
    "environment",
    "connection",
    "logging",
    "triggers",
)


def reveal(value: Any) -> Any:
    """Return ``value`` with every secret replaced by the plain value it wraps."""
    if isinstance(value, dict):
        if value.get(_SIG_KEY) == _SECRET_SIG:
            return reveal(value["value"])
        return {key: reveal(item) for key, item in value.items()}
    if isinstance(value, list):
        return [reveal(item) for item in value]
    return value


def is_marked_secret(value: Any) -> bool:
    """Return whether an input value, as the mocks receive it, is a secret."""
    return isinstance(value, dict) and value.get(_SIG_KEY) == _SECRET_SIG


def mask_secrets(value: Any) -> Any:
    """Return ``value`` with every secret replaced by a placeholder, as a preview shows it."""
    if is_marked_secret(value):
        return "[secret]"
    if isinstance(value, dict):
        return {key: mask_secrets(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    return value


class CommandFailed(Exception):
    """Raised when a replayed command exits non-zero, as pulumi-command fails the resource."""


@dataclass
class Execution:
    """One command run over SSH."""

    resource: str
    operation: str
    command: str
    returncode: int
    stdout: str
    stderr: str
    started: float
    finished: float


@dataclass
class ReplayState:
    """The stack state the replay keeps between runs: inputs and outputs per command."""

    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    executions: list[Execution] = field(default_factory=list)


def _ssh(
    connection: dict[str, Any], command: str, stdin: str | None, timeout: float
) -> tuple[int, str, str]:
    """Run ``command`` on the connection's host as pulumi-command's SSH session would."""
    with tempfile.TemporaryDirectory(prefix="nm-ssh-") as scratch:
        key_file = Path(scratch) / "key"
        key_file.write_text(connection["privateKey"])
        os.chmod(key_file, 0o600)
        options = ["-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"]
        environment = dict(os.environ)
        passphrase = connection.get("privateKeyPassword")
        if passphrase:
            # BatchMode would forbid the passphrase prompt, so ssh runs this
            # program for it, which prints it from the environment. Every
            # other prompt stays off.
            askpass = Path(scratch) / "askpass"
            askpass.write_text("#!/bin/sh\nprintf '%s\\n' \"$NM_REPLAY_PASSPHRASE\"\n")
            os.chmod(askpass, 0o700)
            environment.update(
                SSH_ASKPASS=str(askpass),
                SSH_ASKPASS_REQUIRE="force",
                NM_REPLAY_PASSPHRASE=passphrase,
            )
            options += ["-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no"]
            options += ["-o", "NumberOfPasswordPrompts=1"]
        else:
            options += ["-o", "BatchMode=yes"]
        host_key = connection.get("hostKey")
        if host_key:
            known = Path(scratch) / "known_hosts"
            port = int(connection.get("port", 22))
            name = connection["host"] if port == 22 else f"[{connection['host']}]:{port}"
            known.write_text(f"{name} {host_key}\n")
            options += ["-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes"]
        else:
            # pulumi-command accepts any host key when hostKey is not set.
            options += ["-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no"]
        argv = [
            "ssh",
            *options,
            "-i",
            str(key_file),
            "-p",
            str(int(connection.get("port", 22))),
            "-l",
            connection.get("user", "root"),
            connection["host"],
            command,
        ]
        result = subprocess.run(
            argv,
            input=stdin or "",
            capture_output=True,
            text=True,
            timeout=timeout,
            env=environment,
        )
    return result.returncode, result.stdout, result.stderr


class ReplayMocks(pulumi.runtime.Mocks):
    """Pulumi mocks that execute remote commands for real and keep state across runs."""

    def __init__(self, state: ReplayState, *, timeout: float = 300.0) -> None:
        self.state = state
        self.timeout = timeout
        self.registered: set[str] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running = 0

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until no command runs over SSH.

        A failed program run returns at its first failure while commands that
        had already started still run, as in ``pulumi up``, which lets running
        steps finish and starts no new ones. Raises TimeoutError after TIMEOUT
        seconds (default: the command timeout).
        """
        with self._idle:
            if not self._idle.wait_for(lambda: self._running == 0, timeout or self.timeout):
                raise TimeoutError(f"{self._running} commands still run over SSH")

    def _run(self, name: str, operation: str, inputs: dict[str, Any], command: str) -> Execution:
        started = time.time()
        with self._lock:
            self._running += 1
        try:
            code, stdout, stderr = _ssh(
                inputs["connection"], command, inputs.get("stdin"), self.timeout
            )
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()
        execution = Execution(name, operation, command, code, stdout, stderr, started, time.time())
        with self._lock:
            self.state.executions.append(execution)
        if code != 0:
            # pulumi-command: "<exit status>: running <command>:\n<stdout and stderr>"
            raise CommandFailed(
                f"{name}: exit status {code}: running {command!r}:\n{stdout}{stderr}"
            )
        return execution

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        if args.typ != COMMAND_TYPE:
            return f"{args.name}-id", dict(args.inputs)
        inputs = reveal(dict(args.inputs))
        with self._lock:
            self.registered.add(args.name)
            old = self.state.resources.get(args.name)
        if old is not None and all(old["inputs"].get(k) == inputs.get(k) for k in RUN_INPUTS):
            return old["id"], {**old["inputs"], **old["outputs"]}
        if old is None:
            operation, command = "create", inputs.get("create")
        else:
            operation, command = "update", inputs.get("update") or inputs.get("create")
        outputs = {"stdout": "", "stderr": ""}
        if command:
            execution = self._run(args.name, operation, inputs, command)
            # pulumi-command keeps stdout and stderr without one trailing newline.
            outputs = {
                "stdout": execution.stdout.removesuffix("\n"),
                "stderr": execution.stderr.removesuffix("\n"),
            }
        with self._lock:
            self.state.resources[args.name] = {
                "id": f"{args.name}-id",
                "inputs": inputs,
                "outputs": outputs,
            }
            if args.name not in self.state.order:
                self.state.order.append(args.name)
        return f"{args.name}-id", {**inputs, **outputs}

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}

    def delete(self, name: str) -> None:
        """Run the delete command of ``name`` with its last inputs and drop it from the state."""
        old = self.state.resources[name]
        command = old["inputs"].get("delete")
        if command:
            self._run(name, "delete", old["inputs"], command)
        del self.state.resources[name]
        self.state.order.remove(name)

    def delete_unregistered(self) -> list[str]:
        """Delete what the last program run no longer declares, newest first; return the names."""
        gone = [name for name in reversed(self.state.order) if name not in self.registered]
        for name in gone:
            self.delete(name)
        return gone


def destroy(state: ReplayState, *, timeout: float = 300.0) -> None:
    """Run every delete command in reverse creation order, as ``pulumi destroy`` does."""
    mocks = ReplayMocks(state, timeout=timeout)
    for name in list(reversed(state.order)):
        mocks.delete(name)
