"""Hostile and malformed stack config: it validates, or every problem names a config key.

Nothing else may happen: no exception other than ``ConfigError`` from
``parse_config``, no resource declared by the program, no file written by the
render command.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pulumi
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.config import OBJECT_KEYS, TOP_LEVEL_KEYS
from components.nodes import CONTAINERD_FIELDS
from components.registries import MIRROR_KEYS, REGISTRY_KEYS
from components.render import render_stack
from components.validation import ConfigError, key_path, key_text
from tests.components.hostile_inputs import (
    BASE,
    BASES,
    HOST_KEY,
    HOSTILE_OTHER,
    HOSTILE_STRINGS,
    HUGE_INT,
    KUBERNETES_BASE,
    SECRET_KEYS,
    as_pulumi_config,
    check_outcome,
    corpus,
    key_of,
    string_fields,
    substitute,
)
from tests.program_run import ROOT, run_program

FIELDS = [(name, kind, path) for name, base in BASES.items() for kind, path in string_fields(base)]
# Key names the product reads, so that mutations also add known keys with hostile values.
KNOWN_KEYS = sorted(
    {*TOP_LEVEL_KEYS, *MIRROR_KEYS, *REGISTRY_KEYS, *CONTAINERD_FIELDS, "url", "port", "host"}
)
# Each property runs at most this many examples, so the module stays within seconds.
EXAMPLES = 200
# CI runs a fixed set of examples, so a submission never fails on a new random draw;
# local runs draw new examples each time and keep failures in .hypothesis/.
IN_CI = bool(os.environ.get("CI"))
BOUNDED = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=IN_CI,
    suppress_health_check=[HealthCheck.too_slow],
)

# HUGE_INT is built by map, because Hypothesis cannot repr() it in a strategy.
huge_ints = st.just(5000).map(lambda digits: 10**digits)
other_values = st.one_of(
    st.sampled_from([v for v in HOSTILE_OTHER if v is not HUGE_INT]), huge_ints
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    huge_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(HOSTILE_STRINGS),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=12), st.sampled_from(HOSTILE_STRINGS)), children, max_size=4
        ),
    ),
    max_leaves=12,
)
# Mapping keys a YAML stack file can hold besides strings.
yaml_keys = st.one_of(st.integers(-5, 5), st.booleans(), st.none(), huge_ints)


def _all_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _all_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += _all_paths(item, (*path, index))
    return paths


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Return a base config with one to four values replaced, keys renamed or removed, or keys added."""
    config = copy.deepcopy(draw(st.sampled_from(list(BASES.values()))))
    for _ in range(draw(st.integers(1, 4))):
        paths = _all_paths(config)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = config
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "hostile", "remove", "add", "rename"]))
        # Drawn values are copied: a later mutation may add keys to a drawn list or map,
        # which must not change the shared constants it came from.
        if action == "replace":
            parent[path[-1]] = copy.deepcopy(draw(json_values))
        elif action == "hostile":
            value = draw(st.one_of(st.sampled_from(HOSTILE_STRINGS), other_values))
            parent[path[-1]] = copy.deepcopy(value)
        elif action == "remove":
            del parent[path[-1]]
        # Top-level names come from "nexus-mirror:NAME" keys, so they are always strings.
        keys = st.one_of(
            st.text(max_size=12), st.sampled_from(HOSTILE_STRINGS), st.sampled_from(KNOWN_KEYS)
        )
        if len(path) > 1:
            keys = st.one_of(keys, yaml_keys)
        if action == "add" and isinstance(parent, dict):
            parent[draw(keys)] = copy.deepcopy(draw(json_values))
        elif action == "rename" and isinstance(parent, dict):
            new_key = draw(keys)
            config = substitute(config, "key", path, new_key)
    return config


def _names_field(problems: list[str], kind: str, path: tuple[Any, ...], new: Any) -> bool:
    """True when a problem names the changed field or the object that contains it."""
    if kind == "key" and len(path) == 1:
        names = [key_path(key_text(new))]
    elif kind == "key":
        names = [key_of(path[:-1])]
    else:
        # A value that conflicts with a sibling may be reported at the sibling.
        names = [key_of(path)] + [key_of(path[:n]) for n in range(len(path) - 1, 1, -1)]
    # A key that names another key (passwordKey) may be named in that key's problem.
    prefixes = [f"{n}{end}" for n in names for end in (":", ".", "[")]
    return any(line.startswith(tuple(prefixes)) for line in problems) or any(
        f"{names[0]} " in line for line in problems
    )


