"""Checks of single stack config values, and the collector of their problems.

Every problem names the config key in the form ``pulumi config set --path``
accepts, the value that was given, and what to set instead.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

PROJECT = "nexus-mirror"
SECRET_PLACEHOLDER = "[secret]"

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Characters RFC 3986 allows in a URL without percent-encoding.
_URL_CHARACTER = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]")
# An IPv6 zone: an interface name (at most 15 bytes on Linux) or number.
IPV6_ZONE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
# Linux limits (limits.h): a path of at most 4095 bytes, names of at most 255.
PATH_MAX = 4095
NAME_MAX = 255


class ConfigError(Exception):
    """Raised when stack config is invalid; the message lists every problem, one a line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        count = len(problems)
        heading = f"invalid stack config ({count} problem{'s' if count != 1 else ''}):"
        super().__init__("\n".join([heading, *(f"  {p}" for p in problems)]))


def key_path(*parts: str | int) -> str:
    """Join key parts the way ``pulumi config set --path`` reads them."""
    text = PROJECT + ":" + printable(key_text(parts[0]))
    for part in parts[1:]:
        text = key_path_child(text, part)
    return text


def printable(text: str) -> str:
    """Return ``text`` with quotes, backslashes and unprintable characters escaped.

    Messages are read on a terminal, one problem a line, so a config value or
    key must not bring line breaks, terminal escape sequences, bidirectional
    overrides or lone surrogates into them.
    """
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif char.isprintable():
            escaped.append(char)
        elif ord(char) <= 0xFFFF:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(f"\\U{ord(char):08x}")
    return "".join(escaped)


def key_text(name: Any) -> str:
    """Return a mapping key from YAML or JSON (a string, number, boolean or null) as text."""
    if isinstance(name, str):
        return name
    try:
        return str(name)
    except ValueError:
        # Python refuses to convert integers of more than 4300 digits to text.
        return "<number too long to show>"


def show(value: Any) -> str:
    """Render a config value for a message, cut short when long."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        text = repr(value) if isinstance(value, str) else str(value)
    except ValueError:
        return "a number too long to show"
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class Problems:
    """Collects errors and warnings while a stack config is walked."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    secret_keys: tuple[str, ...] = ()
    """Full key names held as Pulumi secrets: values below them are never shown."""

    def is_secret(self, key: str) -> bool:
        """True when ``key`` is a secret key or lies below one."""
        return any(
            key == name or key.startswith((name + ".", name + "[")) for name in self.secret_keys
        )

    def error(self, key: str, value: Any, problem: str, fix: str) -> None:
        if self.is_secret(key):
            self.secret_error(key, problem, fix)
            return
        self.errors.append(f"{key}: {problem} (got {show(value)}). {fix}")

    def secret_error(self, key: str, problem: str, fix: str) -> None:
        self.errors.append(f"{key}: {problem} (value not shown: it is a secret). {fix}")

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(f"{key}: {message}")

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigError(self.errors)


def check_keys(problems: Problems, key: str, value: dict[str, Any], known: list[str]) -> None:
    """Report every key of ``value`` that is not in ``known``, with the closest match."""
    import difflib

    for name in value:
        if name in known:
            continue
        close = difflib.get_close_matches(key_text(name), known, n=1)
        hint = f"Did you mean {close[0]!r}?" if close else ""
        problems.error(
            key_path_child(key, key_text(name)),
            name,
            "unknown key",
            f"{hint} Known keys: {', '.join(known)}.".strip(),
        )


def key_path_child(key: str, child: str | int) -> str:
    if isinstance(child, int):
        return f"{key}[{child}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", child):
        return f"{key}.{child}"
    return f'{key}["{printable(child)}"]'


def is_hostname(text: str) -> bool:
    """True for a DNS name of lowercase labels, an IPv4 address or a bracketed IPv6 address."""
    if text.startswith("[") and text.endswith("]"):
        try:
            ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            return False
        return True
    if len(text) > 253 or not text:
        return False
    return all(_LABEL.fullmatch(label) for label in text.split("."))


def split_host_port(text: str) -> tuple[str, int | None] | None:
    """Split ``host[:port]``; None when the text is not of that form."""
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[: end + 1], text[end + 1 :]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if not port_text.isdigit():
            return None
        port = int(port_text)
    if not is_hostname(host):
        return None
    if port is not None and not 1 <= port <= 65535:
        return None
    return host, port


