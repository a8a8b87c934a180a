"""Several rerank models in one app (issue 23): one module-scoped Ray + Serve app, one Reranker replica.

The app serves three working models and a broken one with ``rerank_models_per_replica=2``: two cross-encoder
stand-ins with different seeds (``ce-a``, the default, and ``ce-b``: same architecture, different scoring
heads, so their scores differ), the tiny LLM reranker stand-in (``llm``, a randomly initialised Qwen3, with
its own default instruction), and ``broken`` (a folder that is no model). Each
request is checked against the library's ``make_reranker`` for the model it named; the Reranker's batch log
shows that no batch mixed two models; ``/info`` shows the LRU eviction; Ray's metrics endpoint shows the
per-model series (at 0 from start-up, then counting); the cohere SDK and OpenAI's client talk to it.

The figures (load on demand, first request to a cold model vs a warm one) are printed; run with ``-s`` to
see them (docs/BENCHMARKS.md, "Several rerank models").
"""

from __future__ import annotations

import copy
import os
import re
import statistics
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from helpers import cpu_app_config, free_port, ingest_demo, ray_cluster, wait_ready

pytestmark = pytest.mark.serve

APP = "rag"
QUERY = "how do I parse a date from a string"
DOCS = [
    "Return a datetime corresponding to date_string, parsed according to format.",
    "Open file and return a corresponding file object.",
    "Sort the list in place, using only < comparisons between items.",
    "Acquire a lock, blocking or non-blocking.",
    "Compress data with gzip and return the bytes.",
    "Join one or more path segments intelligently.",
]
DEFAULT, OTHER, THIRD, BROKEN = "ce-a", "ce-b", "llm", "broken"
LLM_INSTRUCTION = "Given a question about Python, find the docstring that answers it"
FIGURES: dict[str, float] = {}  # printed by the LRU test (docs/BENCHMARKS.md)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """Each served model's id: seeded stand-ins (rag.models' ``standin:`` ids), and a broken folder."""
    broken = tmp_path_factory.mktemp("multimodel") / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a folder, so no stand-in fallback; no model in it
    return {
        DEFAULT: "standin:cross-encoder",
        OTHER: "standin:cross-encoder:seed=2",
        THIRD: "standin:llm",
        BROKEN: str(broken),
    }


def _models(dirs: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"name": DEFAULT, "model": dirs[DEFAULT], "default": True},
        {"name": OTHER, "model": dirs[OTHER]},
        {"name": THIRD, "model": dirs[THIRD], "backend": "llm", "instruction": LLM_INSTRUCTION},
        {"name": BROKEN, "model": dirs[BROKEN]},
    ]


@pytest.fixture(scope="module")
def mm_collection(store, embedder):
    name = ingest_demo(store, embedder, "mm", 40)
    yield name
    store.drop_collection(name)


class Live:
    def __init__(self, url: str, metrics_port: int, dirs: dict[str, str], args: dict[str, Any]) -> None:
        self.url, self.metrics_port, self.dirs, self.args = url, metrics_port, dirs, args

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=180, **kw)

    def rerank(self, model: str | None, docs: list[str] = DOCS, query: str = QUERY) -> httpx.Response:
        body: dict[str, Any] = {"query": query, "documents": docs}
        if model is not None:
            body["model"] = model
        return self.post("/v2/rerank", body)

    def scores(self, r: httpx.Response) -> list[float]:
        assert r.status_code == 200, r.text
        by_index = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        return [by_index[i] for i in range(len(by_index))]

    def info(self) -> dict[str, Any]:
        r = httpx.get(self.url + "/info", timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["stages"]["reranker"]

    def stats(self, reset: bool = False) -> dict[str, Any]:
        from ray import serve

        handle = serve.get_deployment_handle("Reranker", app_name=APP)
        return handle.stats.remote(reset).result(timeout_s=60)

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).text


