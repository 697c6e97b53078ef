#!/usr/bin/env bash
# prometheus and promtool from Debian's `prometheus` package, for the compose and dashboard
# tests (tests/test_compose_promtool.py, tests/test_dashboard_e2e.py). Does nothing when
# both are already on PATH; quiet otherwise. The package's own service is irrelevant: the
# tests start their own Prometheus on loopback.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null
