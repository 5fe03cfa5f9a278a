"""End to end with hostile values that validate: nothing they contain runs on the node.

Header names and values, the node name, the hosts directory, the state
directory and an inline CA carry shell syntax, quotes, here-document
delimiters and TOML syntax. The program is applied over real SSH to a lab
node. The test then checks that no marker file appeared and that the files
landed where the config put them and nowhere else. A CRI pull through the
mirror proves that containerd read the hosts.toml.
"""

from __future__ import annotations

import os
import shutil
import stat
import tomllib
from pathlib import Path
from typing import Any

from tests.e2e.ca import self_signed_pem
from tests.e2e.conftest import Stack
from tests.e2e.cri import ImageServiceClient
from tests.e2e.lab import IMAGE_REFERENCE, Lab, mirror_log

NODE = "node-a.hostile_1"
# Files containerd and the lab keep changing, left out of the before and after listing.
CHURN = ("root", "state", "containerd.log", "containerd.pid")


def _markers(directory: Path) -> list[str]:
    """Return shell snippets that each create a marker file if anything runs them."""
    return [
        f"$(touch {directory}/pwned-1)",
        f"`touch {directory}/pwned-2`",
        f"'; touch {directory}/pwned-3; '",
        f'"; touch {directory}/pwned-4; "',
        f"\\'$(touch {directory}/pwned-5)",
        "$(touch pwned-relative)",
    ]


def _ca_pem(hostile_lines: list[str]) -> str:
    """Return a real CA certificate with hostile text lines around it, as PEM files allow."""
    pem = self_signed_pem("nexus-mirror hostile test")
    return "\n".join([*hostile_lines, pem.strip("\n"), *hostile_lines]) + "\n"


def _listing(root: Path) -> dict[str, bytes]:
    """Return every regular file below ``root`` but containerd's own, with its content."""
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] in CHURN or not path.is_file() or path.is_symlink():
            continue
        files[str(relative)] = path.read_bytes()
    return files


def _pull(lab: Lab, node: str) -> list[str]:
    before = len(mirror_log(lab).splitlines())
    with ImageServiceClient(lab.node(node).socket) as client:
        if client.image_status(IMAGE_REFERENCE):
            client.remove_image(IMAGE_REFERENCE)
        client.pull_image(IMAGE_REFERENCE)
    return mirror_log(lab).splitlines()[before:]


def test_hostile_values_stay_data_on_the_node(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    markers = _markers(tmp_path)
    node = lab.node("node-a")
    hosts_dir = node.dir / f"certs d'q\"{markers[0]}{markers[1]}"
    state_dir = node.dir / f"state 'x' {markers[2]}"
    headers = {
        "X-Shell": markers,
        "X-Toml": '"] [host."https://evil.example"] x = "',
        "X-Delimiter": "NEXUS_MIRROR_EOF_1",
        "X-Text": "Grüße ✓ 中文 \\ \" '",
        "X-Punct$`|&'~": "name with shell characters",
    }
    pem = _ca_pem(["NEXUS_MIRROR_EOF_1", "NEXUS_MIRROR_EOF_2", *markers])
    config = stack.config()
    config["nodes"][0]["name"] = NODE
    config["nodes"][0]["containerd"]["configPath"] = str(hosts_dir)
    config["nodes"][0]["containerd"]["stateDir"] = str(state_dir)
    config["registries"] = {
        "docker.io": {
            "mirrors": [
                {
                    "url": f"http://127.0.0.1:{lab.mirror_port}",
                    "headers": headers,
                    "caPem": pem,
                },
                {
                    "url": f"http://127.0.0.1:{lab.mirror_port}/v2/$(touch%20x)",
                    "overridePath": True,
                },
            ]
        }
    }
    before = _listing(node.dir)

    try:
        _apply_and_check(stack, lab, config, tmp_path, hosts_dir, state_dir, headers, pem, before)
    finally:
        shutil.rmtree(hosts_dir, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)


def _apply_and_check(
    stack: Stack,
    lab: Lab,
    config: dict[str, Any],
    tmp_path: Path,
    hosts_dir: Path,
    state_dir: Path,
    headers: dict[str, Any],
    pem: str,
    before: dict[str, bytes],
) -> None:
    node = lab.node("node-a")
    home = Path(os.path.expanduser(f"~{lab.ssh_user}"))
    run = stack.up(config)

    report = run.outputs["nodes"][NODE]
    assert report["criPlugin"] == "ok"
    assert report["configPath"] == str(hosts_dir)
    # No snippet ran: not on the node, not in the SSH user's home, not in the test's directory.
    assert not list(tmp_path.glob("pwned-*"))
    assert not (home / "pwned-relative").exists()
    assert not Path("/tmp/nm-pwned").exists()

    after = _listing(node.dir)
    new = sorted(set(after) - set(before))
    hosts_files = sorted(str(p.relative_to(node.dir)) for p in hosts_dir.rglob("*") if p.is_file())
    state_files = sorted(str(p.relative_to(node.dir)) for p in state_dir.rglob("*") if p.is_file())
    assert hosts_files == [
        str((hosts_dir / "docker.io" / name).relative_to(node.dir))
        for name in ("hosts.toml", "mirror-0-ca.pem")
    ]
    assert str(state_dir.relative_to(node.dir) / "managed") in state_files
    assert new == sorted(hosts_files + state_files)
    changed = [name for name in before if after.get(name) != before[name]]
    assert changed == ["config.toml"]

    hosts_toml = hosts_dir / "docker.io" / "hosts.toml"
    loaded = tomllib.loads(hosts_toml.read_text())
    mirror = loaded["host"][f"http://127.0.0.1:{lab.mirror_port}"]
    assert mirror["header"] == {
        name: value[0] if isinstance(value, list) and len(value) == 1 else value
        for name, value in headers.items()
    }
    assert mirror["ca"] == "mirror-0-ca.pem"
    assert (hosts_dir / "docker.io" / "mirror-0-ca.pem").read_text() == pem
    assert list(loaded["host"]) == [
        f"http://127.0.0.1:{lab.mirror_port}",
        f"http://127.0.0.1:{lab.mirror_port}/v2/$(touch%20x)",
    ]
    # Headers may carry tokens, so hosts.toml is readable by root only.
    info = hosts_toml.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert (info.st_uid, info.st_gid) == (0, 0)
    assert stat.S_IMODE((hosts_dir / "docker.io" / "mirror-0-ca.pem").stat().st_mode) == 0o644
    containerd_config = tomllib.loads(node.config.read_text())
    cri = containerd_config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["registry"]["config_path"] == str(hosts_dir)

    served = _pull(lab, "node-a")
    assert any("/v2/library/nm-test/manifests/1?ns=docker.io" in line for line in served), served
    assert not list(tmp_path.glob("pwned-*"))

    stack.destroy()
    assert not (hosts_dir / "docker.io").exists()
    assert not list(tmp_path.glob("pwned-*"))
