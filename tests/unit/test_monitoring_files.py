"""contrib/prometheus and contrib/grafana: the rules pass promtool's checks and unit tests
(Debian's prometheus package, installed by scripts/install.sh), and the dashboard's
queries are valid PromQL over metrics rbd-restore defines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rbd_restore.cache.metrics import PREFETCH_CLASSES, FetcherMetrics
from rbd_restore.jobs.metrics import RunnerMetrics
from rbd_restore.jobs.store import JobRecord
from rbd_restore.prefetch.scheduler import PrefetchClass
from tests.support.monitoring import (
    DASHBOARD,
    RULE_TESTS,
    RULES,
    dashboard_queries,
    queried_metrics,
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool is missing: scripts/install.sh installs Debian's prometheus"
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


def test_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_test_and_a_runbook_entry() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"]}
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", [])}
    assert alerts == tested
    runbook = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    assert [a for a in sorted(alerts) if f"### {a}" not in runbook] == []


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses a recording rule's expression: each query becomes one.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": q}
        for i, q in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], panel["title"]
        for target in panel.get("targets", []):
            used = set(re.findall(r"\$(\w+)", target["expr"]))
            assert used <= names | {"__rate_interval", "__range"}, target["expr"]


def test_queried_metrics_are_defined() -> None:
    """Each name the rules and dashboard use is one the fetcher or runner defines (the
    integration test checks they are exported during a real restore)."""
    defined = set()
    for registry in (FetcherMetrics().registry, RunnerMetrics().registry):
        for family in registry.collect():
            defined.add(family.name)
            defined.update(s.name for s in family.samples)
    metrics = RunnerMetrics()
    metrics.saved(JobRecord(id="r-1", backup_id="b", pool="p", image="i", session_id="s",
                            state="relocating", created="", updated="", bytes_total=1,
                            progress=0.5, rate_bytes_per_s=1, error="", ready_seconds=0,
                            committed_seconds=0.0, relocate_after="", attempts=0,
                            replaces="", image_id=""))
    defined.update(s.name for family in metrics.registry.collect() for s in family.samples)
    assert sorted(queried_metrics() - defined) == []


@pytest.mark.parametrize("klass", list(PrefetchClass))
def test_prefetch_class_labels_are_initialised(klass: PrefetchClass) -> None:
    assert klass.label in PREFETCH_CLASSES
