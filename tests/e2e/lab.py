"""Helpers for end-to-end tests that run against the loopback lab (lab/lab.sh).

The lab runs an upstream registry, a pull-through mirror registry in place of
Nexus, an sshd for root logins by key and containerd nodes, all on 127.0.0.1.
`start_lab` starts one in a directory and returns its settings from lab.env.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import shlex
import socket
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LAB_SCRIPT = REPO_ROOT / "lab" / "lab.sh"
NODE_SCRIPT = REPO_ROOT / "lab" / "containerd-node.sh"

IMAGE_REPOSITORY = "library/nm-test"
IMAGE_TAG = "1"
# The image as kubelet names it. containerd reads the hosts.toml for it from
# the docker.io directory.
IMAGE_REFERENCE = f"docker.io/{IMAGE_REPOSITORY}:{IMAGE_TAG}"

# Environment variable that sets the lab's base port. Without it, start_lab
# picks the first free block of ports from DEFAULT_BASE_PORT on.
BASE_PORT_VARIABLE = "NEXUS_MIRROR_LAB_BASE_PORT"
DEFAULT_BASE_PORT = 15000
BASE_PORT_STEP = 100
BASE_PORT_CANDIDATES = 40
# Ports that lab.sh uses relative to the base port (see lab/lab.sh).
SERVICE_PORT_OFFSETS = (0, 1, 22)
STREAM_PORT_OFFSET = 30
# Start attempts when another process takes a chosen port before lab.sh
# binds it.
START_ATTEMPTS = 3
START_TIMEOUT_SECONDS = 180

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
# platform.machine() names mapped to OCI architecture names.
OCI_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


class LabStartError(RuntimeError):
    """Failure of lab.sh start, with lab.sh's output in the message."""


@dataclass(frozen=True)
class Node:
    """One lab containerd node, as listed in lab.env."""

    name: str
    dir: Path
    socket: Path
    config: Path
    certs_dir: Path
    log: Path
    pid_file: Path
    stream_port: int
    restart_command: str
    log_command: str


@dataclass(frozen=True)
class Lab:
    """Settings of a running lab, read from DIR/lab.env."""

    dir: Path
    env: dict[str, str]
    upstream_port: int
    upstream_url: str
    mirror_port: int
    mirror_url: str
    mirror_log: Path
    ssh_host: str
    ssh_port: int
    ssh_user: str
    ssh_key: Path
    known_hosts: Path
    nodes: tuple[Node, ...]

    def node(self, name: str = "node-a") -> Node:
        """Return the node called NAME (node-a, node-b, ...)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(
            f"lab in {self.dir} has no node {name!r}; nodes: {[n.name for n in self.nodes]}"
        )

    @property
    def upstream_host(self) -> str:
        """Host and port of the upstream registry, as image references use it."""
        return f"127.0.0.1:{self.upstream_port}"


@dataclass(frozen=True)
class PushedImage:
    """An image that build_image pushed to the upstream registry."""

    repository: str
    tags: tuple[str, ...]
    manifest_digest: str
    config_digest: str
    layer_digest: str
    text: str


def parse_lab_env(path: Path) -> dict[str, str]:
    """Parse a lab.env file of KEY='value' lines in shell syntax."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, separator, raw_value = stripped.partition("=")
        if not separator or not key.isidentifier():
            raise ValueError(f"{path}:{number}: invalid line {line!r}, expected KEY=value")
        words = shlex.split(raw_value)
        values[key] = words[0] if words else ""
    return values


def load_lab(lab_dir: Path) -> Lab:
    """Read DIR/lab.env of a started lab."""
    lab_dir = Path(lab_dir)
    env = parse_lab_env(lab_dir / "lab.env")
    nodes = []
    for name in env["NODES"].split():
        prefix = "NODE_" + name.removeprefix("node-").upper()
        nodes.append(
            Node(
                name=name,
                dir=Path(env[f"{prefix}_DIR"]),
                socket=Path(env[f"{prefix}_SOCKET"]),
                config=Path(env[f"{prefix}_CONFIG"]),
                certs_dir=Path(env[f"{prefix}_CERTS_DIR"]),
                log=Path(env[f"{prefix}_LOG"]),
                pid_file=Path(env[f"{prefix}_PID_FILE"]),
                stream_port=int(env[f"{prefix}_STREAM_PORT"]),
                restart_command=env[f"{prefix}_RESTART_COMMAND"],
                log_command=env[f"{prefix}_LOG_COMMAND"],
            )
        )
    return Lab(
        dir=Path(env["LAB_DIR"]),
        env=env,
        upstream_port=int(env["UPSTREAM_PORT"]),
        upstream_url=env["UPSTREAM_URL"],
        mirror_port=int(env["MIRROR_PORT"]),
        mirror_url=env["MIRROR_URL"],
        mirror_log=Path(env["MIRROR_LOG"]),
        ssh_host=env["SSH_HOST"],
        ssh_port=int(env["SSH_PORT"]),
        ssh_user=env["SSH_USER"],
        ssh_key=Path(env["SSH_KEY"]),
        known_hosts=Path(env["SSH_KNOWN_HOSTS"]),
        nodes=tuple(nodes),
    )


