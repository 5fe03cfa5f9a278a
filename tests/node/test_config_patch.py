"""Tests of the config.toml patcher in the node script.

Each test runs ``sh nexus-mirror-node.sh patch-config FILE VERSION CONFIG_PATH``,
which prints the candidate config.toml that config mode would validate. Set
NM_TEST_SHELL to run the script with another POSIX shell (for example
``busybox sh``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "components" / "node" / "nexus-mirror-node.sh"
SHELL = shlex.split(os.environ.get("NM_TEST_SHELL", "sh"))
CERTS = "/etc/containerd/certs.d"
V1_SECTION = "[plugins.cri.registry]"
V2_SECTION = '[plugins."io.containerd.grpc.v1.cri".registry]'
V3_SECTION = '[plugins."io.containerd.cri.v1.images".registry]'


def patch(
    tmp_path: Path, content: bytes | str | None, version: str = "1.6.20", path: str = CERTS
) -> subprocess.CompletedProcess[bytes]:
    """Run patch-config on ``content`` (None: no file) and return the process."""
    file = tmp_path / "config.toml"
    if content is not None:
        file.write_bytes(content.encode() if isinstance(content, str) else content)
    return subprocess.run(
        [*SHELL, str(SCRIPT), "patch-config", str(file), version, path],
        capture_output=True,
        timeout=30,
        check=False,
    )


def patched(tmp_path: Path, content: bytes | str | None, version: str = "1.6.20") -> str:
    """Return the candidate for ``content``; fail the test when it is rejected."""
    result = patch(tmp_path, content, version)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def last_stderr_line(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode().rstrip("\n").splitlines()[-1]


def registry(document: dict, *keys: str) -> dict:
    """Return the table at ``keys`` of a parsed TOML document."""
    table = document
    for key in keys:
        table = table[key]
    return table


def test_missing_file_on_containerd_1(tmp_path: Path) -> None:
    out = patched(tmp_path, None)

    assert out == f'version = 2\n\n{V2_SECTION}\n  config_path = "{CERTS}"\n'


def test_missing_file_on_containerd_2(tmp_path: Path) -> None:
    out = patched(tmp_path, None, version="2.0.0")

    assert out == f'version = 3\n\n{V3_SECTION}\n  config_path = "{CERTS}"\n'


def test_version_2_empty_config_path_replaced(tmp_path: Path) -> None:
    source = f'version = 2\n\n{V2_SECTION}\n  config_path = ""\n'

    out = patched(tmp_path, source)

    assert out == f'version = 2\n\n{V2_SECTION}\n  config_path = "{CERTS}"\n'


def test_version_3_on_containerd_2(tmp_path: Path) -> None:
    source = f'version = 3\n\n{V3_SECTION}\n  config_path = ""\n'

    out = patched(tmp_path, source, version="2.1.4")

    assert out == f'version = 3\n\n{V3_SECTION}\n  config_path = "{CERTS}"\n'


def test_version_1_uses_plugins_cri_section(tmp_path: Path) -> None:
    source = '[plugins.cri]\n  sandbox_image = "registry.k8s.io/pause:3.6"\n'

    out = patched(tmp_path, source)

    assert out == source + f'\n{V1_SECTION}\n  config_path = "{CERTS}"\n'


def test_version_1_section_present(tmp_path: Path) -> None:
    source = f'{V1_SECTION}\n  config_path = ""\n'

    out = patched(tmp_path, source)

    assert out == f'{V1_SECTION}\n  config_path = "{CERTS}"\n'


def test_empty_config_path_keeps_comment(tmp_path: Path) -> None:
    source = (
        "version = 2\n"
        f"{V2_SECTION}\n"
        "  # where hosts.toml files live\n"
        "  config_path = ''   # set by hand\n"
        '[plugins."io.containerd.grpc.v1.cri".registry.configs."r.example".auth]\n'
        '  username = "u"\n'
    )

    out = patched(tmp_path, source)

    expected = source.replace("config_path = ''", f'config_path = "{CERTS}"')
    assert out == expected


def test_missing_key_inserted_after_header(tmp_path: Path) -> None:
    source = (
        "version = 2\n"
        f"{V2_SECTION}\n"
        "\n"
        '  [plugins."io.containerd.grpc.v1.cri".registry.headers]\n'
        '    X-Meta = ["a"]\n'
    )

    out = patched(tmp_path, source)

    lines = source.splitlines(keepends=True)
    expected = "".join([*lines[:2], f'  config_path = "{CERTS}"\n', *lines[2:]])
    assert out == expected


def test_section_missing_is_appended(tmp_path: Path) -> None:
    source = 'version = 2\n\n[plugins."io.containerd.grpc.v1.cri"]\n  enable_cdi = true\n'

    out = patched(tmp_path, source)

    assert out == source + f'\n{V2_SECTION}\n  config_path = "{CERTS}"\n'


@pytest.mark.parametrize(
    "header",
    [
        '[ plugins . "io.containerd.grpc.v1.cri" . registry ]',
        "[plugins.'io.containerd.grpc.v1.cri'.registry]",
        '["plugins"."io.containerd.grpc.v1.cri"."registry"]  # trailing comment',
        "\t[plugins.\"io.containerd.grpc.v1.cri\".'registry']",
    ],
)
def test_header_spacing_and_quotes_match(tmp_path: Path, header: str) -> None:
    source = f"version = 2\n{header}\n  foo = 1\n"

    out = patched(tmp_path, source)

    assert out == f'version = 2\n{header}\n  config_path = "{CERTS}"\n  foo = 1\n'


def test_other_config_path_rejected(tmp_path: Path) -> None:
    source = f'version = 2\n{V2_SECTION}\n  config_path = "/opt/registry-hosts"\n'

    result = patch(tmp_path, source)

    assert result.returncode == 1
    assert result.stdout == b""
    line = last_stderr_line(result)
    assert line.startswith("nexus-mirror: node ")
    assert ": check config.toml: " in line
    assert '"/opt/registry-hosts"' in line
    assert f'"{CERTS}"' in line
    assert "nexus-mirror:containerd.configPath" in line


def test_config_path_list_rejected(tmp_path: Path) -> None:
    source = f'version = 2\n{V2_SECTION}\n  config_path = "{CERTS}:/etc/docker/certs.d"\n'

    result = patch(tmp_path, source)

    assert result.returncode == 1
    assert "several directories" in last_stderr_line(result)


def test_trailing_slash_path_kept(tmp_path: Path) -> None:
    source = f'version = 2\n{V2_SECTION}\n  config_path = "{CERTS}/"\n'

    out = patched(tmp_path, source)

    assert out == source


def test_dotted_config_path_replaced(tmp_path: Path) -> None:
    source = 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  registry.config_path = ""\n'

    out = patched(tmp_path, source)

    assert out == source.replace('""', f'"{CERTS}"')


def test_version_3_rejected_on_containerd_1(tmp_path: Path) -> None:
    result = patch(tmp_path, f'version = 3\n{V3_SECTION}\n  config_path = ""\n')

    assert result.returncode == 1
    assert "version = 3" in last_stderr_line(result)


def test_version_1_rejected_on_containerd_2(tmp_path: Path) -> None:
    result = patch(tmp_path, "[plugins.cri]\n  enable_cdi = true\n", version="2.0.0")

    assert result.returncode == 1
    assert "containerd config migrate" in last_stderr_line(result)


def test_comment_only_file_gets_version_line(tmp_path: Path) -> None:
    source = "# managed by hand\n"

    out = patched(tmp_path, source, version="2.0.0")

    assert out == source + f'\nversion = 3\n\n{V3_SECTION}\n  config_path = "{CERTS}"\n'


FULL_CONFIG = """\
# containerd config written by an operator
version = 2
root = "/var/lib/containerd"   # keep this comment
state = '/run/containerd'
oom_score = -999

