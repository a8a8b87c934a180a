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
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import QUERIES, cpu_app_config, free_port, ingest_demo, ray_cluster, wait_ready

from deployments.metrics import LATENCY_MS_BUCKETS, METRICS, RAY_SERVE_METRICS, exported_series, zero_series
from monitoring.alerts import alerts
from monitoring.dashboard import ALERTS_PATH, DASHBOARD_PATH, DASHBOARD_UID, dashboard, render
from monitoring.grafana import panel_targets
from monitoring.promql import metric_names, quantile, series, substitute

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
        assert path.exists(), f"{path} missing: run .venv/bin/python -m monitoring.dashboard"
        assert path.read_text() == text, f"{path} is stale: run .venv/bin/python -m monitoring.dashboard"


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
    for needed in (
        "request rate",
        "error rate",
        "end-to-end latency",
        "embed latency",
        "retrieve latency",
        "rerank latency",
        "rerank batch size (pairs)",
        "rerank batch size (requests)",
        "batch utilisation",
        "queued requests",
        "replicas vs autoscaling target",
        "reranks skipped",
        "db pool saturation",
    ):
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
    assert set(alerts) >= {
        "RagSearchLatencyP99High",
        "RagErrorRateHigh",
        "RagRerankerErrors",
        "RagNoReadyReplicas",
    }
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
    rules = [
        {"record": f"panel_{p['id']}_{t['refId']}", "expr": substitute(t["expr"], application="rag")}
        for p, t in panel_targets(dashboard())
    ]
    f = tmp_path / "panels.yaml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    r = _promtool("check", "rules", str(f))
    assert r.returncode == 0, r.stdout + r.stderr


# --- serve tier: a real Prometheus scraping a running app ---------------------------------------------------
#
# One module-scoped Ray + Serve app (serve_config.cpu.yaml, adjusted like tests/test_serve.py does, with an
# autoscaling Reranker so the autoscaling series exist), one Prometheus subprocess started through the shipped
# monitoring/run-prometheus.sh (temp config and data dir, free port, 1 s scrapes), and one round of traffic
# through every path. The tests below then only read Prometheus.

OBS_APP = "rag"  # the application name in serve_config.cpu.yaml
OBS_FETCH_K, OBS_TOP_K = 16, 4
OBS_QUERIES = QUERIES


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    """Debian's prometheus binary; the serve-tier proof skips, saying why, without it."""
    debian = Path("/usr/bin/prometheus")
    found = shutil.which("prometheus") or (str(debian) if debian.exists() else None)
    if found is None:
        pytest.skip(
            "the `prometheus` binary is not installed (Debian: apt-get install -y "
            "--no-install-recommends prometheus); the proof against a real Prometheus needs it"
        )
    return found


@pytest.fixture(scope="module")
def obs_collection(store, embedder):
    name = ingest_demo(store, embedder, "obs", 80)
    yield name
    store.drop_collection(name)


