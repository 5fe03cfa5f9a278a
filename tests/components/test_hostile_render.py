"""Hostile values that validate stay in their place: in hosts.toml and in the node input.

hosts.toml is parsed back with tomllib and compared with what the stack config
sets, written out here independently of the renderer. The node input is
run by real shells with the node script's functions replaced by recorders, so
each value is compared with what the shell received, and no command in a value
may run.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from components.config import parse_config
from components.hosts_toml import RenderError, file_modes, render_files, render_hosts_toml
from components.model import MirrorConfig
from components.node_script import config_input, hosts_input, node_script
from components.validation import ConfigError
from tests.components.hostile_inputs import (
    BASE,
    HOSTILE_STRINGS,
    PEM,
    SECRET_KEYS,
    corpus,
    substitute,
)

MIRROR = "https://mirror.internal"
SERVER = "https://registry-1.docker.io"
SHELLS = ["dash", "bash"]
SETTINGS = {
    "NM_NODE": "name",
    "NM_CONFIG_PATH": "config_path",
    "NM_CONFIG_FILE": "config_file",
    "NM_RESTART_COMMAND": "restart_command",
    "NM_LOG_COMMAND": "log_command",
    "NM_ADDRESS": "address",
    "NM_BIN_DIR": "bin_dir",
    "NM_STATE_DIR": "state_dir",
}
# The node script's functions are replaced by recorders. Each call appends
# NAME=VALUE fields, each ended by NUL (validation keeps NUL out of every
# value), to $NM_TEST_RECORD: per function its call count, per call the
# argument count, the arguments and the here-document. Builtins only, so a
# thousand tails run in seconds.
RECORDER_HELPERS = r"""
nm_test_put() {
    printf '%s=%s\0' "$1" "$2" >>"$NM_TEST_RECORD"
}
nm_test_record() {
    nm_test_function=$1
    shift
    eval "nm_test_calls=\$((\${nm_test_count_$nm_test_function:-0} + 1))"
    eval "nm_test_count_$nm_test_function=\$nm_test_calls"
    nm_test_call="$nm_test_function.$nm_test_calls"
    nm_test_put "$nm_test_function" "$nm_test_calls"
    nm_test_put "$nm_test_call.argc" "$#"
    nm_test_arg_number=0
    for nm_test_arg in "$@"; do
        nm_test_arg_number=$((nm_test_arg_number + 1))
        nm_test_put "$nm_test_call.$nm_test_arg_number" "$nm_test_arg"
    done
}
nm_test_stdin() {
    printf '%s.data=' "$nm_test_call" >>"$NM_TEST_RECORD"
    while IFS= read -r nm_test_line; do
        printf '%s\n' "$nm_test_line"
    done >>"$NM_TEST_RECORD"
    printf '\0' >>"$NM_TEST_RECORD"
}
nm_main() {
    for nm_test_name in NM_NODE NM_CONFIG_PATH NM_CONFIG_FILE NM_MANAGE_CONFIG \
        NM_RESTART_COMMAND NM_RESTART_TIMEOUT NM_LOG_COMMAND NM_ADDRESS NM_BIN_DIR \
        NM_STATE_DIR NM_VERIFY_IMAGE; do
        eval "nm_test_value=\${$nm_test_name-unset}"
        nm_test_put "var.$nm_test_name" "$nm_test_value"
    done
    nm_test_put main "$*"
}
"""
_FUNCTION = re.compile(r"^(nm_[a-z_]+)\(\) \{", re.M)


def _recorders(tail: str) -> str:
    """Return shell that defines a recorder for every function of the node script.

    A function that the tail feeds a here-document also records its input.
    """
    lines = [RECORDER_HELPERS]
    for name in sorted(set(_FUNCTION.findall(node_script())) - {"nm_main"}):
        reads_stdin = re.search(rf"^{name} .*<<'", tail, re.M) is not None
        body = f'nm_test_record {name} "$@"' + ("; nm_test_stdin" if reads_stdin else "")
        lines.append(f"{name}() {{ {body}; }}")
    return "\n".join(lines)


def _mirror_config(server: str | None = SERVER, **mirror: Any) -> dict[str, Any]:
    registry: dict[str, Any] = {"mirrors": [{"url": MIRROR, **mirror}]}
    if server:
        registry["server"] = server
    return {
        "registries": {"docker.io": registry},
        "nodes": [{"name": "node-1", "host": "10.0.0.1"}],
    }


def _intended(mirror: dict[str, Any], server: bool = True) -> dict[str, Any]:
    """Return what hosts.toml must mean, written from the stack config by hand."""
    data: dict[str, Any] = {}
    if server:
        data["server"] = SERVER
        data["capabilities"] = ["pull", "resolve", "push"]
    data["host"] = {MIRROR: {"capabilities": ["pull", "resolve"], **mirror}}
    return data


def _tables(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[")]


def _accepted(config: dict[str, Any]) -> MirrorConfig | None:
    try:
        return parse_config(config)
    except ConfigError:
        return None


HEADER_TABLES = [f'[host."{MIRROR}"]', f'[host."{MIRROR}".header]']


@pytest.mark.parametrize("value", HOSTILE_STRINGS, ids=range(len(HOSTILE_STRINGS)))
def test_header_value_stays_in_its_string(value: str) -> None:
    config = _accepted(_mirror_config(headers={"X-Value": value, "X-After": "after"}))
    if config is None:
        return
    text = render_hosts_toml(config.namespaces[0])
    header = {"X-Value": value, "X-After": "after"}
    assert tomllib.loads(text) == _intended({"header": header})
    assert list(tomllib.loads(text)["host"][MIRROR]["header"]) == ["X-Value", "X-After"]
    assert _tables(text) == HEADER_TABLES


@pytest.mark.parametrize("value", HOSTILE_STRINGS, ids=range(len(HOSTILE_STRINGS)))
def test_header_value_list_stays_in_its_array(value: str) -> None:
    config = _accepted(_mirror_config(headers={"X-Values": ["first", value, "last"]}))
    if config is None:
        return
    text = render_hosts_toml(config.namespaces[0])
    assert tomllib.loads(text) == _intended({"header": {"X-Values": ["first", value, "last"]}})
    assert _tables(text) == HEADER_TABLES


@pytest.mark.parametrize("name", HOSTILE_STRINGS, ids=range(len(HOSTILE_STRINGS)))
def test_header_name_stays_a_key(name: str) -> None:
    config = _accepted(_mirror_config(headers={name: "v", "X-After": "after"}))
    if config is None:
        return
    text = render_hosts_toml(config.namespaces[0])
    assert tomllib.loads(text) == _intended({"header": {name: "v", "X-After": "after"}})
    assert _tables(text) == HEADER_TABLES


@pytest.mark.parametrize("path", HOSTILE_STRINGS, ids=range(len(HOSTILE_STRINGS)))
def test_ca_and_client_paths_stay_in_their_strings(path: str) -> None:
    config = _accepted(_mirror_config(ca=[path], client=[[path, "/etc/pki/k.pem"]]))
    if config is None:
        return
    text = render_hosts_toml(config.namespaces[0])
    intended = {"ca": path, "client": [[path, "/etc/pki/k.pem"]]}
    assert tomllib.loads(text) == _intended(intended)
    assert _tables(text) == HEADER_TABLES[:1]


def test_some_hostile_values_are_accepted() -> None:
    # The tests above must not pass only because every hostile value is rejected.
    accepted = [
        value for value in HOSTILE_STRINGS if _accepted(_mirror_config(headers={"X": value}))
    ]
    assert "$(touch /tmp/nm-pwned)" in accepted
    assert '"] [host."x' in accepted
    assert "NEXUS_MIRROR_EOF_1" in accepted
    assert "Grüße ✓ 中文" in accepted


def test_multiline_toml_injection_is_rejected() -> None:
    injection = '"]\n[host."https://evil"]\ncapabilities = ["push"]\n#'
    assert _accepted(_mirror_config(headers={"X": injection})) is None


def test_round_trip_catches_header_order(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(_mirror_config(headers={"B": "1", "A": "2"}))
    namespace = config.namespaces[0]
    from components import hosts_toml

    original = hosts_toml.expected_data

    def reordered(ns: Any) -> dict[str, Any]:
        data = original(ns)
        header = data["host"][MIRROR]["header"]
        data["host"][MIRROR]["header"] = dict(reversed(list(header.items())))
        return data

    monkeypatch.setattr(hosts_toml, "expected_data", reordered)
    with pytest.raises(RenderError, match="out of order"):
        render_hosts_toml(namespace)


def test_round_trip_catches_missing_server(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(_mirror_config())
    from components import hosts_toml

    original = hosts_toml.expected_data

    def without_server(ns: Any) -> dict[str, Any]:
        data = original(ns)
        del data["server"]
        return data

    monkeypatch.setattr(hosts_toml, "expected_data", without_server)
    with pytest.raises(RenderError, match="does not read back"):
        render_hosts_toml(config.namespaces[0])


@pytest.mark.parametrize("secret_keys", [frozenset(), frozenset({"registries"})])
def test_round_trip_error_hides_header_values(
    monkeypatch: pytest.MonkeyPatch, secret_keys: frozenset[str]
) -> None:
    config = parse_config(_mirror_config(headers={"X-Api-Key": "token-7q9x"}), secret_keys)
    from components import hosts_toml

    monkeypatch.setattr(hosts_toml, "expected_data", lambda ns: {"host": {}})
    with pytest.raises(RenderError) as failure:
        render_hosts_toml(config.namespaces[0])
    assert "token-7q9x" not in str(failure.value)
    assert MIRROR in str(failure.value)


def test_server_table_keys_come_first() -> None:
    config = parse_config(_mirror_config(headers={"X": "v"}))
    text = render_hosts_toml(config.namespaces[0])
    body = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert body[:2] == [f'server = "{SERVER}"', 'capabilities = ["pull", "resolve", "push"]']


def test_pem_with_delimiter_lines_keeps_its_content() -> None:
    pem = "\n".join(
        [
            "NEXUS_MIRROR_EOF_1",
            "NEXUS_MIRROR_EOF_2",
            "$(touch /tmp/nm-pwned) `id` 'q' \"dq\"",
            PEM.strip("\n"),
            "NEXUS_MIRROR_EOF_2_",
        ]
    )
    config = parse_config(_mirror_config(caPem=pem))
    assert render_files(config.namespaces[0])["mirror-0-ca.pem"] == pem + "\n"
    hosts = hosts_input(config.nodes[0], config)
    assert "<<'NEXUS_MIRROR_EOF_2__'" in hosts.text


def _tail(text: str) -> str:
    script = node_script().rstrip("\n")
    assert text.startswith(script)
    return text[len(script) :]


def _run_tails(shell: str, jobs: list[tuple[str, Path]]) -> list[dict[str, str]]:
    """Run the generated tails of node inputs with recorders, one shell for all of them.

    Each tail runs in a subshell in its own directory; return the files each recorded.
    """
    script = [_recorders("\n".join(_tail(text) for text, _ in jobs))]
    for text, directory in jobs:
        directory.mkdir(parents=True)
        script += [
            "(",
            f"cd {shlex.quote(str(directory))} || exit 1",
            f"NM_TEST_RECORD={shlex.quote(str(directory / 'record'))}",
            _tail(text),
            ")",
        ]
    result = subprocess.run(
        [shell, "-s", "--", "hosts"],
        input="\n".join(script).encode(),
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == b""
    assert result.stderr == b""
    records = []
    for _, directory in jobs:
        fields = (directory / "record").read_bytes().decode().split("\0")
        assert fields[-1] == ""
        records.append(dict(field.split("=", 1) for field in fields[:-1]))
    return records


def _check_node_input(
    config: MirrorConfig, directory: Path, recorded: dict[str, str], settings: dict[str, str]
) -> None:
    """Check that a shell received every value of both node inputs unchanged."""
    node = config.nodes[0]
    for variable, field_name in SETTINGS.items():
        source = node if field_name == "name" else node.containerd
        assert recorded[f"var.{variable}"] == getattr(source, field_name), variable
        assert settings[f"var.{variable}"] == getattr(source, field_name), variable
    assert recorded["var.NM_VERIFY_IMAGE"] == (config.verify_image or "")
    assert recorded["main"] == "hosts"
    expected_files = [
        (namespace.name, name, file_modes(namespace)[name], content)
        for namespace in config.namespaces
        for name, content in render_files(namespace).items()
    ]
    assert recorded.get("nm_file", "0") == str(len(expected_files))
    for number, (namespace_name, name, mode, content) in enumerate(expected_files, start=1):
        assert recorded[f"nm_file.{number}.argc"] == "3"
        assert recorded[f"nm_file.{number}.1"] == namespace_name
        assert recorded[f"nm_file.{number}.2"] == name
        assert recorded[f"nm_file.{number}.3"] == mode
        assert recorded[f"nm_file.{number}.data"] == content
    probes = [(namespace, host) for namespace in config.namespaces for host in namespace.hosts]
    assert recorded.get("nm_probe", "0") == str(len(probes))
    for number, (namespace, host) in enumerate(probes, start=1):
        base = f"{node.containerd.config_path}/{namespace.name}"
        assert recorded[f"nm_probe.{number}.argc"] == "7"
        assert recorded[f"nm_probe.{number}.1"] == namespace.name
        assert recorded[f"nm_probe.{number}.2"] == host.url
        assert recorded[f"nm_probe.{number}.3"] == host.probe_url
        assert recorded[f"nm_probe.{number}.4"] == ("true" if host.skip_verify else "false")
        assert recorded[f"nm_probe.{number}.5"] == _absolute(base, next(iter(host.ca), ""))
        cert, key = next(iter(host.client), ("", ""))
        assert recorded[f"nm_probe.{number}.6"] == _absolute(base, cert)
        assert recorded[f"nm_probe.{number}.7"] == _absolute(base, key or cert)
    # Credentials reach the probe as a here-document, the only other call with data.
    credentials = [host for _, host in probes if host.credentials is not None]
    assert recorded.get("nm_probe_auth", "0") == str(len(credentials))
    # The config command's input stages no file and no probe.
    assert "nm_file" not in settings
    assert "nm_probe" not in settings
    assert settings["main"] == "hosts"
    # Nothing but the recorders wrote anything: no command in a value ran.
    assert sorted(p.name for p in directory.iterdir()) == ["config", "hosts"]
    assert [p.name for p in (directory / "hosts").iterdir()] == ["record"]
    assert [p.name for p in (directory / "config").iterdir()] == ["record"]


def _absolute(base: str, path: str) -> str:
    return path if not path or path.startswith("/") else f"{base}/{path}"


def _check_configs(shell: str, configs: list[MirrorConfig], directory: Path) -> None:
    jobs = []
    for number, config in enumerate(configs):
        node = config.nodes[0]
        jobs.append((hosts_input(node, config).text, directory / str(number) / "hosts"))
        jobs.append((config_input(node, config).text, directory / str(number) / "config"))
    records = _run_tails(shell, jobs)
    for number, config in enumerate(configs):
        hosts, settings = records[2 * number], records[2 * number + 1]
        _check_node_input(config, directory / str(number), hosts, settings)


# Every corpus value of the SSH base that validates and reaches the node input
# (the SSH key passphrase never does).
PLACEMENTS = [
    trial
    for trial in corpus()
    if trial.base == "ssh"
    and trial.outcome is not None
    and trial.outcome.config is not None
    and trial.path[0] != "sshPrivateKeyPassword"
]


@pytest.mark.parametrize("shell", SHELLS)
def test_accepted_hostile_values_reach_the_shell_unchanged(shell: str, tmp_path: Path) -> None:
    assert len(PLACEMENTS) > 100
    configs = [
        trial.outcome.config for trial in PLACEMENTS if trial.outcome and trial.outcome.config
    ]
    _check_configs(shell, configs, tmp_path)
    assert not Path("/tmp/nm-pwned").exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_marker_commands_do_not_run(shell: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    commands = [
        f"$(touch {marker}.1)",
        f"`touch {marker}.2`",
        f"'; touch {marker}.3; '",
        f'"; touch {marker}.4; "',
        f"\\'$(touch {marker}.5)",
        f"$(touch {marker}.6)\nNEXUS_MIRROR_EOF_1\n$(touch {marker}.7)",
    ]
    configs = []
    for command in commands:
        raw = substitute(
            BASE,
            "value",
            ("registries", "docker.io", "mirrors", 0, "headers", "X-Api-Key"),
            command.split("\n")[0],
        )
        raw = substitute(
            raw, "value", ("containerd", "stateDir"), f"/var/lib/{command.split(chr(10))[0]}"
        )
        raw = substitute(
            raw, "value", ("registries", "docker.io", "mirrors", 0, "caPem"), command + "\n" + PEM
        )
        configs.append(parse_config(raw, SECRET_KEYS))
    _check_configs(shell, configs, tmp_path / "runs")
    assert not list(tmp_path.glob("pwned*"))


def test_header_file_mode_is_private() -> None:
    plain = parse_config(_mirror_config(caPem=PEM)).namespaces[0]
    assert file_modes(plain) == {"hosts.toml": "0644", "mirror-0-ca.pem": "0644"}
    with_header = parse_config(_mirror_config(caPem=PEM, headers={"X-Trace": "a"})).namespaces[0]
    assert file_modes(with_header) == {"hosts.toml": "0600", "mirror-0-ca.pem": "0644"}


def test_credentials_make_hosts_toml_private() -> None:
    config = parse_config(BASE, SECRET_KEYS)
    modes = {namespace.name: file_modes(namespace) for namespace in config.namespaces}
    # Every namespace here logs in: the Nexus ones as nexus-user, the last as mirror-user.
    assert {name: mode["hosts.toml"] for name, mode in modes.items()} == {
        "docker.io": "0600",
        "ghcr.io": "0600",
        "quay.io": "0600",
        "registry.internal:5000": "0600",
    }
    assert modes["docker.io"]["mirror-0-ca.pem"] == "0644"


def test_secret_registries_make_every_file_private() -> None:
    config = parse_config(BASE, SECRET_KEYS | {"registries"})
    for namespace in config.namespaces:
        assert set(file_modes(namespace).values()) == {"0600"}, namespace.name
    hosts = hosts_input(config.nodes[0], config)
    assert hosts.secret is True
    assert "nm_file quay.io hosts.toml 0600 <<" in hosts.text


def test_secret_containerd_settings_make_both_inputs_secret() -> None:
    config = parse_config(BASE, SECRET_KEYS | {"containerd"})
    node = config.nodes[0]
    assert config_input(node).secret is True
    assert hosts_input(node, config).secret is True


def test_plain_config_inputs_are_not_secret() -> None:
    config = parse_config(_mirror_config(headers={"X-Trace": "a"}))
    assert config_input(config.nodes[0]).secret is False
    assert hosts_input(config.nodes[0], config).secret is False


def test_secret_mirror_password_makes_hosts_input_secret() -> None:
    config = parse_config(BASE, SECRET_KEYS)
    assert config_input(config.nodes[0]).secret is False
    assert hosts_input(config.nodes[0], config).secret is True
