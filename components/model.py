"""Validated model of a nexus-mirror stack: what every later step works from.

Nothing here imports Pulumi. ``components.config`` builds these records from
stack config; rendering, the node script and the Pulumi component read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_CAPABILITIES = ("pull", "resolve")
VERIFY_NAMESPACE = "nexus-mirror-verify"


@dataclass(frozen=True)
class Credentials:
    """User name and password that containerd sends to one registry host."""

    username: str
    password: str = field(repr=False)
    auth: str = "header"
    """Delivery of the credentials to containerd: ``header`` (hosts.toml) or ``config`` (config.toml)."""


@dataclass(frozen=True)
class Host:
    """One registry host containerd may contact: a ``[host."<url>"]`` table or ``server``."""

    url: str
    capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
    override_path: bool = False
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()
    """Client certificates as (cert, key) pairs; an empty key means one file contains both."""
    skip_verify: bool = False
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    credentials: Credentials | None = None
    config_key: str = ""
    """Stack config key this host came from, for messages."""

    @property
    def probe_url(self) -> str:
        """URL of the registry API root (``GET /v2/``) that containerd derives from ``url``."""
        if self.override_path or self.url.endswith("/v2"):
            return self.url + "/"
        return self.url + "/v2/"

    @property
    def authority(self) -> str:
        """``host[:port]`` as containerd logs it."""
        return self.url.split("://", 1)[1].split("/", 1)[0]


@dataclass(frozen=True)
class InlineFile:
    """A file delivered next to hosts.toml, such as a CA certificate given as inline PEM."""

    name: str
    content: str = field(repr=False)
    mode: str = "0644"
    secret: bool = False
    """True for a private key: the file is written 0600 and the node input is a secret."""


@dataclass(frozen=True)
class Namespace:
    """One directory under containerd's config_path: a registry host or ``_default``."""

    name: str
    hosts: tuple[Host, ...]
    """Mirrors in the order containerd tries them."""
    server: Host | None = None
    """Upstream tried after the mirrors; None leaves containerd's default."""
    fallback: bool = True
    files: tuple[InlineFile, ...] = ()
    secret: bool = False
    """True when the rendered files contain values set as Pulumi secrets."""

    @property
    def holds_credentials(self) -> bool:
        """True when hosts.toml carries a password in an Authorization header."""
        hosts = [*self.hosts, *([self.server] if self.server else [])]
        return any(h.credentials is not None and h.credentials.auth == "header" for h in hosts)


@dataclass(frozen=True)
class Containerd:
    """How to reach and change containerd on a node."""

    config_path: str = "/etc/containerd/certs.d"
    config_file: str = "/etc/containerd/config.toml"
    restart_command: str = "systemctl restart containerd"
    manage_config_file: bool = True
    address: str = "/run/containerd/containerd.sock"
    bin_dir: str = ""
    state_dir: str = "/var/lib/nexus-mirror"
    restart_timeout: int = 60
    log_command: str = "journalctl -u containerd --no-pager -n 200 -o cat"


@dataclass(frozen=True)
class Bastion:
    """SSH jump host in front of the nodes."""

    host: str
    port: int = 22
    user: str = "root"
    host_key: str | None = None


@dataclass(frozen=True)
class Node:
    """One containerd node reached over SSH."""

    name: str
    host: str
    port: int = 22
    user: str = "root"
    host_key: str | None = None
    containerd: Containerd = field(default_factory=Containerd)
    secret: bool = False
    """True when the node's settings come from a key held as a Pulumi secret."""

    @property
    def uses_sudo(self) -> bool:
        return self.user != "root"


@dataclass(frozen=True)
class Ssh:
    """SSH settings shared by every node."""

    user: str = "root"
    bastion: Bastion | None = None
    per_dial_timeout: int = 15
    dial_error_limit: int = 10


@dataclass(frozen=True)
class Toleration:
    """One Kubernetes toleration of the sync pods; empty strings are fields left unset."""

    key: str = ""
    operator: str = "Exists"
    value: str = ""
    effect: str = ""
    toleration_seconds: int | None = None


@dataclass(frozen=True)
class ResourceQuantities:
    """CPU and memory requests and limits of a container, as Kubernetes quantities."""

    requests: tuple[tuple[str, str], ...] = (("cpu", "10m"), ("memory", "32Mi"))
    limits: tuple[tuple[str, str], ...] = (("memory", "128Mi"),)


@dataclass(frozen=True)
class KubernetesVerify:
    """Placement of the verification pods: the named nodes, or a sample of distinct nodes."""

    nodes: tuple[str, ...] = ()
    sample: int = 3
    timeout: int = 300
    """Seconds Pulumi waits for each pod to pull the image or fail to."""


@dataclass(frozen=True)
class Kubernetes:
    """Delivery through a DaemonSet (``nexus-mirror:delivery kubernetes``)."""

    image: str
    """Image of the sync pods; it needs a POSIX shell with awk, sed, cmp and sha256sum."""
    namespace: str = "nexus-mirror"
    context: str | None = None
    kubeconfig: str | None = None
    node_selector: tuple[tuple[str, str], ...] = (("kubernetes.io/os", "linux"),)
    tolerations: tuple[Toleration, ...] = (Toleration(),)
    """The default tolerates every taint, so the pods run on every node, control plane included."""
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    resources: ResourceQuantities = field(default_factory=ResourceQuantities)
    priority_class_name: str | None = None
    max_surge: int | str = 1
    max_unavailable: int | str = 0
    manage_config_file: bool = False
    verify: KubernetesVerify = field(default_factory=KubernetesVerify)


@dataclass(frozen=True)
class MirrorConfig:
    """Everything one stack requests, validated."""

    namespaces: tuple[Namespace, ...]
    nodes: tuple[Node, ...]
    ssh: Ssh = field(default_factory=Ssh)
    containerd: Containerd = field(default_factory=Containerd)
    verify_image: str | None = None
    max_parallel_restarts: int = 1
    has_private_key: bool = False
    warnings: tuple[str, ...] = ()
    secret_keys: frozenset[str] = frozenset()
    """Top-level keys held as Pulumi secrets, such as registries."""
    delivery: str = "ssh"
    """Delivery of the files to the nodes: ``ssh`` (nodes) or ``kubernetes`` (a DaemonSet)."""
    kubernetes: Kubernetes | None = None