[grpc]
  address = "/run/containerd/containerd.sock"
  max_recv_message_size = 16777216

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"   # "quoted" [brackets]
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = true
    [plugins."io.containerd.grpc.v1.cri".registry]
      # config_path = "/commented/out"
    [plugins."io.containerd.grpc.v1.cri".registry.configs."nexus.example:8082".auth]
      username = "puller"
      password = "p#ss'w\\"rd"
"""


def test_comments_and_settings_kept_byte_for_byte(tmp_path: Path) -> None:
    out = patched(tmp_path, FULL_CONFIG)

    source_lines = FULL_CONFIG.splitlines(keepends=True)
    out_lines = out.splitlines(keepends=True)
    header = source_lines.index('    [plugins."io.containerd.grpc.v1.cri".registry]\n')
    assert out_lines[: header + 1] == source_lines[: header + 1]
    assert out_lines[header + 1] == f'  config_path = "{CERTS}"\n'
    assert out_lines[header + 2 :] == source_lines[header + 1 :]


def test_patch_adds_only_config_path(tmp_path: Path) -> None:
    out = patched(tmp_path, FULL_CONFIG)

    before = tomllib.loads(FULL_CONFIG)
    after = tomllib.loads(out)
    registry(before, "plugins", "io.containerd.grpc.v1.cri", "registry")["config_path"] = CERTS
    assert after == before


MULTILINE_STRINGS = '''\
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  note = """
[plugins."io.containerd.grpc.v1.cri".registry]
config_path = "/from/basic/string"
\\"""
"""
  other = \'\'\'
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/from/literal/string"
\'\'\'
  endpoints = [
    ["plugins"],
    "x",
  ]
