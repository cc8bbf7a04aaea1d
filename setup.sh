#!/usr/bin/env bash
# Installs everything the project needs into ./.venv (and Debian packages when run as root).
# torch is pinned and installed first: a looser request pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && ! { command -v prometheus && command -v prometheus-pushgateway; } >/dev/null; then
    # Prometheus for `pifuhd metrics up` and the metrics tests; nothing starts by itself in containers.
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        prometheus prometheus-pushgateway
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "setup done: $(.venv/bin/pifuhd --help | head -n 1)"