def _obs_config(db_url: str, state_dir: Path, collection: str, *, inject_failure: bool = False) -> dict:
    cfg = cpu_app_config(
        db_url,
        state_dir,
        collection,
        rerank_threads=1,
        fetch_k=OBS_FETCH_K,
        top_k=OBS_TOP_K,
        rerank_timeout_s=60,
        # The test database as its own read replica (no standby: lag 0), so the replica series exist.
        database_read_urls=db_url,
    )
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] == "Reranker":
            # autoscaling (pinned to one replica) so ray_serve_autoscaling_* exist, as in production
            d.pop("num_replicas", None)
            d["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16}
            d["user_config"] = {
                **d.get("user_config", {}),
                "batch_wait_timeout_s": 0.05,
                "inject_failure": inject_failure,
            }
    return cfg


class ObsApp:
    def __init__(self, http_port: int, metrics_port: int, configs: dict[str, dict]) -> None:
        self.url = f"http://127.0.0.1:{http_port}"
        self.http_port, self.metrics_port, self.configs = http_port, metrics_port, configs

    def deploy(self, which: str) -> None:
        from deployments.launch import deploy

        deploy(self.configs[which], host="127.0.0.1", port=self.http_port, timeout_s=600)

    def wait_user_config(self, **want: object) -> None:
        """Until the (single) Reranker replica runs with ``want`` in its user_config."""
        from ray import serve

        handle = serve.get_deployment_handle("Reranker", app_name=OBS_APP)
        deadline = time.monotonic() + 60
        while True:
            cfg = handle.stats.remote().result(timeout_s=30)["user_config"]
            if all(cfg.get(k) == v for k, v in want.items()):
                return
            assert time.monotonic() < deadline, f"Reranker user_config is {cfg}, want {want}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def obs_app(prometheus_bin, db_url, state_dir, obs_collection):
    """Its own Ray (namespace, free metrics port) and Serve app; shut down at module teardown, so it never
    meets tests/test_serve.py's instance in the same session."""

    with ray_cluster("rag-observability-tests") as metrics_port:
        configs = {
            k: _obs_config(db_url, state_dir, obs_collection, inject_failure=k == "failing")
            for k in ("normal", "failing")
        }
        app = ObsApp(free_port(), metrics_port, configs)
        app.deploy("normal")
        wait_ready(app.url)
        yield app


class Prom:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:
        import httpx

        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}\n-> {r.status_code} {body}"
        assert body["data"]["resultType"] in ("vector", "matrix"), expr
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        res = self.query(expr)
        return float(res[0]["value"][1]) if res else None