'''


def test_multiline_strings_not_taken_for_headers(tmp_path: Path) -> None:
    out = patched(tmp_path, MULTILINE_STRINGS)

    assert out == MULTILINE_STRINGS + f'\n{V2_SECTION}\n  config_path = "{CERTS}"\n'
    parsed = tomllib.loads(out)
    cri = registry(parsed, "plugins", "io.containerd.grpc.v1.cri")
    assert cri["registry"] == {"config_path": CERTS}
    assert "/from/basic/string" in cri["note"]


def test_crlf_line_endings_kept(tmp_path: Path) -> None:
    source = f"version = 2\r\n{V2_SECTION}\r\n  foo = 1\r\n".encode()

    result = patch(tmp_path, source)

    assert result.returncode == 0
    expected = f'version = 2\r\n{V2_SECTION}\r\n  config_path = "{CERTS}"\r\n  foo = 1\r\n'
    assert result.stdout == expected.encode()


def test_path_with_quote_and_backslash_is_escaped(tmp_path: Path) -> None:
    weird = '/srv/certs "a\\b"'
    result = patch(tmp_path, None, path=weird)

    assert result.returncode == 0
    parsed = tomllib.loads(result.stdout.decode())
    assert registry(parsed, "plugins", "io.containerd.grpc.v1.cri", "registry") == {
        "config_path": weird
    }


IDEMPOTENCE_CASES = {
    "missing": None,
    "v2-empty": f'version = 2\n{V2_SECTION}\n  config_path = ""\n',
    "v2-no-key": f"version = 2\n{V2_SECTION}\n",
    "v2-no-section": "version = 2\n[grpc]\n  uid = 0\n",
    "v1": "[plugins.cri]\n  enable_cdi = true\n",
    "comment-only": "# nothing here\n",
    "full": FULL_CONFIG,
    "multiline": MULTILINE_STRINGS,
}


@pytest.mark.parametrize("case", sorted(IDEMPOTENCE_CASES))
def test_patch_is_idempotent(tmp_path: Path, case: str) -> None:
    first = patched(tmp_path, IDEMPOTENCE_CASES[case])

    second = patched(tmp_path, first)

    assert second == first


@pytest.mark.parametrize(
    "case", ["missing", "v2-empty", "v2-no-section", "v1", "full", "multiline"]
)
def test_containerd_reads_patched_config_path(tmp_path: Path, case: str) -> None:
    """containerd 1.6 loads the candidate and reads the new config_path from it."""
    containerd = shutil.which("containerd")
    assert containerd, "containerd must be installed for this test"
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(patched(tmp_path, IDEMPOTENCE_CASES[case]))

    dump = subprocess.run(
        [containerd, "-c", str(candidate), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )

    assert dump.returncode == 0, dump.stderr
    parsed = tomllib.loads(dump.stdout)
    assert (
        registry(parsed, "plugins", "io.containerd.grpc.v1.cri", "registry")["config_path"] == CERTS
    )
