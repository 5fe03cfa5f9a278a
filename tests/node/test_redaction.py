"""The node script's log filter: header values never reach the command's output.

containerd at log level debug writes every request header but Authorization
into its log as request.header.NAME fields, custom headers from hosts.toml
included, and the node script prints containerd log lines when a restart fails.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "components" / "node" / "nexus-mirror-node.sh"


def _redact(*lines: str) -> list[str]:
    result = subprocess.run(
        ["sh", "-c", '. "$1" && nm_redact', "sh", str(SCRIPT)],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.splitlines()


@pytest.mark.parametrize(
    ("line", "kept"),
    [
        (
            'level=debug msg="do request" request.header.x-api-key=tok-1q2w request.method=GET',
            'level=debug msg="do request" request.header.x-api-key=<redacted> request.method=GET',
        ),
        (
            'level=debug request.header.x-trace.1="a tok-1q2w b" host=m',
            'level=debug request.header.x-trace.1="<redacted>" host=m',
        ),
        (
            '{"level":"debug","request.header.x-api-key":"tok-1q2w","msg":"do request"}',
            '{"level":"debug","request.header.x-api-key":"<redacted>","msg":"do request"}',
        ),
        (
            'level=debug request.header.X-Custom_$`|=tok-1q2w url="https://m/v2/"',
            'level=debug request.header.X-Custom_$`|=<redacted> url="https://m/v2/"',
        ),
    ],
    ids=["logfmt", "logfmt-quoted", "json", "token-characters"],
)
def test_request_header_values_are_redacted(line: str, kept: str) -> None:
    assert _redact(line) == [kept]


def test_lines_without_headers_pass_unchanged() -> None:
    line = 'level=error msg="failed to load plugin io.containerd.grpc.v1.cri" error="invalid"'
    assert _redact(line) == [line]
