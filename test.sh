#!/bin/sh
# Set up and run every test: lint, types, shell lint, unit, program and
# end-to-end tests. Needs root on Debian 12 or Ubuntu (it installs the lab's
# packages with apt-get); the end-to-end tests start their own lab on 127.0.0.1.
set -eu
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: run as root: the end-to-end tests install Debian packages and start containerd" >&2
    exit 1
fi
sh lab/install.sh
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
shellcheck -s sh components/node/*.sh lab/*.sh test.sh up.sh .ci/run
# Every test runs; the end-to-end tests fail rather than skip when the lab cannot start.
.venv/bin/python -m pytest -ra "$@"
