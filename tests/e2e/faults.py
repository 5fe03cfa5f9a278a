"""Helpers of the fault-injection tests: node snapshots, stand-in registries, mounts.

Each fault test injects one fault for real on the loopback lab and applies.
It then checks that the failing node ends with a working CRI plugin and
either its old or its new configuration, and that the failure names the
node, the step and the cause. It also checks that other nodes are not held
back and that applying again once the fault is gone converges without manual
clean-up. These helpers take and compare node snapshots, run stand-in
registries and mount file systems inside a test's own directory.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.lab import NODE_SCRIPT, Lab, Node, cri_plugin_status
from tests.e2e.replay import CommandFailed

# Part of the name of every temporary file that the node script creates.
TEMPORARY_MARK = ".nexus-mirror."
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class NodeSnapshot:
    """What a node runs and serves: config.toml, the hosts tree and containerd's pid."""

    config: bytes
    hosts: dict[str, bytes]
    containerd_pid: int


# Fault tests give containerd this many seconds to restart, so a failure shows quickly.
RESTART_TIMEOUT = 5


def fault_config(stack: Any, nodes: list[str] | None = None) -> dict:
    """Return the lab stack config with the short restart timeout on every node."""
    config = stack.config(nodes, rollout={"maxParallelRestarts": 2})
    for node in config["nodes"]:
        node["containerd"]["restartTimeout"] = RESTART_TIMEOUT
    return config


def failed_apply_line(stack: Any, config: dict, node: str = "node-a") -> str:
    """Apply ``config``, expect the apply to fail, and return the node script's error line."""
    with pytest.raises(CommandFailed) as failure:
        stack.up(config)
    return error_line(str(failure.value), node)


def tree(directory: Path) -> dict[str, bytes]:
    """Return every regular file under DIRECTORY by relative path, hidden ones included."""
    if not directory.is_dir():
        return {}
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def containerd_pid(node: Node) -> int:
    return int(node.pid_file.read_text().strip())


def snapshot(node: Node, certs_dir: Path | None = None) -> NodeSnapshot:
    """Take a snapshot of NODE, with the hosts files of CERTS_DIR when given."""
    return NodeSnapshot(
        config=node.config.read_bytes(),
        hosts=tree(certs_dir or node.certs_dir),
        containerd_pid=containerd_pid(node),
    )


def assert_unchanged(node: Node, before: NodeSnapshot, certs_dir: Path | None = None) -> None:
    """Check that NODE still has the config.toml, hosts files and containerd of BEFORE."""
    after = snapshot(node, certs_dir)
    assert after.config == before.config, "config.toml changed"
    assert after.hosts == before.hosts, "hosts files changed"
    assert after.containerd_pid == before.containerd_pid, "containerd was restarted"
    assert cri_plugin_status(node) == "ok"


def state_files(node: Node) -> list[str]:
    """Return the names in the node's nexus-mirror state directory."""
    state = node.dir / "nexus-mirror-state"
    return sorted(path.name for path in state.iterdir()) if state.is_dir() else []


def stray_files(*directories: Path) -> list[Path]:
    """Return the temporary files of node script runs left under DIRECTORIES."""
    found = []
    for directory in directories:
        if directory.is_dir():
            found += [path for path in directory.rglob("*") if TEMPORARY_MARK in path.name]
    return sorted(found)


def error_line(message: str, node: str) -> str:
    """Return the last "nexus-mirror: node NODE: STEP: CAUSE. FIX" line of MESSAGE."""
    prefix = f"nexus-mirror: node {node}: "
    lines = [line for line in message.splitlines() if line.startswith(prefix)]
    assert lines, f"no line starts with {prefix!r} in:\n{message}"
    return lines[-1]


def process_start(pid: int) -> float:
    """Return the time process PID started, in seconds since the epoch."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # Field 22 of /proc/PID/stat (index 19 after the command name) is the
    # start time in clock ticks after boot.
    ticks = int(fields[19])
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return int(line.split()[1]) + ticks / CLOCK_TICKS
    raise RuntimeError("/proc/stat has no btime line")


def runs_current_config(node: Node) -> bool:
    """Return True when NODE's containerd started after config.toml was last written."""
    # Process start times have a resolution of one clock tick (1/CLK_TCK s,
    # 10 ms with the usual 100 ticks a second).
    return process_start(containerd_pid(node)) + 0.02 >= node.config.stat().st_mtime


def restart(node: Node) -> None:
    """Restart NODE's containerd with the lab's own restart command."""
    subprocess.run(["sh", "-c", node.restart_command], check=True, timeout=60, capture_output=True)


def stop_containerd(node: Node) -> None:
    subprocess.run(
        ["sh", str(NODE_SCRIPT), "stop", str(node.dir)], check=True, timeout=60, capture_output=True
    )


def start_containerd(node: Node) -> None:
    subprocess.run(
        ["sh", str(NODE_SCRIPT), "start", str(node.dir)],
        check=True,
        timeout=60,
        capture_output=True,
    )