@pytest.fixture(scope="module")
def live(db_url, state_dir, mm_collection, model_dirs) -> Live:
    from deployments.launch import deploy

    args = {
        "rerank_dtype": "float32",  # the exact path: scores equal the library's
        "embedding_dtype": "float32",
        "rerank_threads": 1,
        "rerank_timeout_s": 120,
        "rerank_cache": False,  # every request goes through its model
        "rerank_models": _models(model_dirs),
        "rerank_models_per_replica": 2,
        "search_mode": "dense",
        "fetch_k": 12,
        "top_k": 4,
    }
    cfg = cpu_app_config(db_url, state_dir, mm_collection, **copy.deepcopy(args))
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] == "Reranker":
            d["num_replicas"] = 1
            d.pop("autoscaling_config", None)
            d["user_config"] = {**d.get("user_config", {}), "batch_wait_timeout_s": 0.05}
    with ray_cluster("rag-multimodel-tests", log_to_driver=bool(os.environ.get("RAG_TEST_SERVE_LOGS"))) as mp:
        port = free_port()
        t0 = time.perf_counter()
        deploy(cfg, host="127.0.0.1", port=port, timeout_s=600)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        print(f"\n[multimodel] app ready in {time.perf_counter() - t0:.1f}s")
        yield Live(url, mp, model_dirs, args)


@pytest.fixture(scope="module")
def library_scores(live, state_dir) -> dict[str, list[float]]:
    """What the library's make_reranker (through a RerankEngine, as the rerank routes) gives for each
    working model, with the app's settings."""
    from rag.models import StandInWarning
    from rag.rerank import make_reranker
    from rag.rerank_engine import RerankEngine, RerankOptions
    from rag.settings import Settings

    s = Settings(data_dir=state_dir, offline=True, **{k: v for k, v in live.args.items()})
    cfg = s.slice("reranker")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        for entry in cfg.served_models():
            if entry.name == BROKEN:
                continue
            c = cfg.for_model(entry)
            out[entry.name] = (
                RerankEngine(make_reranker(c), c).rerank_sync(QUERY, DOCS, RerankOptions()).scores
            )
    return out


