"""`promtool check config` (Debian's prometheus package; scripts/setup.sh installs it)
accepts the Prometheus configuration docker-compose.yml mounts."""

from __future__ import annotations

import subprocess

from compose_helpers import PROMETHEUS_CONFIG, tool


def test_promtool_accepts_the_prometheus_config():
    result = subprocess.run([tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_config(tmp_path):
    broken = tmp_path / "prometheus.yml"
    broken.write_text(PROMETHEUS_CONFIG.read_text().replace("scrape_interval: 5s", "scrape_interval: often"))
    result = subprocess.run([tool("promtool"), "check", "config", str(broken)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
