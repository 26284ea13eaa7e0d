"""The PromQL that contrib/ ships: the alert rules' and the dashboard's queries, and the
rbd-restore metric names they use."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "contrib" / "prometheus" / "rbd-restore.rules.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "rbd-restore.rules.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "rbd-restore.json"

_METRIC = re.compile(r"\brbd_restore_[a-z0-9_]+")
# What Grafana puts in place of its variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "6h", "$fetcher": ".*",
                     "$runner": ".*"}


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_queries(substitute: bool = True) -> list[str]:
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            query = target["expr"]
            if substitute:
                for variable, value in GRAFANA_VARIABLES.items():
                    query = query.replace(variable, value)
            queries.append(query)
    return queries


def exported_name(name: str) -> str:
    """The name a scrape shows: a histogram's series end in _bucket, _count, _sum."""
    return re.sub(r"_(bucket|count|sum)$", "", name)


def queried_metrics() -> set[str]:
    return {exported_name(m) for q in rule_queries() + dashboard_queries()
            for m in _METRIC.findall(q)}
