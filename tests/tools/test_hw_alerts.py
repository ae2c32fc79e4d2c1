"""The Prometheus alert rules shipped in hw/prometheus/: promtool (Debian's prometheus package,
installed by bootstrap.sh) checks their syntax and runs their unit tests, and every farebox metric
they name is one a running daemon really exports (scraped from ``farebox run --metrics``), with
prometheus-client's process and Python collectors beside them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from .test_daemon_ops import Daemon, running, scrape  # noqa: F401 - running is a fixture

HERE = Path(__file__).resolve().parents[2] / "hw" / "prometheus"
RULES = HERE / "farebox-alerts.yml"
PROMTOOL = shutil.which("promtool")

def promtool(*argv: str) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None, "promtool is not installed: run ./bootstrap.sh"
    return subprocess.run([PROMTOOL, *argv], cwd=HERE, capture_output=True, text=True,
                          timeout=120)


def test_the_rules_are_valid():
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout


def test_each_alert_fires_when_it_should_and_not_before():
    done = promtool("test", "rules", "farebox-alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_broken_expectation_fails_the_unit_tests(tmp_path):
    """The unit tests can fail: the reader alert expected on the healthy terminal."""
    broken = (HERE / "farebox-alerts.test.yml").read_text().replace(
        "alertname: FareboxReaderDown\n        exp_alerts:\n          - exp_labels: "
        "{severity: critical, job: farebox, instance: bus-42}",
        "alertname: FareboxReaderDown\n        exp_alerts:\n          - exp_labels: "
        "{severity: critical, job: farebox, instance: bus-7}")
    (tmp_path / "broken.test.yml").write_text(broken.replace(
        "  - farebox-alerts.yml", f"  - {RULES}"))
    done = subprocess.run([PROMTOOL or "promtool", "test", "rules", "broken.test.yml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0


def test_every_metric_the_rules_name_is_exported_by_a_running_daemon(farebox, running, tmp_path):
    names = set(re.findall(r"\b(farebox_[a-z_]+)\b", RULES.read_text()))
    assert len(names) >= 6
    config = tmp_path / "terminal.toml"
    config.write_text('[terminal]\nallow_test_keys = true\nmetrics_listen = "127.0.0.1:0"\n')
    daemon = running(Daemon, "--reader", "udp:127.0.0.1:9", "--fare", "1.00", "--config", config,
                     "--state", farebox.state)
    url = daemon.read_until(lambda e: e["event"] == "start")["metrics"]
    exported = {name for name, _ in scrape(url)}
    assert names <= exported, names - exported
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_info",
            "python_gc_objects_collected_total"} <= exported
