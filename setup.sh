#!/usr/bin/env bash
# Installs everything the project needs into ./.venv (and Debian packages when run as root).
# torch is pinned and installed first: a looser request pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && ! { command -v prometheus && command -v prometheus-pushgateway && command -v chromium && [ -e /usr/lib/x86_64-linux-gnu/libEGL_mesa.so.0 -o -e /usr/lib/aarch64-linux-gnu/libEGL_mesa.so.0 ]; } >/dev/null 2>&1; then
    # Prometheus for `pifuhd metrics up` and the metrics tests (nothing starts by itself in
    # containers); Mesa EGL for headless rendering of training data on machines without a GPU;
    # Chromium for the report's rendering test.
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        prometheus prometheus-pushgateway libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1 chromium
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
# Build the body model's caches once (about 90 s each the first time), so jobs and tests start quickly:
# the project's body, and the makehuman topology that real garments are fitted to (data synth --garments).
.venv/bin/python -c "from model.data.humans import load_body_model; load_body_model()"
.venv/bin/python -c "from model.data.garments import load_makehuman_body; load_makehuman_body()"
echo "setup done: $(.venv/bin/pifuhd --help | head -n 1)"