# --------------------------------------------------------------------------------------------------
def _series(text: str, name: str) -> dict[str, float]:
    """model label -> value of the first sample of ``name`` per model in a Prometheus text page."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and 'application="rag"' in line:
            m = re.search(r'model="([^"]*)"', line)
            if m:
                out.setdefault(m.group(1), 0.0)
                out[m.group(1)] += float(line.rsplit(" ", 1)[1])
    return out


def test_a_fresh_app_has_the_default_loaded_and_every_per_model_counter_at_zero(live):
    FIGURES["rss_one_model_mb"] = live.stats()["rss_bytes"] / 2**20
    info = live.info()
    assert info["default_model"] == DEFAULT
    assert info["loaded_models"] == [DEFAULT], info["loaded_models"]
    assert [m["name"] for m in info["models"]] == [DEFAULT, OTHER, THIRD, BROKEN]
    assert info["models_per_replica"] == 2
    want = {DEFAULT, OTHER, THIRD, BROKEN}
    names = ("ray_rag_rerank_cache_hits_total", "ray_rag_rerank_cache_misses_total",
             "ray_rag_rerank_model_loads_total")  # fmt: skip
    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while True:
        page = live.metrics()
        got = {n: _series(page, n) for n in names}
        if all(set(v) >= want for v in got.values()):
            break
        assert time.monotonic() < deadline, f"per-model counters missing at start-up: {got}"
        time.sleep(2)
    assert got["ray_rag_rerank_cache_hits_total"] == dict.fromkeys(want, 0.0)


def test_each_request_is_scored_by_the_model_it_named(live, library_scores):
    default = live.scores(live.rerank(None))
    named_default = live.scores(live.rerank(DEFAULT))
    other = live.scores(live.rerank(OTHER))
    FIGURES["rss_two_models_mb"] = live.stats()["rss_bytes"] / 2**20
    assert default == pytest.approx(library_scores[DEFAULT], abs=1e-5)  # no model: the default
    assert named_default == pytest.approx(library_scores[DEFAULT], abs=1e-5)
    assert other == pytest.approx(library_scores[OTHER], abs=1e-5)
    assert max(abs(a - b) for a, b in zip(default, other, strict=True)) > 0.05, "the two models must differ"
    # the Cohere v1 / Jina route and TEI's (the model in a header) select the same way
    v1 = live.post("/v1/rerank", {"model": OTHER, "query": QUERY, "documents": DOCS})
    assert live.scores(v1) == pytest.approx(library_scores[OTHER], abs=1e-5)
    tei = live.post("/rerank", {"query": QUERY, "texts": DOCS}, headers={"X-Rerank-Model": OTHER}).json()
    assert {t["index"]: t["score"] for t in tei} == pytest.approx(dict(enumerate(library_scores[OTHER])))


def test_no_batch_mixes_two_models(live):
    live.stats(reset=True)
    bodies = [(m, [f"{d} ({i})" for d in DOCS]) for i in range(6) for m in (DEFAULT, OTHER)]
    with ThreadPoolExecutor(12) as ex:
        codes = list(ex.map(lambda b: live.rerank(b[0], b[1]).status_code, bodies))
    assert codes == [200] * len(bodies)
    batches = live.stats()["batch_models"]
    assert batches and all(len(b) == 1 for b in batches), batches  # one model per batch
    assert {b[0] for b in batches} == {DEFAULT, OTHER}
    assert len(batches) < len(bodies), "concurrent requests for one model should share batches"


def test_cohere_sdk_selects_the_model(live, library_scores):
    import cohere

    co = cohere.ClientV2(api_key="unused", base_url=live.url, timeout=120)
    for name in (OTHER, DEFAULT):
        resp = co.rerank(model=name, query=QUERY, documents=DOCS)
        got = {r.index: r.relevance_score for r in resp.results}
        assert got == pytest.approx(dict(enumerate(library_scores[name])), abs=1e-5)


def test_search_takes_rerank_model(live):
    a = live.post("/search", {"query": QUERY}).json()
    b = live.post("/search", {"query": QUERY, "rerank_model": OTHER}).json()
    assert a["reranker"]["reranked"] and b["reranker"]["reranked"]
    assert a["reranker"]["name"] == DEFAULT and b["reranker"]["name"] == OTHER
    assert [h["score"] for h in a["results"]] != [h["score"] for h in b["results"]]


def test_unknown_model_is_a_422_listing_the_served_names(live):
    for path, body, headers in (
        ("/v2/rerank", {"model": "nope", "query": QUERY, "documents": DOCS}, {}),
        ("/v1/rerank", {"model": "nope", "query": QUERY, "documents": DOCS}, {}),
        ("/rerank", {"query": QUERY, "texts": DOCS}, {"X-Rerank-Model": "nope"}),
        ("/search", {"query": QUERY, "rerank_model": "nope"}, {}),
    ):
        r = live.post(path, body, headers=headers)
        assert r.status_code == 422, (path, r.text)
        err = r.json()
        assert err["error_type"] == "unknown_model"
        assert all(n in err["error"] for n in (DEFAULT, OTHER, THIRD)), err


def test_models_list_in_openai_shape(live):
    import openai

    client = openai.OpenAI(api_key="unused", base_url=live.url + "/v1")
    ids = [m.id for m in client.models.list()]
    assert ids == [DEFAULT, OTHER, THIRD, BROKEN]
    body = httpx.get(live.url + "/v1/models", timeout=60).json()
    assert body["object"] == "list" and all(m["object"] == "model" for m in body["data"])
    assert [m["id"] for m in body["data"] if m["default"]] == [DEFAULT]


def _timed(live: Live, model: str) -> float:
    t0 = time.perf_counter()
    live.scores(live.rerank(model))
    return time.perf_counter() - t0


def test_lru_eviction_at_the_limit_and_load_on_demand(live):
    """Limit 2: DEFAULT and OTHER are loaded (the tests above); THIRD evicts the least recently used."""
    live.scores(live.rerank(OTHER))
    live.scores(live.rerank(DEFAULT))  # now OTHER is the least recently used
    assert live.info()["loaded_models"] == sorted([DEFAULT, OTHER])
    cold_third = _timed(live, THIRD)
    assert live.info()["loaded_models"] == sorted([DEFAULT, THIRD])  # OTHER evicted
    warm = [_timed(live, THIRD) for _ in range(5)]
    cold_other = _timed(live, OTHER)  # evicts DEFAULT
    warm_other = statistics.median(_timed(live, OTHER) for _ in range(5))
    assert live.info()["loaded_models"] == sorted([OTHER, THIRD])
    deadline = time.monotonic() + 30  # what Serve's router knows, for every replica (each reports its models)
    while (by_replica := live.info()["models_by_replica"]) is None or list(by_replica.values()) != [
        sorted([OTHER, THIRD])
    ]:
        assert time.monotonic() < deadline, f"the router's view: {by_replica}"
        time.sleep(0.5)
    st = live.stats()
    assert st["loads"][OTHER] == 2 and st["loads"][THIRD] == 1, st["loads"]
    load_s = st["load_s"]
    warm_s = statistics.median(warm)
    print(
        f"\n[multimodel] load on demand: {THIRD} {load_s[THIRD]:.2f}s, {OTHER} (reload) {load_s[OTHER]:.2f}s;"
        f" first request to a cold model vs warm (median of 5), {len(DOCS)} documents:"
        f" {THIRD} {cold_third * 1e3:.0f} vs {warm_s * 1e3:.0f} ms, {OTHER} {cold_other * 1e3:.0f} vs"
        f" {warm_other * 1e3:.0f} ms;"
        f" replica RSS with 1 model {FIGURES.get('rss_one_model_mb', 0):.0f} MiB,"
        f" with 2 {FIGURES.get('rss_two_models_mb', 0):.0f} MiB"
    )
    assert cold_third > warm_s and cold_other > warm_other


def test_instructions_reach_the_llm_reranker_and_a_cross_encoder_refuses_one(live, library_scores, state_dir):
    """After the LRU test, the LLM (THIRD) is loaded. Its entry's instruction is its default; a request's own
    instruction replaces it (scores equal the library's with that instruction); a cross-encoder says 422."""
    from rag.rerank import make_reranker
    from rag.rerank_engine import RerankEngine, RerankOptions
    from rag.settings import Settings

    own = "Find the passage that names a Python function"
    default = live.scores(live.rerank(THIRD))
    assert default == pytest.approx(library_scores[THIRD], abs=1e-5)
    body = {"model": THIRD, "query": QUERY, "documents": DOCS, "instruction": own}
    told = live.scores(live.post("/v2/rerank", body))
    cfg = Settings(data_dir=state_dir, offline=True, **live.args).slice("reranker")
    c = cfg.for_model(next(m for m in cfg.served_models() if m.name == THIRD))
    want = RerankEngine(make_reranker(c), c).rerank_sync(QUERY, DOCS, RerankOptions(instruction=own)).scores
    assert told == pytest.approx(want, abs=1e-5) and told != pytest.approx(default, abs=1e-6)
    search = live.post("/search", {"query": QUERY, "rerank_model": THIRD, "instruction": own}).json()
    assert search["reranker"]["reranked"] and search["reranker"]["name"] == THIRD
    refused = live.post("/v2/rerank", {**body, "model": OTHER})
    assert refused.status_code == 422 and "instruction" in refused.json()["error"], refused.text


def test_a_model_that_fails_to_load_is_a_503_naming_it_while_others_serve(live, library_scores):
    r = live.rerank(BROKEN)
    assert r.status_code == 503, r.text
    assert BROKEN in r.json()["error"] and r.json()["error_type"] == "model_unavailable"
    assert live.scores(live.rerank(OTHER)) == pytest.approx(library_scores[OTHER], abs=1e-5)
    again = live.rerank(BROKEN)  # not cached as failed: loaded again, failing again
    assert again.status_code == 503
    dense = live.post("/search", {"query": QUERY, "rerank_model": BROKEN}).json()
    assert dense["reranker"]["reranked"] is False and dense["reranker"]["reason"] == "reranker_error"


def test_per_model_metrics_are_exported(live):
    deadline = time.monotonic() + 60
    while True:
        page = live.metrics()
        pairs = _series(page, "ray_rag_rerank_batch_pairs_count")
        loads = _series(page, "ray_rag_rerank_model_loads_total")
        if {DEFAULT, OTHER, THIRD} <= set(pairs) and loads.get(BROKEN, 0) >= 2:
            break
        assert time.monotonic() < deadline, f"per-model series: batches {pairs}, loads {loads}"
        time.sleep(2)
    assert all(pairs[m] > 0 for m in (DEFAULT, OTHER, THIRD)), pairs
    errors = [ln for ln in page.splitlines() if ln.startswith("ray_rag_rerank_model_loads_total{")
              and f'model="{BROKEN}"' in ln and 'outcome="error"' in ln]  # fmt: skip
    assert errors and float(errors[0].rsplit(" ", 1)[1]) >= 2
