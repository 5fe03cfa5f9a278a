"""Validation of the nodes and how to reach them: nexus-mirror:nodes and nexus-mirror:ssh."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import re
from typing import Any

from .model import Bastion, Containerd, Node, Ssh
from .validation import (
    IPV6_ZONE,
    Problems,
    check_absolute_path,
    check_bool,
    check_int,
    check_keys,
    check_name,
    check_text,
    is_hostname,
    key_path,
    key_path_child,
)

CONTAINERD_FIELDS = {
    "configPath": "config_path",
    "configFile": "config_file",
    "restartCommand": "restart_command",
    "manageConfigFile": "manage_config_file",
    "address": "address",
    "binDir": "bin_dir",
    "stateDir": "state_dir",
    "restartTimeout": "restart_timeout",
    "logCommand": "log_command",
}
_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")

_HOST_KEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,2}$"
)


def check_containerd(problems: Problems, key: str, value: Any, base: Containerd) -> Containerd:
    if value is None:
        return base
    if not isinstance(value, dict):
        problems.error(
            key, value, "must be an object", "Such as {configPath: /etc/containerd/certs.d}."
        )
        return base
    check_keys(problems, key, value, list(CONTAINERD_FIELDS))
    changes: dict[str, Any] = {}
    for name, field_name in CONTAINERD_FIELDS.items():
        if name not in value:
            continue
        item_key = key_path_child(key, name)
        item = value[name]
        checked: Any
        if name in ("configPath", "configFile", "address", "stateDir"):
            checked = check_absolute_path(problems, item_key, item)
        elif name == "binDir":
            checked = "" if item == "" else check_absolute_path(problems, item_key, item)
        elif name in ("restartCommand", "logCommand"):
            checked = check_text(problems, item_key, item, "command")
        elif name == "manageConfigFile":
            checked = check_bool(problems, item_key, item)
        else:
            checked = check_int(problems, item_key, item, 5, 3600, "number of seconds")
        if isinstance(checked, str) and name in ("configPath", "binDir") and ":" in checked:
            # containerd splits config_path, and sh splits PATH, at every ':'.
            problems.error(
                item_key,
                checked,
                "contains ':', which splits it into a list of directories",
                "Use a directory whose path has no ':'.",
            )
            checked = None
        if checked is not None:
            changes[field_name] = checked
    result = dataclasses.replace(base, **changes)
    config_path, state_dir = result.config_path, result.state_dir
    if config_path == "/" or config_path.startswith(state_dir + "/"):
        problems.error(
            key_path_child(key, "configPath"),
            config_path,
            "configPath must be a directory of its own, outside stateDir",
            "Use a directory such as /etc/containerd/certs.d.",
        )
    elif state_dir == "/" or state_dir == config_path or state_dir.startswith(config_path + "/"):
        problems.error(
            key_path_child(key, "stateDir"),
            state_dir,
            "stateDir must be a directory of its own, outside configPath",
            "Use a directory such as /var/lib/nexus-mirror.",
        )
    return result


def check_user(problems: Problems, key: str, value: Any) -> str | None:
    if not isinstance(value, str) or not _USER.fullmatch(value):
        problems.error(key, value, "invalid user name", "Use a login name such as root or ubuntu.")
        return None
    return value


def check_host_key(problems: Problems, key: str, value: Any) -> str | None:
    if not isinstance(value, str):
        problems.error(
            key,
            value,
            "must be a public host key",
            "Copy the 'type base64' part of ssh-keyscan's output, such as ssh-ed25519 AAAA....",
        )
        return None
    words = value.split()
    if len(words) >= 3 and _HOST_KEY.fullmatch(" ".join(words[1:3])):
        # A known_hosts or ssh-keyscan line starts with the host name.
        words = words[1:]
    text = " ".join(words[:2])
    if not _HOST_KEY.fullmatch(text) or not _key_blob_matches(words[0], words[1]):
        problems.error(
            key,
            value,
            "invalid host key",
            "Copy the 'type base64' part of ssh-keyscan's output, such as ssh-ed25519 AAAA....",
        )
        return None
    return text


def _key_blob_matches(key_type: str, encoded: str) -> bool:
    """True when the base64 key decodes to a whole SSH public key blob of ``key_type``.

    The blob is a sequence of length-prefixed fields (RFC 4253, section 6.6):
    the key type, then for ssh-ed25519 the 32-byte key (RFC 8709), for ssh-rsa
    the exponent and modulus, for ECDSA the curve name and point (RFC 5656).
    So a truncated or mistyped key is caught here rather than at connect time.
    """
    try:
        blob = base64.b64decode(encoded, validate=True)
    except ValueError:
        return False
    fields = []
    offset = 0
    while offset < len(blob):
        length = int.from_bytes(blob[offset : offset + 4], "big")
        offset += 4
        if offset + length > len(blob):
            return False
        fields.append(blob[offset : offset + length])
        offset += length
    if not fields or fields[0] != key_type.encode():
        return False
    if key_type == "ssh-ed25519":
        return len(fields) == 2 and len(fields[1]) == 32
    if key_type.startswith("ecdsa-sha2-"):
        return len(fields) == 3 and fields[1] == key_type.removeprefix("ecdsa-sha2-").encode()
    return len(fields) == 3


def check_ssh_host(problems: Problems, key: str, value: Any) -> str | None:
    if isinstance(value, str) and value and is_hostname(value.lower()):
        return value
    if isinstance(value, str):
        address, _, zone = value.partition("%")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            pass
        else:
            if not zone or (":" in address and IPV6_ZONE.fullmatch(zone)):
                return value
    problems.error(
        key, value, "invalid host", "Use a DNS name or an IP address, without scheme or port."
    )
    return None


def check_ssh(problems: Problems, value: Any) -> Ssh:
    key = key_path("ssh")
    if value is None:
        return Ssh()
    if not isinstance(value, dict):
        problems.error(key, value, "must be an object", "Such as {user: root}.")
        return Ssh()
    check_keys(problems, key, value, ["user", "bastion", "perDialTimeout", "dialErrorLimit"])
    user = check_user(problems, key_path_child(key, "user"), value.get("user", "root")) or "root"
    bastion = None
    if "bastion" in value:
        bastion_key = key_path_child(key, "bastion")
        raw = value["bastion"]
        if not isinstance(raw, dict):
            problems.error(
                bastion_key, raw, "must be an object", "Such as {host: 10.0.0.2, user: jump}."
            )
        else:
            check_keys(problems, bastion_key, raw, ["host", "port", "user", "hostKey"])
            host = check_ssh_host(problems, key_path_child(bastion_key, "host"), raw.get("host"))
            port = check_int(
                problems, key_path_child(bastion_key, "port"), raw.get("port", 22), 1, 65535, "port"
            )
            bastion_user = check_user(
                problems, key_path_child(bastion_key, "user"), raw.get("user", user)
            )
            host_key = None
            if "hostKey" in raw:
                host_key = check_host_key(
                    problems, key_path_child(bastion_key, "hostKey"), raw["hostKey"]
                )
            else:
                problems.warn(
                    bastion_key, "has no hostKey: the bastion's host key is not verified."
                )
            if host and port and bastion_user:
                bastion = Bastion(host=host, port=port, user=bastion_user, host_key=host_key)
    timeout = check_int(
        problems,
        key_path_child(key, "perDialTimeout"),
        value.get("perDialTimeout", 15),
        1,
        600,
        "number of seconds",
    )
    limit = check_int(
        problems,
        key_path_child(key, "dialErrorLimit"),
        value.get("dialErrorLimit", 10),
        1,
        1000,
        "count",
    )
    return Ssh(
        user=user, bastion=bastion, per_dial_timeout=timeout or 15, dial_error_limit=limit or 10
    )


def check_nodes(
    problems: Problems, value: Any, ssh: Ssh, containerd: Containerd
) -> tuple[Node, ...]:
    key = key_path("nodes")
    if value is None:
        problems.error(
            key, value, "no nodes are set", "List the nodes, such as [{host: 10.0.0.11}]."
        )
        return ()
    if not isinstance(value, list) or not value:
        problems.error(
            key, value, "must be a non-empty list", "List the nodes, such as [{host: 10.0.0.11}]."
        )
        return ()
    nodes: list[Node] = []
    names: dict[str, str] = {}
    endpoints: dict[tuple[str, int, str], str] = {}
    unpinned = []
    for index, raw in enumerate(value):
        node_key = key_path_child(key, index)
        if not isinstance(raw, dict):
            problems.error(
                node_key, raw, "must be an object with at least host", "Such as {host: 10.0.0.11}."
            )
            continue
        check_keys(
            problems, node_key, raw, ["name", "host", "port", "user", "hostKey", "containerd"]
        )
        host = check_ssh_host(problems, key_path_child(node_key, "host"), raw.get("host"))
        name = (
            check_name(problems, key_path_child(node_key, "name"), raw.get("name", host))
            if host
            else None
        )
        port = check_int(
            problems, key_path_child(node_key, "port"), raw.get("port", 22), 1, 65535, "port"
        )
        user = check_user(problems, key_path_child(node_key, "user"), raw.get("user", ssh.user))
        host_key = None
        if "hostKey" in raw:
            host_key = check_host_key(problems, key_path_child(node_key, "hostKey"), raw["hostKey"])
        else:
            unpinned.append(name or str(index))
        node_containerd = check_containerd(
            problems, key_path_child(node_key, "containerd"), raw.get("containerd"), containerd
        )
        if not (host and name and port and user):
            continue
        if name in names:
            problems.error(
                key_path_child(node_key, "name"),
                name,
                f"node name is already used by {names[name]}",
                "Give every node its own name.",
            )
            continue
        names[name] = node_key
        endpoint = (host, port, node_containerd.config_file)
        if endpoint in endpoints:
            problems.error(
                node_key,
                host,
                f"same host, port and configFile as {endpoints[endpoint]}",
                "List each node once.",
            )
            continue
        endpoints[endpoint] = node_key
        nodes.append(
            Node(
                name=name,
                host=host,
                port=port,
                user=user,
                host_key=host_key,
                containerd=node_containerd,
            )
        )
    if unpinned:
        problems.warn(
            key,
            f"host keys are not verified for {', '.join(unpinned)}: set hostKey (see ssh-keyscan) to pin them.",
        )
    return tuple(nodes)
