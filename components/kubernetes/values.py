"""Checks of values in Kubernetes formats: object names, labels, quantities, tolerations.

The rules follow the API server's (apimachinery's validation of names and
labels, resource.Quantity, intstr percentages), so that a mistake is reported
before any resource is declared.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from ..model import Toleration
from ..validation import Problems, check_keys, key_path_child

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_QUANTITY = re.compile(
    r"^(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
_PERCENT = re.compile(r"^(0|[1-9][0-9]?|100)%$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": "1e-9", "u": "1e-6", "m": "1e-3", "k": "1e3", "M": "1e6", "G": "1e9"}
_DECIMAL |= {"T": "1e12", "P": "1e15", "E": "1e18"}
RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
TOLERATION_KEYS = ["key", "operator", "value", "effect", "tolerationSeconds"]


def is_label_name(text: str) -> bool:
    """True for a DNS-1123 label: the form of namespace names."""
    return len(text) <= 63 and bool(_LABEL.fullmatch(text))


def is_subdomain_name(text: str) -> bool:
    """True for a DNS-1123 subdomain: the form of node, Secret and PriorityClass names."""
    return len(text) <= 253 and bool(_SUBDOMAIN.fullmatch(text))


def check_object_name(
    problems: Problems, key: str, value: Any, kind: str, *, label: bool = False
) -> str | None:
    """Check the name of a Kubernetes object: a DNS-1123 label, or a subdomain."""
    valid = is_label_name if label else is_subdomain_name
    if isinstance(value, str) and valid(value):
        return value
    limit = 63 if label else 253
    dots = "" if label else ", '.'"
    problems.error(
        key,
        value,
        f"invalid {kind}",
        f"Use at most {limit} lowercase letters, digits, '-'{dots}, starting and ending with a letter or digit.",
    )
    return None


def _label_key_problem(name: str) -> str | None:
    prefix, slash, rest = name.rpartition("/")
    if slash and not (prefix and is_subdomain_name(prefix)):
        return "its prefix before '/' is not a DNS subdomain"
    if not (len(rest) <= 63 and _LABEL_NAME.fullmatch(rest)):
        return (
            "its name is not at most 63 letters, digits, '-', '_' or '.' between letters or digits"
        )
    return None


def check_label_key(problems: Problems, key: str, name: Any) -> str | None:
    """Check a label or taint key such as ``node-role.kubernetes.io/control-plane``."""
    problem = _label_key_problem(name) if isinstance(name, str) and name else "it is empty"
    if problem is None:
        return str(name)
    problems.error(
        key,
        name,
        f"invalid label key: {problem}",
        "Use a key such as kubernetes.io/os or example.com/pool.",
    )
    return None


def check_label_value(problems: Problems, key: str, value: Any) -> str | None:
    """Check a label or taint value: empty, or at most 63 characters of the label name form."""
    if isinstance(value, str) and (
        value == "" or (len(value) <= 63 and _LABEL_NAME.fullmatch(value))
    ):
        return value
    problems.error(
        key,
        value,
        "invalid label value",
        "Write at most 63 letters, digits, '-', '_' or '.' in quotes, starting and ending with a letter or digit.",
    )
    return None


def quantity_value(text: str) -> Decimal | None:
    """Return the amount of a Kubernetes quantity such as ``250m`` or ``64Mi``."""
    match = _QUANTITY.fullmatch(text)
    if match is None:
        return None
    try:
        number = Decimal(match.group("number"))
    except InvalidOperation:
        return None
    suffix = match.group("suffix") or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * Decimal(_DECIMAL[suffix])
    if suffix:
        return number * Decimal("1" + suffix.lower())
    return number


def check_quantity(problems: Problems, key: str, value: Any) -> str | None:
    """Check a resource quantity. A YAML number is taken as that many units."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        try:
            return str(value)
        except ValueError:
            pass  # Python refuses to convert integers of more than 4300 digits to text.
    if isinstance(value, str) and quantity_value(value) is not None:
        return value
    problems.error(
        key,
        value,
        "invalid quantity",
        "Write a Kubernetes quantity such as 100m (CPU) or 64Mi (memory).",
    )
    return None


def check_int_or_percent(problems: Problems, key: str, value: Any) -> int | str | None:
    """Check a rollout bound: a whole number of nodes, or a percentage such as "10%"."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100000:
        return value
    if isinstance(value, str) and _PERCENT.fullmatch(value):
        return value
    problems.error(
        key,
        value,
        "must be a number of nodes or a percentage",
        'Write a number from 0 up, or a percentage from "0%" to "100%" in quotes.',
    )
    return None


def is_zero(bound: int | str) -> bool:
    """True for a rollout bound of 0 or "0%"."""
    return bound in (0, "0%")


def check_toleration(problems: Problems, key: str, value: Any) -> Toleration | None:
    """Check one toleration with the API server's rules; the operator defaults to Equal."""
    if not isinstance(value, dict):
        problems.error(
            key,
            value,
            "must be an object",
            "Such as {key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}.",
        )
        return None
    check_keys(problems, key, value, TOLERATION_KEYS)
    count = len(problems.errors)

    taint_key = ""
    if value.get("key", "") != "":
        taint_key = check_label_key(problems, key_path_child(key, "key"), value["key"]) or ""
    operator = value.get("operator", "Equal")
    if operator not in ("Exists", "Equal"):
        problems.error(
            key_path_child(key, "operator"), operator, "invalid operator", "Use Exists or Equal."
        )

    taint_value = check_label_value(problems, key_path_child(key, "value"), value.get("value", ""))
    if operator == "Exists" and taint_value:
        problems.error(
            key_path_child(key, "value"),
            taint_value,
            "must be empty when operator is Exists",
            "Remove value, or use operator Equal.",
        )
    if not taint_key and operator != "Exists":
        problems.error(
            key_path_child(key, "operator"),
            operator,
            "must be Exists when key is empty (such a toleration matches every taint)",
            "Set operator: Exists, or name the taint key.",
        )

    effect = value.get("effect", "")
    if effect != "" and effect not in TAINT_EFFECTS:
        problems.error(
            key_path_child(key, "effect"),
            effect,
            "invalid taint effect",
            f"Use one of {', '.join(TAINT_EFFECTS)}, or leave it out to match every effect.",
        )

    seconds = value.get("tolerationSeconds")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            problems.error(
                key_path_child(key, "tolerationSeconds"),
                seconds,
                "must be a whole number of seconds",
                "Write a number without quotes.",
            )
        elif effect != "NoExecute":
            problems.error(
                key_path_child(key, "tolerationSeconds"),
                seconds,
                "applies only to effect NoExecute",
                "Set effect: NoExecute, or remove tolerationSeconds.",
            )

    if len(problems.errors) > count:
        return None
    return Toleration(
        key=taint_key,
        operator=str(operator),
        value=taint_value or "",
        effect=str(effect),
        toleration_seconds=seconds,
    )