@pytest.mark.parametrize(
    ("base", "kind", "path"), FIELDS, ids=[f"{b}-{k}:{key_of(p)}" for b, k, p in FIELDS]
)
def test_corpus_in_every_string_field(base: str, kind: str, path: tuple[Any, ...]) -> None:
    trials = [t for t in corpus() if (t.base, t.kind, t.path) == (base, kind, path)]
    assert trials
    for trial in trials:
        label = "HUGE_INT" if trial.value is HUGE_INT else repr(trial.value)[:40]
        if trial.error is not None:
            raise AssertionError(f"{label} broke the contract") from trial.error
        assert trial.outcome is not None
        if trial.outcome.config is None:
            assert _names_field(trial.outcome.problems, kind, path, trial.value), (
                label,
                trial.outcome.problems,
            )


def test_base_configs_validate() -> None:
    outcome = check_outcome(BASE)
    assert outcome.config is not None
    assert len(outcome.config.nodes) == 2
    kubernetes = check_outcome(KUBERNETES_BASE)
    assert kubernetes.config is not None
    assert kubernetes.config.kubernetes is not None


@BOUNDED
@given(mutated_configs())
def test_mutated_config_validates_or_names_keys(config: dict[str, Any]) -> None:
    check_outcome(config)


@BOUNDED
@given(
    st.dictionaries(st.sampled_from([*TOP_LEVEL_KEYS, "registrys", "x"]), json_values, max_size=8)
)
def test_random_values_validate_or_name_keys(config: dict[str, Any]) -> None:
    check_outcome(config)


@BOUNDED
@given(st.dictionaries(st.sampled_from(OBJECT_KEYS), json_values, max_size=8))
def test_json_text_reads_like_values(config: dict[str, Any]) -> None:
    # The engine hands the program object values as JSON text; the outcome must not change.
    plain = {k: v for k, v in config.items() if not isinstance(v, str)}
    try:
        text = as_pulumi_config(plain)
    except ValueError:
        # json.dumps refuses integers of more than 4300 digits, so no engine sends them.
        return
    direct, encoded = check_outcome(plain), check_outcome(text)
    assert (direct.config is None) == (encoded.config is None)
    if direct.config is None:
        assert len(direct.problems) == len(encoded.problems)


MARKER = "nm-secret-7q9x"
marked_strings = st.sampled_from(
    [
        MARKER,
        f"https://{MARKER}.example",
        f"http://{MARKER}.example/v2",
        f"https://{MARKER}",
        f"/{MARKER}",
        f"{MARKER} $(x)",
        f"{MARKER}\n",
        f"{MARKER}:5000",
        f"ftp://{MARKER}",
        f"https://{MARKER}.example/a//b",
    ]
)


