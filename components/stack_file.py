"""Reading a Pulumi stack file (``Pulumi.<stack>.yaml``) without the Pulumi CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .validation import PROJECT, SECRET_PLACEHOLDER


def _mask_secure(value: Any, path: str, secret_names: set[str], name: str) -> Any:
    """Replace every ``{secure: ...}`` leaf, which only the Pulumi CLI can decrypt."""
    if isinstance(value, dict):
        if set(value) == {"secure"}:
            secret_names.add(name)
            return SECRET_PLACEHOLDER
        return {k: _mask_secure(v, f"{path}.{k}", secret_names, name) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_secure(v, f"{path}[{i}]", secret_names, name) for i, v in enumerate(value)]
    return value


def load_stack_file(path: Path) -> tuple[dict[str, Any], frozenset[str]]:
    """Return the ``nexus-mirror`` values of a stack file and the names holding secrets.

    Encrypted values come back as a visible placeholder.
    """
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(document, dict):
        raise ValueError(f"{path}: a stack file must be a mapping with the key 'config'")
    config = document.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: 'config' must be a mapping of keys to values")
    values: dict[str, Any] = {}
    secret_names: set[str] = set()
    for full_name, value in config.items():
        namespace, _, name = str(full_name).partition(":")
        if namespace != PROJECT or not name:
            continue
        values[name] = _mask_secure(value, name, secret_names, name)
    return values, frozenset(secret_names)