def lab_ports(base_port: int, node_count: int) -> list[int]:
    """Return the TCP ports that a lab with BASE_PORT and NODE_COUNT nodes binds."""
    ports = [base_port + offset for offset in SERVICE_PORT_OFFSETS]
    ports += [base_port + STREAM_PORT_OFFSET + index for index in range(node_count)]
    return ports


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def find_free_base_port(node_count: int, first: int = DEFAULT_BASE_PORT, skip: int = 0) -> int:
    """Return the first base port from FIRST on whose lab ports are all free.

    Candidates are FIRST, FIRST+100, ...; SKIP drops that many free candidates,
    for a retry after another process took the ports of an earlier one.
    """
    for index in range(BASE_PORT_CANDIDATES):
        base_port = first + index * BASE_PORT_STEP
        if all(_port_is_free(port) for port in lab_ports(base_port, node_count)):
            if skip == 0:
                return base_port
            skip -= 1
    last = first + (BASE_PORT_CANDIDATES - 1) * BASE_PORT_STEP
    raise LabStartError(
        f"no free block of lab ports on 127.0.0.1 between base ports {first} and {last}"
    )


def _run_lab_script(arguments: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(LAB_SCRIPT), *arguments],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_lab(lab_dir: Path, nodes: int = 1, base_port: int | None = None) -> Lab:
    """Start a lab in LAB_DIR with lab.sh and return its settings.

    Without BASE_PORT, the port comes from $NEXUS_MIRROR_LAB_BASE_PORT or
    from the first free block of ports, and a start that loses a port to
    another process is tried again on the next free block.
    Raises LabStartError with lab.sh's output when the lab does not start.
    """
    lab_dir = Path(lab_dir)
    if base_port is None and os.environ.get(BASE_PORT_VARIABLE):
        base_port = int(os.environ[BASE_PORT_VARIABLE])
    attempts = 1 if base_port is not None else START_ATTEMPTS
    output = ""
    for attempt in range(attempts):
        chosen_port = (
            base_port if base_port is not None else find_free_base_port(nodes, skip=attempt)
        )
        arguments = ["start", str(lab_dir), "--nodes", str(nodes), "--base-port", str(chosen_port)]
        result = _run_lab_script(arguments, timeout=START_TIMEOUT_SECONDS)
        output = f"$ sh {LAB_SCRIPT} {' '.join(arguments)}\n{result.stdout}{result.stderr}"
        if result.returncode == 0:
            return load_lab(lab_dir)
        if "already in use" not in output:
            break
    raise LabStartError(f"lab did not start in {lab_dir}:\n{output}")


def stop_lab(lab_dir: Path) -> None:
    """Stop every process of the lab in LAB_DIR. Raises RuntimeError when lab.sh stop fails."""
    result = _run_lab_script(["stop", str(lab_dir)], timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"lab.sh stop {lab_dir} failed:\n{result.stdout}{result.stderr}")


@contextlib.contextmanager
def running_lab(lab_dir: Path, nodes: int = 1, base_port: int | None = None) -> Iterator[Lab]:
    """Start a lab in LAB_DIR for the with block and stop it afterwards."""
    lab = start_lab(lab_dir, nodes=nodes, base_port=base_port)
    try:
        yield lab
    finally:
        stop_lab(lab_dir)


def _sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _oci_architecture() -> str:
    machine = platform.machine()
    return OCI_ARCHITECTURES.get(machine, machine)