def once(flag: Path, fault: str, normal: str) -> str:
    """Return a shell command that runs FAULT while FLAG exists (removing it), else NORMAL."""
    quoted = shlex.quote(str(flag))
    return f"if [ -e {quoted} ]; then rm -f {quoted}; {fault}; else {normal}; fi"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, event: str) -> None:
    """Wait until CONDITION returns True; raise TimeoutError naming EVENT after TIMEOUT s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{event} did not happen within {timeout} s")
        time.sleep(0.05)


def upstream_log(lab: Lab) -> list[str]:
    """Return the upstream registry's log lines."""
    return Path(lab.env["UPSTREAM_LOG"]).read_text(errors="replace").splitlines()


def containerd_requests(lines: list[str], repository: str) -> list[str]:
    """Return the access log lines of requests that containerd sent for REPOSITORY."""
    return [line for line in lines if f"/v2/{repository}/" in line and "containerd/" in line]


# --- stand-in registries -----------------------------------------------------


class _StubHandler(http.server.BaseHTTPRequestHandler):
    """Respond to every request as the server's ``mode`` says."""

    server: _StubServer

    def _answer(self, body: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        mode = self.server.mode
        if mode == "registry" and self.path.split("?")[0] == "/v2/":
            self._send(200, "application/json", b"{}", body, registry=True)
        elif mode == "registry":
            self._send(404, "application/json", b'{"errors":[]}', body, registry=True)
        elif mode == "error":
            self._send(500, "text/plain", b"internal server error\n", body)
        else:
            page = b"<!DOCTYPE html><html><body><h1>Sign in to continue</h1></body></html>\n"
            self._send(200, "text/html; charset=utf-8", page, body)

    def _send(
        self, status: int, content_type: str, data: bytes, body: bool, registry: bool = False
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if registry:
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _StubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode: str) -> None:
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.mode = mode
        self.requests: list[str] = []


@dataclass
class StubRegistry:
    """A running stand-in for a mirror on 127.0.0.1, with the requests it received."""

    server: _StubServer

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def requests(self) -> list[str]:
        return self.server.requests


@contextlib.contextmanager
def stub_registry(mode: str) -> Iterator[StubRegistry]:
    """Run a stand-in mirror for the with block.

    MODE is ``registry`` (``GET /v2/`` returns 200 with the registry API
    header, everything else 404), ``error`` (500 for every request) or
    ``html`` (200 with an HTML login page for every request).
    """
    server = _StubServer(mode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield StubRegistry(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class Forwarder:
    """A TCP forwarder on 127.0.0.1 to another port: a mirror that can be taken down."""

    def __init__(self, target_port: int, port: int = 0) -> None:
        """Listen on PORT (0: any free port) and forward each connection to TARGET_PORT."""
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        """Close the listener and every open connection: the port refuses connections."""
        # shutdown wakes the thread blocked in accept(), which close alone does not.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.close()
        self.thread.join(timeout=10)


# --- mounts inside a test's own directory -------------------------------------


def _run(*command: str) -> None:
    subprocess.run(list(command), check=True, timeout=30, capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of SIZE (such as 256k) on PATH, an empty directory, for the with block."""
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "nexus-mirror-test", str(path))
    try:
        yield path
    finally:
        _run("umount", str(path))


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """Make PATH (a file or directory) read-only with a bind mount over it, for the with block."""
    _run("mount", "--bind", str(path), str(path))
    try:
        _run("mount", "-o", "remount,bind,ro", str(path))
        yield path
    finally:
        _run("umount", str(path))


def fill(directory: Path) -> Path:
    """Write a file in DIRECTORY until its file system is full; return the file."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with filler.open("wb", buffering=0) as stream:
        try:
            while True:
                stream.write(chunk)
        except OSError:
            pass
    return filler


# --- processes of node script runs -------------------------------------------


def script_processes(mode: str) -> list[int]:
    """Return the pids of running node scripts in MODE (``sh -s -- MODE``)."""
    expected = b"\0".join([b"sh", b"-s", b"--", mode.encode()]) + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes() == expected:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def parent_pid(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1])


def process_exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# --- node commands outside the program ------------------------------------------


@dataclass(frozen=True)
class NodeCommand:
    """One node command as the program declares it: the command line and its stdin."""

    command: str
    stdin: str


def node_commands(lab: Lab, config: dict, name: str = "node-a") -> dict[str, NodeCommand]:
    """Return the config, hosts and delete commands of node NAME for stack CONFIG."""
    # Imported here: tests of the lab alone need no program modules.
    from components.config import parse_config
    from components.node_script import config_input, hosts_input, node_command

    parsed = parse_config(config)
    [node] = [node for node in parsed.nodes if node.name == name]
    return {
        "config": NodeCommand(node_command(node, "config"), config_input(node, parsed).text),
        "hosts": NodeCommand(node_command(node, "hosts"), hosts_input(node, parsed).text),
        "delete": NodeCommand(node_command(node, "delete"), hosts_input(node, parsed).text),
    }


def connection(lab: Lab, user: str = "root") -> dict[str, object]:
    """Return the connection settings that the program gives pulumi-command for the lab."""
    from tests.e2e.stack import host_key

    return {
        "host": lab.ssh_host,
        "port": lab.ssh_port,
        "user": user,
        "privateKey": lab.ssh_key.read_text(),
        "hostKey": host_key(lab),
    }