@st.composite
def marked_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Return BASE with the marker in one to three string values, valid there or not."""
    config = copy.deepcopy(BASE)
    # A node's name (its host when it has none) is part of resource names, which Pulumi
    # never encrypts, so the marker goes only into the other values.
    # passwordKey and clientKeyPemKey name a config key, which messages show to be useful.
    values = [
        path
        for kind, path in string_fields(config)
        if kind == "value"
        and not (path[0] == "nodes" and path[-1] in ("name", "host"))
        and path[-1] not in ("passwordKey", "clientKeyPemKey")
    ]
    for path in draw(st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True)):
        config = substitute(config, "value", path, draw(marked_strings))
    return config


@BOUNDED
@given(marked_configs())
def test_secret_values_stay_out_of_messages(config: dict[str, Any]) -> None:
    outcome = check_outcome(config, frozenset(config))
    lines = outcome.problems if outcome.config is None else list(outcome.config.warnings)
    assert not [line for line in lines if MARKER in line]


class _RecordingMocks(pulumi.runtime.Mocks):
    """Mocks that record every resource the program registers."""

    def __init__(self) -> None:
        self.registered: list[str] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.registered.append(f"{args.typ}::{args.name}")
        return f"{args.name}-id", dict(args.inputs)

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}


def _engine_config(config: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    values = {f"nexus-mirror:{name}": value for name, value in as_pulumi_config(config).items()}
    secrets = [f"nexus-mirror:{name}" for name in SECRET_KEYS if name in config]
    return values, secrets


def _invalid_sample() -> list[dict[str, Any]]:
    """Return one rejected corpus config for every field, the first value that fails there."""
    sample = []
    # The engine drops a top-level key without a name, so renamed top-level keys are left out.
    for base, kind, path in FIELDS:
        if kind == "key" and len(path) == 1:
            continue
        for value in HOSTILE_STRINGS:
            config = substitute(BASES[base], kind, path, value)
            if check_outcome(config).config is None:
                sample.append(config)
                break
    return sample


def test_program_declares_nothing_on_invalid_config() -> None:
    sample = _invalid_sample()
    assert len(sample) > 60
    for config in sample:
        mocks = _RecordingMocks()
        values, secrets = _engine_config(config)
        with pytest.raises(pulumi.RunError, match=r"invalid stack config") as failure:
            run_program(mocks, values, secrets)
        assert mocks.registered == [], str(failure.value)


def test_program_declares_resources_on_base_config() -> None:
    mocks = _RecordingMocks()
    run_program(mocks, *_engine_config(BASE))
    assert len([name for name in mocks.registered if name.startswith("command:")]) == 4


@settings(BOUNDED, max_examples=100)
@given(mutated_configs())
def test_render_writes_nothing_on_invalid_config(config: dict[str, Any]) -> None:
    document = {"config": {f"nexus-mirror:{name}": value for name, value in config.items()}}
    try:
        text = yaml.safe_dump(document, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return
    with tempfile.TemporaryDirectory(prefix="nm-hostile-") as scratch:
        stack_file = Path(scratch) / "Pulumi.hostile.yaml"
        try:
            stack_file.write_text(text, encoding="utf-8")
        except UnicodeEncodeError:
            return
        out = Path(scratch) / "out"
        try:
            written = render_stack(stack_file, out)
        except ConfigError as error:
            assert all(line.startswith("nexus-mirror:") for line in error.problems)
            assert not out.exists() or not any(out.rglob("*"))
            return
        assert written
        assert all(path.is_file() for path in written)


@pytest.mark.parametrize(
    ("case", "text"),
    [
        ("yaml-syntax", "config: {nexus-mirror:nodes: [\n"),
        ("top-level-list", "- a\n- b\n"),
        ("config-list", "config: [1, 2]\n"),
        ("unhashable-key", "config:\n  ? [a, b]\n  : 1\n"),
        ("not-utf8", b"config:\n  nexus-mirror:nodes: \xff\xfe\n"),
    ],
)
def test_render_command_rejects_malformed_file(
    tmp_path: Path, case: str, text: str | bytes
) -> None:
    stack_file = tmp_path / "Pulumi.bad.yaml"
    if isinstance(text, bytes):
        stack_file.write_bytes(text)
    else:
        stack_file.write_text(text)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "components",
            "render",
            "--stack",
            "bad",
            "--out",
            str(tmp_path / "out"),
            "--dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "ERROR:" in result.stderr
    assert not (tmp_path / "out").exists()


def test_json_text_of_huge_number_is_rejected() -> None:
    # json.loads raises ValueError, not JSONDecodeError, for a number of more than 4300 digits.
    outcome = check_outcome({**BASE, "rollout": "9" * 5000})
    assert outcome.config is None
    assert outcome.problems[0].startswith("nexus-mirror:rollout:")


def test_problem_keys_escape_line_breaks() -> None:
    outcome = check_outcome({**BASE, "ssh": {"user": "root", 'a"\n[x]': 1}})
    assert outcome.problems == [
        'nexus-mirror:ssh["a\\"\\u000a[x]"]: unknown key (got \'a"\\n[x]\'). '
        "Known keys: user, bastion, perDialTimeout, dialErrorLimit."
    ]


def test_lone_surrogate_is_rejected_with_its_key() -> None:
    config = substitute(BASE, "value", ("nodes", 0, "containerd", "configPath"), "/etc/\ud800")
    outcome = check_outcome(config)
    assert outcome.config is None
    assert any(
        line.startswith("nexus-mirror:nodes[0].containerd.configPath: contains a lone surrogate")
        for line in outcome.problems
    )


def test_host_key_accepts_known_hosts_line() -> None:
    line = f"[10.0.0.11]:2222 {HOST_KEY} root@node"
    config = check_outcome(substitute(BASE, "value", ("nodes", 0, "hostKey"), line)).config
    assert config is not None
    assert config.nodes[0].host_key == HOST_KEY


@pytest.mark.parametrize(
    "value",
    [
        HOST_KEY.replace("ssh-ed25519", "ssh-rsa"),
        HOST_KEY[:-8],
        "ssh-ed25519 " + "A" * 68,
    ],
    ids=["type-mismatch", "cut-short", "not-a-key-blob"],
)
def test_host_key_blob_must_match_its_type(value: str) -> None:
    outcome = check_outcome(substitute(BASE, "value", ("nodes", 0, "hostKey"), value))
    assert outcome.config is None
    assert outcome.problems[0].startswith("nexus-mirror:nodes[0].hostKey: invalid host key")
