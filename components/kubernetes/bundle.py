"""The rendered files as ConfigMap and Secret data for the sync pods.

A pod mounts both objects in one directory and runs
``node/kubernetes-sync.sh``, which builds the node script's standard input
from this data. ``settings.sh`` has the NM_* settings of SSH delivery
without the node name, which the pod takes from its spec. ``hosts.tail`` has
one ``nm_file`` line per file, which reads the file from the mounted
directory, and the ``nm_probe`` lines. ``files.list`` is what the readiness
check compares, and the files themselves follow under their keys. Anything
that contains a credential or a private key goes into the Secret, and
everything else is readable in the ConfigMap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from dataclasses import dataclass
from importlib import resources

from ..hosts_toml import file_modes, render_files
from ..model import MirrorConfig, Node
from ..node_script import SCRIPT_NAME, node_script, probe_lines, settings_lines

SYNC_SCRIPT_NAME = "kubernetes-sync.sh"
FILES_DIR = "/nexus-mirror/files"
SCRIPTS_DIR = "/nexus-mirror/bin"
SETTINGS_KEY = "settings.sh"
TAIL_KEY = "hosts.tail"
LIST_KEY = "files.list"
# The API server rejects ConfigMap and Secret data of more than 1 MiB
# (1048576 bytes). The check stays below that, with room for the keys.
MAX_DATA_BYTES = 1_000_000
# scrypt cost for the pod template hash of secret data: 16 MiB of memory
# (128 * r * n bytes) and about 60 ms per hash on a 2-core test machine, so
# testing password guesses against the hash is slow.
SCRYPT_COST = {"n": 2**14, "r": 8, "p": 1, "maxmem": 64 * 2**20, "dklen": 32}


class BundleError(Exception):
    """Raised when the rendered files do not fit into a ConfigMap or Secret."""


@dataclass(frozen=True)
class BundleFile:
    """One file of a namespace directory, and the key that carries it."""

    namespace: str
    name: str
    mode: str
    key: str
    content: str
    secret: bool


@dataclass(frozen=True)
class Bundle:
    """Everything the sync pods mount: ConfigMap data, Secret data and the scripts."""

    config_data: dict[str, str]
    secret_data: dict[str, str]
    scripts: dict[str, str]
    files: tuple[BundleFile, ...]

    @property
    def files_sha256(self) -> str:
        """SHA-256 of the scripts and the ConfigMap data, for the pod template."""
        text = json.dumps([self.scripts, self.config_data], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def secret_scrypt(self) -> str:
        """scrypt hash of the Secret data (empty for no data), for the pod template.

        The annotation is readable by anyone who may read the DaemonSet, so a
        plain SHA-256 would let them test password guesses quickly.
        """
        if not self.secret_data:
            return ""
        text = json.dumps(self.secret_data, sort_keys=True).encode()
        return hashlib.scrypt(text, salt=b"nexus-mirror pod template", **SCRYPT_COST).hex()  # type: ignore[arg-type]


def sync_script() -> str:
    """Return the sync wrapper exactly as it ships in the package."""
    package = __package__.rsplit(".", 1)[0]
    return resources.files(package).joinpath("node", SYNC_SCRIPT_NAME).read_text(encoding="utf-8")


def file_key(namespace: str, name: str) -> str:
    """Return the data key of a file: ``docker.io__hosts.toml``.

    Keys may hold only letters, digits, '-', '_' and '.', so the ':' of
    ``host:port`` becomes '_', which no registry host name contains.
    """
    return f"{namespace.replace(':', '_')}__{name}"


def _is_private(mode: str) -> bool:
    return int(mode, 8) & 0o077 == 0


def bundle_node(config: MirrorConfig) -> Node:
    """Return the node whose settings every sync pod uses. Its name is a placeholder."""
    if config.kubernetes is None:
        raise ValueError("the stack does not set delivery kubernetes")
    containerd = dataclasses.replace(
        config.containerd, manage_config_file=config.kubernetes.manage_config_file
    )
    return Node(name="kubernetes", host="localhost", containerd=containerd)


def build_bundle(config: MirrorConfig) -> Bundle:
    """Split the rendered files of every namespace into ConfigMap and Secret data."""
    node = bundle_node(config)
    # Each pod sets NM_NODE from its spec.nodeName, so the placeholder name is dropped.
    settings = [line for line in settings_lines(node, "") if not line.startswith("NM_NODE=")]
    tail: list[str] = []
    files: list[BundleFile] = []
    heredocs = 0
    for namespace in config.namespaces:
        modes = file_modes(namespace)
        inline_secret = {inline.name for inline in namespace.files if inline.secret}
        for name, content in render_files(namespace).items():
            # The same bytes the SSH here-document writes: it ends every file with a newline.
            if not content.endswith("\n"):
                content += "\n"
            mode = modes[name]
            key = file_key(namespace.name, name)
            secret = namespace.secret or name in inline_secret or _is_private(mode)
            files.append(BundleFile(namespace.name, name, mode, key, content, secret))
            words = " ".join(shlex.quote(word) for word in ("nm_file", namespace.name, name, mode))
            tail.append(f'{words} <"$NM_K8S_FILES"/{shlex.quote(key)}')
        probes, heredocs = probe_lines(node, namespace, heredocs)
        tail.extend(probes)
    keys = [item.key for item in files]
    if len(set(keys)) != len(keys):
        raise BundleError(f"two files map to the same ConfigMap key: {sorted(keys)}")

    # Namespace names, URLs and CA paths of a secret registries key stay secret
    # too, and the probes of a mirror with credentials carry its Authorization header.
    names_secret = any(namespace.secret for namespace in config.namespaces)
    tail_secret = names_secret or any(
        host.credentials is not None for namespace in config.namespaces for host in namespace.hosts
    )
    settings_secret = bool(config.secret_keys & {"containerd"})
    config_data: dict[str, str] = {}
    secret_data: dict[str, str] = {}

    def place(key: str, value: str, secret: bool) -> None:
        if secret:
            secret_data[key] = value
        else:
            config_data[key] = value

    place(SETTINGS_KEY, "\n".join(settings) + "\n", settings_secret)
    place(TAIL_KEY, "\n".join(tail) + "\n", tail_secret)
    listing = "".join(f"{f.namespace}\t{f.name}\t{f.mode}\t{f.key}\n" for f in files)
    place(LIST_KEY, listing, names_secret)
    for item in files:
        place(item.key, item.content, item.secret)
    scripts = {SCRIPT_NAME: node_script(), SYNC_SCRIPT_NAME: sync_script()}
    for kind, data in (("ConfigMap", config_data), ("Secret", secret_data), ("scripts", scripts)):
        size = sum(len(key) + len(value.encode()) for key, value in data.items())
        if size > MAX_DATA_BYTES:
            raise BundleError(
                f"the {kind} data would be {size} bytes, above the {MAX_DATA_BYTES} bytes the "
                "API server stores in one object: shorten the inline PEM files in nexus-mirror:registries"
            )
    return Bundle(
        config_data=config_data, secret_data=secret_data, scripts=scripts, files=tuple(files)
    )