@pytest.fixture(scope="module")
def prometheus(prometheus_bin, obs_app, tmp_path_factory):
    """monitoring/run-prometheus.sh on a free port with a temp data dir, scraping the app every second.
    Independent of any system prometheus service (its own port, config and storage)."""
    import httpx

    port, data = free_port(), tmp_path_factory.mktemp("prometheus")
    env = {
        **os.environ,
        "PROMETHEUS": prometheus_bin,
        "PROM_PORT": str(port),
        "PROM_DATA": str(data),
        "PROM_SCRAPE_INTERVAL": "1s",
        "RAG_METRICS_PORT": str(obs_app.metrics_port),
    }
    log = (data / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [str(MONITORING / "run-prometheus.sh"), "--log.level=warn"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prom(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited: {(data / 'prometheus.log').read_text()}"
            try:
                if httpx.get(prom.url + "/-/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.5)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Traffic:
    """What the clients saw: successful /search bodies and status codes per path taken."""

    def __init__(self) -> None:
        self.ok: list[dict] = []
        self.statuses: dict[str, list[int]] = {}

    def search(self, url: str, path: str, body: dict) -> dict | None:
        import httpx

        r = httpx.post(url + "/search", json=body, timeout=120)
        self.statuses.setdefault(path, []).append(r.status_code)
        if r.status_code == 200:
            self.ok.append(r.json())
            return r.json()
        return None

    def reasons(self) -> dict[str | None, int]:
        out: dict[str | None, int] = {}
        for b in self.ok:
            out[b["reranker"]["reason"]] = out.get(b["reranker"]["reason"], 0) + 1
        return out


def _zero_series_found(prometheus: Prom) -> dict[str, dict[tuple, float]]:
    """name -> (label values in zero_series order) -> value, for the app's error and skip counters."""
    out: dict[str, dict[tuple, float]] = {}
    for name, label_sets in zero_series().items():
        keys = tuple(label_sets[0])
        res = prometheus.query(f'sum by ({", ".join(keys)}) ({series(name)}{{application="{OBS_APP}"}})')
        out[name] = {tuple(r["metric"].get(k) for k in keys): float(r["value"][1]) for r in res}
    return out


@pytest.mark.serve
def test_error_and_skip_counters_read_zero_before_the_first_error(prometheus):
    """Runs before the traffic fixture: with no request served, every known label set of rag_errors_total and
    rag_rerank_skipped_total is already in Prometheus, at 0 (dashboards read 0, not "No data")."""
    want = {n: {tuple(t.values()): 0.0 for t in sets} for n, sets in zero_series().items()}
    deadline = time.monotonic() + 90  # Ray exports every few seconds; Prometheus scrapes every second
    while (got := _zero_series_found(prometheus)) != want:
        assert time.monotonic() < deadline, f"Prometheus holds {got}, want every known label set at 0: {want}"
        time.sleep(2)


# What a dashboard panel reads that cannot exist before the first event, and why: a histogram has no
# observation to export until one happens (Ray offers no empty histogram), and Ray Serve's own series appear
# with Serve's own activity. Every counter and gauge of ours that a panel reads exists from start-up.
FIRST_EVENT = {
    "histogram": "a Ray histogram is exported from its first observation",
    "ray": "Ray Serve's built-in series are Ray's, exported from Serve's first activity of their kind",
}


def _dashboard_series() -> dict[str, str]:
    """Every exported series a dashboard panel reads -> the metric it belongs to."""
    read = {n for _, t in panel_targets(dashboard()) for n in metric_names(t["expr"])}
    return {s: name for name in [*METRICS, *RAY_SERVE_METRICS] for s in exported_series(name) if s in read}


@pytest.mark.serve
def test_every_counter_and_gauge_the_dashboard_reads_exists_before_any_traffic(prometheus):
    """Runs before the traffic fixture: on a fresh app, each of our counters and gauges that a panel reads
    has series in Prometheus, for each served model where it has a model label (the score cache counters
    read 0, not "No data", before the first hit)."""
    want = {
        s: name
        for s, name in _dashboard_series().items()
        if name in METRICS and METRICS[name][0] in ("counter", "gauge")
    }
    assert "ray_rag_rerank_cache_hits_total" in want and "ray_rag_rerank_model_loads_total" in want
    deadline = time.monotonic() + 90
    while missing := [s for s in want if not prometheus.query(f'count({s}{{application="{OBS_APP}"}})')]:
        assert time.monotonic() < deadline, f"absent on a fresh app (a panel would read No data): {missing}"
        time.sleep(2)
    hits = prometheus.query(f'sum by (model) (ray_rag_rerank_cache_hits_total{{application="{OBS_APP}"}})')
    assert hits and all(float(r["value"][1]) == 0 and r["metric"].get("model") for r in hits), hits
    others = {n for n in _dashboard_series().values() if n not in want.values()}
    kinds = {n: (METRICS[n][0] if n in METRICS else "ray") for n in others}
    assert all(k in FIRST_EVENT for k in kinds.values()), kinds


@pytest.fixture(scope="module")
def traffic(obs_app, prometheus) -> Traffic:
    """Every path once or more: reranked (sequential and concurrent, so batches merge requests), rerank
    not requested, budget skip, invalid requests (422), reranker error (user_config.inject_failure)."""
    from concurrent.futures import ThreadPoolExecutor

    t, url = Traffic(), obs_app.url
    t.search(url, "reranked", {"query": OBS_QUERIES[0]})
    # Prometheus must hold each stage's histogram before the rest of the traffic: rate() ignores the value a
    # series first appears with, so traffic that all lands before the first export (Ray exports every few
    # seconds) would read as a rate of 0 and a p50 of NaN (seen in CI: "embed: no p50").
    deadline = time.monotonic() + 60
    stages = ("embed", "retrieve", "rerank", "total")
    sel = f'application="{OBS_APP}"'
    while any(
        prometheus.value(f'sum({series("rag_stage_latency_ms", "_count")}{{{sel},stage="{s}"}})') is None
        for s in stages
    ):
        assert time.monotonic() < deadline, "the first search's stage timings never reached Prometheus"
        time.sleep(1)
    for q in OBS_QUERIES[1:3]:
        t.search(url, "reranked", {"query": q})
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda q: t.search(url, "reranked", {"query": q}), OBS_QUERIES * 2))
    for q in OBS_QUERIES[:2]:
        t.search(url, "not_requested", {"query": q, "rerank": False})
    for q in OBS_QUERIES[:3]:  # 1 ms cannot cover stage 1, so stage 2 never starts
        t.search(url, "budget", {"query": q, "budget_ms": 1})
    for body in ({"query": ""}, {"query": "x", "top_k": 50, "fetch_k": 10}, {"query": "x", "fetch_k": 0}):
        t.search(url, "invalid", body)
    obs_app.deploy("failing")  # user_config only: a lightweight update, no restart
    obs_app.wait_user_config(inject_failure=True)
    try:
        for q in OBS_QUERIES[:3]:
            t.search(url, "reranker_error", {"query": q})
    finally:
        obs_app.deploy("normal")
        obs_app.wait_user_config(inject_failure=False)
    t.search(url, "reranked", {"query": OBS_QUERIES[-1]})

    assert set(t.statuses["invalid"]) == {422}, t.statuses
    assert all(s == 200 for k, v in t.statuses.items() if k != "invalid" for s in v), t.statuses
    want = {None: 3 + 2 * len(OBS_QUERIES) + 1, "not_requested": 2, "budget": 3, "reranker_error": 3}
    assert t.reasons() == want, t.reasons()

    # Wait until Prometheus has scraped everything the app recorded (Ray exports every few seconds).
    deadline = time.monotonic() + 120
    expect = {"total": len(t.ok), "rerank": want[None]}
    while True:
        got = {
            s: prometheus.value(
                f'sum({series("rag_stage_latency_ms", "_count")}{{application="{OBS_APP}",stage="{s}"}})'
            )
            for s in expect
        }
        skipped = prometheus.value(f'sum({series("rag_rerank_skipped_total")}{{application="{OBS_APP}"}})')
        if got == expect and skipped == 6:
            break
        assert time.monotonic() < deadline, f"stuck: counts {got} != {expect}, skipped {skipped} != 6"
        time.sleep(2)
    names = [s for n in [*METRICS, *RAY_SERVE_METRICS] for s in exported_series(n)]
    deadline = (
        time.monotonic() + 60
    )  # series that only the next export carries (test_every_metric... says which)
    while time.monotonic() < deadline and any(
        not prometheus.query(f'count({n}{{application="{OBS_APP}"}})') for n in names
    ):
        time.sleep(2)
    time.sleep(6)  # a few more scrapes, so every rate() window holds several samples
    return t


RATE_WINDOW = "10m"  # $__rate_interval stand-in: covers all of this module's traffic


# Metrics this app cannot produce, and why (tested where they can be: tests/test_serve_errors.py).
ONLY_WHEN = {
    "rag_auth_failures_total": "a 401, which needs RAG_API_KEYS; this app is open",
}
# Gauges Ray stops exporting once they go unset: Serve sets its batch-queue gauge only while a batch forms,
# and Ray 2.60's metrics recorder evicts a gauge series not refreshed within two export intervals (seen:
# present 10 s after traffic, gone at 30 s). So "exported" means: had a sample since the module started.
SET_ONLY_WHILE_BUSY = {"serve_batch_queue_length"}


@pytest.mark.serve
def test_every_metric_is_exported(prometheus, traffic):
    """Each of our metrics and each reused built-in has series for the app in Prometheus."""
    missing = []
    for name in [*METRICS, *RAY_SERVE_METRICS]:
        if name in ONLY_WHEN:
            continue
        for s in exported_series(name):
            selector = f'{s}{{application="{OBS_APP}"}}'
            if name in SET_ONLY_WHILE_BUSY:
                selector = f"last_over_time({selector}[1h])"
            if not prometheus.query(f"count({selector})"):
                missing.append(s)
    assert not missing, f"nobody exports {missing}"


@pytest.mark.serve
def test_every_panel_query_returns_series(prometheus, traffic):
    d = json.loads(DASHBOARD_PATH.read_text())
    app_var = next(v for v in d["templating"]["list"] if v["name"] == "application")
    values = {
        r["metric"].get("application")
        for r in prometheus.query(
            app_var["query"]
            .replace("label_values(", "group by (application) (")
            .replace(", application)", ")")
        )
    }
    assert OBS_APP in values, f"the application variable would not offer {OBS_APP!r}: {values}"
    empty = []
    for panel, target in panel_targets(d):
        for app in (OBS_APP, ".*"):  # one application selected, and "All"
            expr = substitute(target["expr"], application=app, rate_interval=RATE_WINDOW)
            if not prometheus.query(expr):
                empty.append(f"{panel['title']} [{target['refId']}] application={app}: {expr}")
    assert not empty, "panel queries without data:\n" + "\n".join(empty)


def _finite(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


def _ray_midpoint(value: float, bounds: list[float]) -> float:
    """Ray 2.60 re-creates each histogram observation as its bucket's midpoint (so ``_sum`` is approximate):
    (0 + b0) / 2 for the first bucket, (b[i-1] + b[i]) / 2 inside, 2 * b[-1] past the last bound."""
    for i, b in enumerate(bounds):
        if value <= b:
            return (b + (bounds[i - 1] if i else 0.0)) / 2
    return bounds[-1] * 2


def _ray_halfwidth(value: float, bounds: list[float]) -> float:
    for i, b in enumerate(bounds):
        if value <= b:
            return (b - (bounds[i - 1] if i else 0.0)) / 2
    return abs(bounds[-1] * 2 - value)


@pytest.mark.serve
def test_latency_panels_agree_with_response_timings(prometheus, traffic):
    """Per stage, the histogram Prometheus holds is the histogram of the timings the responses carried:
    same count, same bucket counts, and a mean (from _sum/_count, as the 'Mean latency by stage' panel reads
    it) equal to the response timings' mean as Ray approximates it, and near their true mean. The p50 the
    panels show lies inside the range of timings the clients saw."""
    sel = f'application="{OBS_APP}"'
    for stage in ("embed", "retrieve", "rerank", "total"):
        seen = [b["timings_ms"][stage] for b in traffic.ok if stage != "rerank" or b["reranker"]["reranked"]]
        name = f'{{{sel},stage="{stage}"}}'
        count = prometheus.value(f"sum({series('rag_stage_latency_ms', '_count')}{name})")
        assert count == len(seen), f"{stage}: Prometheus counted {count}, clients saw {len(seen)}"
        buckets = {
            float(r["metric"]["le"]): float(r["value"][1])
            for r in prometheus.query(f"sum by (le) ({series('rag_stage_latency_ms', '_bucket')}{name})")
        }
        for le, n in buckets.items():  # +-1: a timing within 0.0005 ms of a bound may round across it
            assert abs(n - sum(v <= le for v in seen)) <= 1, f"{stage}: bucket le={le} holds {n}"
        mean = prometheus.value(f"sum({series('rag_stage_latency_ms', '_sum')}{name})") / count
        approx = sum(_ray_midpoint(v, LATENCY_MS_BUCKETS) for v in seen) / len(seen)
        true_mean = sum(seen) / len(seen)
        assert mean == pytest.approx(approx, rel=0.02), f"{stage}: {mean} vs midpoint mean {approx}"
        # and a midpoint is never further from the value than half its bucket's width
        slack = sum(_ray_halfwidth(v, LATENCY_MS_BUCKETS) for v in seen) / len(seen)
        assert abs(mean - true_mean) <= slack + 0.01, f"{stage}: {mean} vs true mean {true_mean} (+-{slack})"
        p50 = _finite(
            prometheus.query(
                quantile(0.5, "rag_stage_latency_ms", sel, f'stage="{stage}"', window=RATE_WINDOW)
            )
        )
        if not p50:  # say why: the bucket rates and how many samples each series holds in the window
            diag = {
                q: prometheus.query(q)
                for q in (
                    f"sum by (le) (rate({series('rag_stage_latency_ms', '_bucket')}{name}[{RATE_WINDOW}]))",
                    f"count_over_time({series('rag_stage_latency_ms', '_count')}{name}[{RATE_WINDOW}])",
                    f"{series('rag_stage_latency_ms', '_count')}{name}[{RATE_WINDOW}]",
                )
            }
            pytest.fail(f"{stage}: no p50; {diag}")
        # histogram_quantile interpolates within a bucket: allow one bucket's width either side
        lo = max([b for b in LATENCY_MS_BUCKETS if b <= min(seen)], default=0)
        hi = min([b for b in LATENCY_MS_BUCKETS if b >= max(seen)], default=math.inf)
        assert lo <= p50[0] <= hi, f"{stage}: p50 {p50[0]:.1f} ms outside [{lo}, {hi}]"
    proxy = prometheus.value(
        f"sum({series('serve_http_request_latency_ms', '_count')}"
        f'{{{sel},route=~".*/search",status_code="200"}})'
    )
    assert proxy == len(traffic.ok), "the proxy's latency histogram counts every /search answered 200"


@pytest.mark.serve
def test_counters_match_the_traffic(prometheus, traffic):
    sel = f'application="{OBS_APP}"'
    reasons = traffic.reasons()
    skipped = {
        r["metric"]["reason"]: float(r["value"][1])
        for r in prometheus.query(f"sum by (reason) ({series('rag_rerank_skipped_total')}{{{sel}}})")
    }
    assert {k: v for k, v in skipped.items() if v} == {
        "budget": reasons["budget"],
        "reranker_error": reasons["reranker_error"],
    }
    found = _zero_series_found(prometheus)  # the label sets exported at 0 from start-up are all still there
    for name, label_sets in zero_series().items():
        missing = [t for t in label_sets if tuple(t.values()) not in found[name]]
        assert not missing, f"{name}: {missing} no longer exported"
    errors = {
        (r["metric"]["stage"], r["metric"]["error_type"]): float(r["value"][1])
        for r in prometheus.query(f"sum by (stage, error_type) ({series('rag_errors_total')}{{{sel}}})")
    }
    assert errors.get(("rerank", "reranker_error")) == reasons["reranker_error"], errors
    by_status = {
        r["metric"]["status_code"]: float(r["value"][1])
        for r in prometheus.query(
            f'sum by (status_code) ({series("serve_num_http_requests")}{{{sel},route=~".*/search"}})'
        )
    }
    assert by_status.get("200") == len(traffic.ok) and by_status.get("422") == len(
        traffic.statuses["invalid"]
    )
    ingress = {
        r["metric"]["status"]: float(r["value"][1])
        for r in prometheus.query(
            f'sum by (status) ({series("rag_requests_total")}{{{sel},route="/search"}})'
        )
    }
    assert ingress == {k: float(v) for k, v in by_status.items()}, (ingress, by_status)
    # Every reranked search scored fetch_k pairs (+ probes). Ray's _sum is rebuilt from bucket midpoints
    # (_ray_midpoint), which can undercount batches of exactly fetch_k; each bucket's upper bound cannot.
    cumulative = sorted(
        (float(r["metric"]["le"]), float(r["value"][1]))
        for r in prometheus.query(f"sum by (le) ({series('rag_rerank_batch_pairs', '_bucket')}{{{sel}}})")
    )
    finite = [(le, n) for le, n in cumulative if math.isfinite(le)]
    assert cumulative and cumulative[-1][1] == finite[-1][1], "a batch above the largest pairs bucket"
    at_most = sum(
        le * (n - prev) for (le, n), (_, prev) in zip(finite, [(0.0, 0.0), *finite[:-1]], strict=True)
    )
    assert at_most >= reasons[None] * OBS_FETCH_K, (at_most, cumulative)
    items = prometheus.value(f"sum({series('rag_rerank_batch_requests', '_sum')}{{{sel}}})")
    batches = prometheus.value(f"sum({series('rag_rerank_batch_requests', '_count')}{{{sel}}})")
    assert items > batches, "no Reranker batch ever merged two requests"


@pytest.mark.serve
def test_every_alert_expression_evaluates(prometheus, traffic):
    import httpx

    rules = [r for g in yaml.safe_load(ALERTS_PATH.read_text())["groups"] for r in g["rules"]]
    assert [r["expr"] for r in rules] == [a.expr for a in alerts()]
    for alert in alerts():
        prometheus.query(alert.expr)  # valid and evaluable now (an empty vector: not firing)
        for signal in alert.signals:
            assert prometheus.query(signal), f"{alert.name}: {signal} has no data"
    # the rules file loaded into this Prometheus, and every rule evaluates without error
    deadline = time.monotonic() + 30
    while True:
        loaded = [
            r
            for g in httpx.get(prometheus.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
            for r in g["rules"]
        ]
        if len(loaded) == len(rules) and all(r.get("health") == "ok" for r in loaded):
            break
        assert time.monotonic() < deadline, loaded
        time.sleep(1)
    no_ready = next(a for a in alerts() if a.name == "RagNoReadyReplicas")
    assert prometheus.query(no_ready.expr) == [], "a healthy app must not look replica-less"