def check_url(problems: Problems, key: str, value: Any, *, allow_path: bool = True) -> str | None:
    """Check a registry URL and return it without a trailing slash.

    A trailing slash matters: containerd cleans the path to ``/`` and then
    appends ``/v2``, so ``https://m/`` would be requested as ``https://m//v2``.
    """
    if not isinstance(value, str) or not value:
        problems.error(
            key, value, "must be a URL", "Set it to a URL such as https://nexus.example.net:8082."
        )
        return None
    if any(c.isspace() or not c.isprintable() for c in value):
        problems.error(key, value, "URL contains white space or a control character", "Remove it.")
        return None
    if "://" not in value:
        short = len(value) <= 60 and not problems.is_secret(key)
        example = f"https://{value}" if short else "https://HOST[:PORT]"
        problems.error(
            key,
            value,
            "URL has no scheme",
            f"Write it as {example} (or http:// for plain HTTP).",
        )
        return None
    unencoded = sorted({c for c in value if not _URL_CHARACTER.match(c)})
    if unencoded:
        problem = "URL contains characters that must be percent-encoded"
        if not problems.is_secret(key):
            problem = (
                f"URL contains {', '.join(map(repr, unencoded[:5]))}, which must be percent-encoded"
            )
        problems.error(
            key,
            value,
            problem,
            "Percent-encode them, such as %22 for a double quote.",
        )
        return None
    if re.search(r"%(?![0-9A-Fa-f]{2})", value):
        problems.error(
            key,
            value,
            "URL has a % that is not followed by two hex digits",
            "Write a literal % as %25.",
        )
        return None
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as error:
        if "Port out of range" in str(error) or "Port could not be cast" in str(error):
            problems.error(key, value, "port is out of range", "Use a port from 1 to 65535.")
        else:
            problems.error(
                key, value, f"invalid URL ({error})", "Write it as scheme://host[:port][/path]."
            )
        return None
    if parts.scheme not in ("http", "https"):
        problems.error(
            key, value, f"unsupported scheme {parts.scheme!r}", "Use https:// or http://."
        )
        return None
    if parts.username is not None or parts.password is not None:
        # The value is shown without its user information, which may hold a password.
        problems.error(
            key,
            f"{parts.scheme}://***@{parts.netloc.rpartition('@')[2]}{parts.path}",
            "URL contains credentials",
            "Remove user:password@ from the URL and set username and the password's secret key instead.",
        )
        return None
    if parts.query or parts.fragment:
        problems.error(
            key,
            value,
            "URL has a query or fragment",
            "Remove everything from ? or # on; containerd adds its own query.",
        )
        return None
    host = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
    if not is_hostname(host.lower()) or host != host.lower():
        problems.error(
            key, value, f"invalid host {host!r}", "Use a lowercase DNS name or an IP address."
        )
        return None
    if port is not None and not 1 <= port <= 65535:
        problems.error(key, value, f"port {port} is out of range", "Use a port from 1 to 65535.")
        return None
    path = parts.path.rstrip("/")
    if path and not allow_path:
        problems.error(key, value, "URL has a path", "Give only scheme://host[:port].")
        return None
    if "//" in path or "/../" in path + "/" or "/./" in path + "/":
        problems.error(key, value, "URL path is not clean", "Remove empty, . and .. path segments.")
        return None
    if parts.scheme == "http":
        url = "the URL" if problems.is_secret(key) else value
        problems.warn(
            key, f"{url} is plain HTTP: image data and any credentials travel unencrypted."
        )
    return f"{parts.scheme}://{parts.netloc}{path}"


