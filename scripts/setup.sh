#!/usr/bin/env bash
# Create .venv and install cadre with its dev extra. torch==2.13.0 first: on these
# machines it is a local CPU wheel; a bare `torch` requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
bash scripts/install_prometheus.sh   # promtool + prometheus for the compose/dashboard tests
