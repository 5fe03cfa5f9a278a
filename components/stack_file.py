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


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that rejects a key given twice in one mapping, instead of keeping the last."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be text or a number", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_stack_file(path: Path) -> tuple[dict[str, Any], frozenset[str]]:
    """Return the ``nexus-mirror`` values of a stack file and the names holding secrets.

    Encrypted values come back as a visible placeholder.
    """
    document = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    if not isinstance(document, dict):
        raise ValueError(f"{path}: a stack file must be a mapping with the key 'config'")
    config = document.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: 'config' must be a mapping of keys to values")
    values: dict[str, Any] = {}
    secret_names: set[str] = set()
    for full_name, value in config.items():
        namespace, separator, name = str(full_name).partition(":")
        if not separator:
            # Pulumi reads only keys of the form namespace:name.
            raise ValueError(
                f"{path}: the config key {str(full_name)!r} has no namespace; "
                f"write it as {PROJECT}:{full_name}"
            )
        if namespace != PROJECT or not name:
            continue
        values[name] = _mask_secure(value, name, secret_names, name)
    return values, frozenset(secret_names)
