"""The Prometheus alert rules: valid, unit-tested with promtool, and written against
metric names that really exist (the workers' registry and a running HAProxy's exporter).

promtool comes with Debian's ``prometheus`` package (.ci/run installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml

from app.local.embedded import free_port
from app.local.haproxy import LOCAL_CONFIG, EdgeProxy, edge_env, haproxy_binary, render_local_config
from app.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (apt-get install prometheus; .ci/run installs it)",
)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *map(str, args)], capture_output=True, text=True, check=False, cwd=ROOT
    )


def metric_names(expressions: Iterable[str]) -> set[str]:
    """Every hongbao_ or haproxy_ metric name the PromQL expressions mention."""
    return {m for e in expressions for m in re.findall(r"\b((?:hongbao|haproxy)_[a-z_]+)", e)}


def app_metric_names() -> set[str]:
    """Sample names a worker's /metrics can hold, labelled families included."""
    names = set()
    for family in Metrics().registry.collect():
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
        else:
            names.add(family.name)
    return names


def haproxy_metric_names(tmp: Path) -> set[str]:
    """Sample names HAProxy's Prometheus exporter serves, from a real HAProxy."""
    config = tmp / "haproxy.cfg"
    config.write_text(render_local_config(LOCAL_CONFIG.read_text(), [free_port()]))
    public, stats = free_port(), free_port()
    edge = EdgeProxy(config, public, edge_env(public, stats, tmp / "haproxy.sock"))
    edge.start(tmp / "haproxy.log")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stats}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        edge.stop()
    return set(re.findall(r"^(haproxy_[a-z_]+)", text, re.M))


def rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@needs_promtool
def test_promtool_accepts_the_rules_and_the_config_that_loads_them() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout
    result = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout  # the config really loads the rule file


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_that_expects_it_to_fire() -> None:
    tested = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tested
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    names = [str(rule["alert"]) for rule in rules()]
    assert len(names) == len(set(names))
    assert set(names) == firing
    for needed in ("LedgerLag", "EventsListener", "5xx", "Redis", "Queue", "Readiness", "Payout"):
        assert any(needed in name for name in names), needed


@pytest.mark.skipif(haproxy_binary() is None, reason="no haproxy on PATH")
def test_alerts_name_only_metrics_that_exist(tmp_path: Path) -> None:
    used = metric_names(str(rule["expr"]) for rule in rules())
    assert {"hongbao_ledger_lag", "hongbao_events_live", "haproxy_backend_current_queue"} <= used
    exported = app_metric_names() | haproxy_metric_names(tmp_path)
    assert used <= exported, used - exported


def test_compose_prometheus_mounts_the_rules_next_to_its_config() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
