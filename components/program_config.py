"""Reading the ``nexus-mirror`` config namespace inside a Pulumi program."""

from __future__ import annotations

from typing import Any

from pulumi.runtime import config as runtime_config

from .validation import PROJECT


def read_program_config() -> tuple[dict[str, Any], frozenset[str]]:
    """Return every ``nexus-mirror:*`` value and the names of those held as secrets.

    Pulumi's ``Config`` reads keys one at a time; reading the whole namespace
    lets validation report unknown keys such as typos.
    """
    # NOTE: CONFIG and the PULUMI_CONFIG variables are pulumi.runtime.config
    # internals (pulumi 3.x); Config() offers no way to list keys.
    names = set(runtime_config.CONFIG.get()) | set(runtime_config.get_config_env())
    secret_names = set(runtime_config.get_config_secret_keys_env())
    values: dict[str, Any] = {}
    secrets: set[str] = set()
    for full_name in sorted(names):
        namespace, _, name = full_name.partition(":")
        if namespace != PROJECT or not name:
            continue
        values[name] = runtime_config.get_config(full_name)
        if runtime_config.is_config_secret(full_name) or full_name in secret_names:
            secrets.add(name)
    return values, frozenset(secrets)
