"""Running ``__main__.py`` with a stack file under Pulumi's own mocks."""

from __future__ import annotations

import asyncio
import json
import runpy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi

from components.stack_file import load_stack_file

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ProgramRun:
    """What one run of the program produced."""

    outputs: dict[str, Any] = field(default_factory=dict)
    namespace: dict[str, Any] = field(default_factory=dict)


def stack_config(
    stack_file: Path,
    overrides: Mapping[str, Any] | None = None,
    secrets: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Return config as the Pulumi engine passes it: full names to strings, plus secret names.

    ``overrides`` replace values of the stack file; ``secrets`` are added as
    secret values, as ``pulumi config set --secret`` would store them.
    """
    values, secret_names = load_stack_file(stack_file)
    values.update(overrides or {})
    config: dict[str, str] = {}
    for name, value in values.items():
        config[f"nexus-mirror:{name}"] = value if isinstance(value, str) else json.dumps(value)
    names = {f"nexus-mirror:{name}" for name in secret_names}
    for name, value in (secrets or {}).items():
        config[f"nexus-mirror:{name}"] = value
        names.add(f"nexus-mirror:{name}")
    return config, sorted(names)


def run_program(
    mocks: pulumi.runtime.Mocks,
    config: dict[str, str],
    secret_names: list[str],
    *,
    stack: str = "test",
    preview: bool = False,
) -> ProgramRun:
    """Run the real program once and return its stack outputs."""
    pulumi.runtime.set_mocks(mocks, project="nexus-mirror", stack=stack, preview=preview)
    pulumi.runtime.set_all_config(config, secret_names)
    run = ProgramRun()

    @pulumi.runtime.test
    def program() -> Any:
        run.namespace = runpy.run_path(str(ROOT / "__main__.py"), run_name="__main__")
        mirror = run.namespace["mirror"]
        return pulumi.Output.all(mirror.hosts_toml, mirror.nodes).apply(
            lambda values: run.outputs.update(hostsToml=values[0], nodes=values[1])
        )

    program()
    return run


def output_is_secret(output: Any) -> bool:
    """Return whether a Pulumi output (or input) is marked secret, after the program ran."""
    holder: dict[str, bool] = {}

    @pulumi.runtime.test
    def read() -> Any:
        async def check() -> None:
            holder["value"] = await pulumi.Output.from_input(output).is_secret()

        return asyncio.ensure_future(check())

    read()
    return holder["value"]
