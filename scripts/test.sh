#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). GPU tests are marked and
# deselected here: CI has no GPU; they run on the lent GPU machine with -m gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -m "not gpu" --durations=15 "$@"  # the slowest, to keep the suite fast