def check_absolute_path(
    problems: Problems, key: str, value: Any, what: str = "path on the node"
) -> str | None:
    if not isinstance(value, str) or not value:
        problems.error(
            key,
            value,
            f"must be an absolute {what}",
            "Set it to an absolute path such as /etc/pki/ca.pem.",
        )
        return None
    if not value.startswith("/"):
        example = "/etc/pki/ca.pem" if problems.is_secret(key) else "/" + value.lstrip("./")
        problems.error(
            key,
            value,
            f"{what} is relative",
            f"Use an absolute path such as {printable(example)}.",
        )
        return None
    if any(c in value for c in "\r\n\0"):
        problems.error(key, value, f"{what} contains a line break or NUL", "Remove it.")
        return None
    if not value.isprintable():
        problems.error(
            key,
            value,
            f"{what} contains a control character or other unprintable character",
            "Remove it.",
        )
        return None
    if len(value.encode("utf-8", "surrogatepass")) > PATH_MAX:
        problems.error(
            key,
            value,
            f"{what} is longer than {PATH_MAX} bytes, the limit of Linux (PATH_MAX)",
            "Use a shorter path.",
        )
        return None
    long_names = [
        name for name in value.split("/") if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX
    ]
    if long_names:
        problems.error(
            key,
            value,
            f"{what} has a name longer than {NAME_MAX} bytes, the limit of Linux (NAME_MAX)",
            "Use shorter directory and file names.",
        )
        return None
    if "/../" in value + "/" or "/./" in value + "/":
        problems.error(
            key, value, f"{what} contains . or .. segments", "Write the path without them."
        )
        return None
    if value != "/" and value.endswith("/"):
        return value.rstrip("/")
    return value


def check_bool(problems: Problems, key: str, value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    problems.error(key, value, "must be true or false", "Write true or false without quotes.")
    return None


def check_int(
    problems: Problems, key: str, value: Any, low: int, high: int, what: str = "number"
) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.error(
            key,
            value,
            "must be a whole number",
            f"Write a number from {low} to {high} without quotes.",
        )
        return None
    if not low <= value <= high:
        problems.error(key, value, f"{what} is out of range", f"Use a number from {low} to {high}.")
        return None
    return value


def check_text(
    problems: Problems, key: str, value: Any, what: str = "text", *, secret: bool = False
) -> str | None:
    """Check a one-line, non-empty string."""
    if not isinstance(value, str) or not value.strip():
        if secret:
            problems.secret_error(
                key, f"must be non-empty {what}", "Set it with pulumi config set --secret."
            )
        else:
            problems.error(key, value, f"must be non-empty {what}", f"Set it to a {what}.")
        return None
    if any(c in value for c in "\r\n\0"):
        if secret:
            problems.secret_error(key, f"{what} contains a line break or NUL", "Remove it.")
        else:
            problems.error(
                key,
                value,
                f"{what} contains a line break or NUL",
                "Remove it; it would split the line it is written into.",
            )
        return None
    if any((c < " " and c != "\t") or c == "\x7f" for c in value):
        if secret:
            problems.secret_error(key, f"{what} contains a control character", "Remove it.")
        else:
            problems.error(key, value, f"{what} contains a control character", "Remove it.")
        return None
    return value


def check_pem(problems: Problems, key: str, value: Any) -> str | None:
    """Check inline PEM holding one or more certificates; return it with one final newline."""
    if not isinstance(value, str) or "-----BEGIN CERTIFICATE-----" not in value:
        problems.error(
            key,
            value,
            "must hold PEM certificates",
            "Paste the CA certificate(s), from -----BEGIN CERTIFICATE----- to -----END CERTIFICATE-----.",
        )
        return None
    if value.count("-----BEGIN CERTIFICATE-----") != value.count("-----END CERTIFICATE-----"):
        problems.error(
            key,
            value,
            "PEM is cut short: BEGIN and END lines do not pair up",
            "Paste each certificate whole.",
        )
        return None
    if "PRIVATE KEY" in value:
        problems.error(
            key,
            value,
            "contains a private key",
            "Keep only certificates here; a CA file is world-readable on the node.",
        )
        return None
    if "\0" in value:
        problems.error(key, value, "contains NUL", "Remove it.")
        return None
    return value.strip("\n") + "\n"


def check_header_name(problems: Problems, key: str, name: Any) -> bool:
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        problems.error(
            key, name, "invalid HTTP header name", "Use letters, digits and -, such as X-Api-Key."
        )
        return False
    return True


def check_name(problems: Problems, key: str, value: Any) -> str | None:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        problems.error(
            key,
            value,
            "invalid name",
            "Use up to 63 letters, digits, '.', '_' or '-', starting with a letter or digit.",
        )
        return None
    return value