def _layer_tar(text: str) -> bytes:
    data = text.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        member = tarfile.TarInfo("nm-test.txt")
        member.size = len(data)
        member.mode = 0o644
        member.mtime = 0
        archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def _write_blob(layout: Path, data: bytes) -> str:
    digest = _sha256_digest(data)
    (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
    return digest


def _write_oci_layout(layout: Path, text: str) -> tuple[str, str, str]:
    """Write a one-layer OCI image layout; return manifest, config and layer digests."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    layer_tar = _layer_tar(text)
    # mtime=0 keeps the gzip stream, and so the layer digest, reproducible.
    layer = gzip.compress(layer_tar, mtime=0)
    layer_digest = _write_blob(layout, layer)

    config = json.dumps(
        {
            "architecture": _oci_architecture(),
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [_sha256_digest(layer_tar)]},
        },
        sort_keys=True,
    ).encode()
    config_digest = _write_blob(layout, config)

    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": len(layer)}],
        },
        sort_keys=True,
    ).encode()
    manifest_digest = _write_blob(layout, manifest)

    index = {
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest)}
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    return manifest_digest, config_digest, layer_digest


def registry_manifest_digest(registry_url: str, repository: str, tag: str) -> str:
    """Return the Docker-Content-Digest that a registry reports for REPOSITORY:TAG."""
    request = urllib.request.Request(
        f"{registry_url}/v2/{repository}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": OCI_MANIFEST},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.headers["Docker-Content-Digest"])


def build_image(
    lab: Lab,
    tags: Sequence[str] = (IMAGE_TAG,),
    repository: str = IMAGE_REPOSITORY,
    text: str | None = None,
) -> PushedImage:
    """Build a one-layer OCI image and push it to the lab's upstream registry.

    The layer contains nm-test.txt with TEXT, so a different TEXT gives a
    different manifest digest. skopeo pushes the image as REPOSITORY:TAG for
    each of TAGS. Raises RuntimeError when a push fails or the registry then
    reports another digest than the one built.
    """
    if not tags:
        raise ValueError("build_image needs at least one tag")
    if text is None:
        text = f"nexus-mirror lab image {repository}\n"
    images_dir = lab.dir / "images"
    images_dir.mkdir(exist_ok=True)
    layout = Path(tempfile.mkdtemp(prefix="oci-", dir=images_dir))
    manifest_digest, config_digest, layer_digest = _write_oci_layout(layout / "layout", text)

    for tag in tags:
        destination = f"docker://{lab.upstream_host}/{repository}:{tag}"
        command = [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            f"oci:{layout / 'layout'}",
            destination,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"skopeo copy to {destination} failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        pushed_digest = registry_manifest_digest(lab.upstream_url, repository, tag)
        if pushed_digest != manifest_digest:
            raise RuntimeError(
                f"upstream registry reports {pushed_digest} for {repository}:{tag}, "
                f"but the built manifest is {manifest_digest}"
            )

    return PushedImage(
        repository=repository,
        tags=tuple(tags),
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layer_digest=layer_digest,
        text=text,
    )


def ssh_arguments(lab: Lab) -> list[str]:
    """Return OpenSSH client options for a root login to the lab's sshd.

    The options pin the host key to the lab's known_hosts, use only the lab's
    key and never prompt, and ignore ~/.ssh/config.
    """
    return [
        "-F",
        "/dev/null",
        "-i",
        str(lab.ssh_key),
        "-p",
        str(lab.ssh_port),
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={lab.known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "LogLevel=ERROR",
    ]


def run_ssh(
    lab: Lab,
    command: str,
    stdin: str | bytes | None = None,
    timeout: float = 120,
) -> tuple[int, str, str]:
    """Run COMMAND through the remote shell over SSH and return (returncode, stdout, stderr).

    STDIN is sent as the command's standard input, and None sends nothing. The
    return code is the command's, or 255 when ssh itself fails.
    """
    if isinstance(stdin, str):
        stdin = stdin.encode()
    result = subprocess.run(
        ["ssh", *ssh_arguments(lab), "--", f"{lab.ssh_user}@{lab.ssh_host}", command],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return (
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
    )


def mirror_log(lab: Lab) -> str:
    """Return the mirror registry's log, whose request lines show URIs such as ...?ns=docker.io."""
    return lab.mirror_log.read_text(errors="replace")


def cri_plugin_status(node: Node) -> str:
    """Return the CRI plugin status that `ctr plugins ls` lists for NODE (ok, error, ...)."""
    result = subprocess.run(
        ["ctr", "--address", str(node.socket), "plugins", "ls"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == "io.containerd.grpc.v1" and fields[1] == "cri":
            return fields[-1]
    raise RuntimeError(f"ctr plugins ls on {node.socket} lists no CRI plugin:\n{result.stdout}")
