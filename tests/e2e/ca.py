"""A throwaway CA certificate for tests that deliver inline PEM to lab nodes."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path


def self_signed_pem(common_name: str = "nexus-mirror test CA") -> str:
    """Return a new self-signed P-256 certificate in PEM, valid for two days."""
    with tempfile.TemporaryDirectory(prefix="nm-ca-") as scratch:
        directory = Path(scratch)
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(directory / "ca.key"),
                "-out",
                str(directory / "ca.pem"),
                "-days",
                "2",
                "-subj",
                f"/CN={common_name}",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return (directory / "ca.pem").read_text()
