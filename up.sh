#!/bin/sh
# Set up and run nexus-mirror.
#   ./up.sh STACK   pulumi up on Pulumi.STACK.yaml (needs the Pulumi CLI)
#   ./up.sh         a local lab on 127.0.0.1: containerd, sshd, a registry and a
#                   mirror standing in for Nexus; needs root on Debian 12 or Ubuntu
set -eu
cd "$(dirname "$0")"

if [ "$#" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    echo "up.sh: the local lab starts containerd and sshd, so run it as root, or name a stack: ./up.sh STACK" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt

if [ "$#" -gt 0 ]; then
    if ! command -v pulumi >/dev/null 2>&1; then
        echo "up.sh: the Pulumi CLI is not installed. Install it (https://www.pulumi.com/docs/install/) and run again." >&2
        echo "up.sh: to review the files without it, run: .venv/bin/python -m components render --stack $1 --out render-out" >&2
        exit 1
    fi
    stack=$1
    shift
    exec pulumi up --stack "$stack" "$@"
fi

sh lab/install.sh
exec .venv/bin/python -m lab.demo
