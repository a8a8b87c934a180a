"""The Serve app end to end: a module-scoped Ray + Serve app on this machine (CPU config), real database, real
models (packaged MiniLM embedder, offline stand-in reranker), HTTP on a free port of 127.0.0.1.

The app is deployed from serve_config.cpu.yaml (adjusted: fp32, small limits) through deployments.launch.deploy,
i.e. exactly like ``serve run``. Later tests change the Reranker's config in place (user_config, queue limits,
autoscaling: all lightweight updates, no restart), so the order of the tests in this file matters.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from helpers import QUERIES, cpu_app_config, free_port, ingest_demo, ray_cluster

pytestmark = pytest.mark.serve

APP = "rag"
FETCH_K = 20
TOP_K = 5


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def serve_collection(store, embedder):
    """~150 short stdlib docstrings, ingested with rag.ingest into a collection of their own."""
    name = ingest_demo(store, embedder, "serve", 150)
    yield name
    store.drop_collection(name)


@pytest.fixture(scope="module")
def base_config(db_url, state_dir, serve_collection) -> dict[str, Any]:
    """serve_config.cpu.yaml for this machine's tests: fp32 (to compare with the pipeline), small limits."""
    cfg = cpu_app_config(
        db_url,
        state_dir,
        serve_collection,
        embedding_dtype="float32",
        rerank_dtype="float32",
        rerank_threads=1,
        fetch_k=FETCH_K,
        top_k=TOP_K,
        # these tests pin dense-mode answers (stage 1's score is dense_score); the service's default mode,
        # hybrid, is tested live in tests/test_hybrid_serve.py
        search_mode="dense",
        max_documents=64,
        max_body_bytes=64 * 1024,
        rerank_timeout_s=60,
        # the batching, admission and autoscaling tests below need every pair computed; the score cache is
        # tested on this app last (test_score_cache_on_the_live_app) and in tests/test_rerank_api.py
        rerank_cache=False,
    )
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] == "Reranker":
            d["user_config"]["batch_wait_timeout_s"] = 0.02
    return cfg


def with_reranker(cfg: dict[str, Any], **options: Any) -> dict[str, Any]:
    """A copy of ``cfg`` whose Reranker deployment has ``options`` (None removes a key)."""
    out = copy.deepcopy(cfg)
    for d in out["applications"][0]["deployments"]:
        if d["name"] == "Reranker":
            for k, v in options.items():
                if v is None:
                    d.pop(k, None)
                elif isinstance(v, dict) and isinstance(d.get(k), dict):
                    d[k] = {**d[k], **v}
                else:
                    d[k] = v
    return out


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster("rag-serve-tests", log_to_driver=bool(os.environ.get("RAG_TEST_SERVE_LOGS"))):
        yield


class Live:
    """The running app: its URL, how to redeploy it, and what /readyz said while it came up."""

    def __init__(self, port: int, config: dict[str, Any]) -> None:
        self.port, self.config = port, config
        self.url = f"http://127.0.0.1:{port}"
        self.readyz_before: tuple[int, dict] | None = None
        self.readyz_after: tuple[int, dict] | None = None

    def deploy(self, cfg: dict[str, Any], wait: bool = True) -> None:
        from deployments.launch import deploy

        deploy(cfg, host="127.0.0.1", port=self.port, wait=wait, timeout_s=300)

    def handle(self, deployment: str):
        from ray import serve

        return serve.get_deployment_handle(deployment, app_name=APP)


@pytest.fixture(scope="module")
def live(cluster, base_config) -> Live:
    """Deploy with a Reranker that cannot start (it asks for a resource no node has): GET /readyz must say 503.
    Then deploy the real config: it must turn 200."""
    lv = Live(free_port(), base_config)
    lv.deploy(
        with_reranker(base_config, ray_actor_options={"num_cpus": 0.5, "resources": {"no_such_node": 1}}),
        wait=False,
    )
    deadline = time.monotonic() + 180
    while lv.readyz_before is None:
        try:
            r = httpx.get(lv.url + "/readyz", timeout=30)
            if r.headers.get("content-type", "").startswith("application/json"):
                lv.readyz_before = (r.status_code, r.json())
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the ingress never answered /readyz"
        time.sleep(0.5)
    lv.deploy(base_config)
    deadline = time.monotonic() + 120
    while True:
        r = httpx.get(lv.url + "/readyz", timeout=30)
        if r.status_code == 200 or time.monotonic() > deadline:
            lv.readyz_after = (r.status_code, r.json())
            break
        time.sleep(0.5)
    return lv


def post(lv: Live, path: str, body: Any, timeout: float = 120, **kw: Any) -> httpx.Response:
    return httpx.post(lv.url + path, json=body, timeout=timeout, **kw)


def concurrently(n: int, fn, args: list) -> list:
    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(fn, args))


# --------------------------------------------------------------------------------------------------
# readiness, health, docs
# --------------------------------------------------------------------------------------------------
def test_readyz_is_503_until_models_are_loaded(live):
    status, body = live.readyz_before
    assert status == 503, body
    assert body["error_type"] == "not_ready"
    assert "reranker" in body["error"] and body["reranker"]["ready"] is False
    assert "not ready" in body["reranker"]["reason"]
    status, body = live.readyz_after
    assert status == 200, body
    assert body["ready"] is True and body["reranker"]["trained"] is False  # the offline stand-in says so


def test_healthz_and_openapi(live):
    assert httpx.get(live.url + "/healthz", timeout=10).json() == {"status": "ok"}
    paths = httpx.get(live.url + "/openapi.json", timeout=10).json()["paths"]
    for p in ("/search", "/search/stream", "/v2/rerank", "/rerank", "/embed", "/healthz", "/readyz"):
        assert p in paths
    assert httpx.get(live.url + "/docs", timeout=10).status_code == 200


# --------------------------------------------------------------------------------------------------
# /search
# --------------------------------------------------------------------------------------------------
def _same_ranking(served: list[dict], expected: list[dict], tol: float = 1e-3) -> None:
    """Same ids in the same order, scores equal within tol; neighbours closer than tol may swap."""
    assert len(served) == len(expected)
    for s, e in zip(served, expected, strict=True):
        if s["id"] != e["id"]:
            assert abs(s["score"] - e["score"]) < tol, (s["id"], e["id"])
        assert s["dense_score"] == pytest.approx(e["dense_score"], abs=1e-4)
    by_id = {e["id"]: e["score"] for e in expected}
    for s in served:
        assert s["id"] in by_id
        assert s["score"] == pytest.approx(by_id[s["id"]], abs=tol)


def test_search_matches_pipeline(live, settings, embedder, store, serve_collection):
    from rag.models import StandInWarning
    from rag.pipeline import Pipeline
    from rag.rerank import CrossEncoderReranker

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        rr = CrossEncoderReranker(
            settings.rerank_model, cache_dir=settings.model_cache, dtype="float32", offline=True
        )
    pipe = Pipeline(settings, embedder=embedder, store=store, reranker=rr)
    for q in QUERIES[:3]:
        expected = pipe.retrieve_and_rerank(
            q, fetch_k=FETCH_K, top_k=TOP_K, collection=serve_collection, mode="dense"
        )
        r = post(live, "/search", {"query": q, "fetch_k": FETCH_K, "top_k": TOP_K})
        assert r.status_code == 200, r.text
        body = r.json()
        _same_ranking(body["results"], expected)
        assert body["reranker"]["reranked"] is True and body["reranker"]["reason"] is None
        assert body["reranker"]["trained"] is False and body["reranker"]["dtype"] == "float32"
        assert set(body["timings_ms"]) == {"embed", "retrieve", "rerank", "total", "strategy"}
        assert body["timings_ms"]["strategy"] in ("hnsw", "exact")
        assert body["candidates"] == FETCH_K
        for h in body["results"]:
            assert {"id", "source", "content", "score", "dense_score"} <= set(h)


def test_library_and_service_rerank_identically(live):
    """The same request through the library's rerank engine (``rag.rerank_engine``, in this process) and the
    live service (/v2/rerank: ingress, Reranker replica, @serve.batch), with the settings the replica reports
    it holds: identical scores, best-window spans, windows and usage."""
    import warnings

    from rag.models import StandInWarning
    from rag.rerank import make_reranker
    from rag.rerank_engine import RerankEngine
    from rag.stages import RerankerConfig

    info = httpx.get(live.url + "/info", timeout=60).json()["stages"]["reranker"]
    cfg = RerankerConfig.model_validate(info["config"])  # the replica's own settings (no secret is set)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        engine = RerankEngine(make_reranker(cfg), cfg)
    from rag.ingest import iter_demo

    filler = " ".join(" ".join(d.content for d in iter_demo(limit=120)).split()[:1800])
    docs = [filler + " The strptime function parses a date string.", "strftime formats dates", "gzip", ""]
    query = f"how do I parse a date string ({time.time_ns()})"  # new to any cache
    lib = engine.rerank_sync(query, docs)
    r = post(live, "/v2/rerank", {"query": query, "documents": docs})
    assert r.status_code == 200, r.text
    served = {x["index"]: x for x in r.json()["results"]}
    assert [served[i]["relevance_score"] for i in range(len(docs))] == lib.scores
    spans = [(served[i]["span"]["start"], served[i]["span"]["end"]) if "span" in served[i] else None
             for i in range(len(docs))]  # fmt: skip
    assert spans == lib.spans and spans[0] is not None  # the long document was split, the same way
    assert [served[i].get("windows", 1) for i in range(len(docs))] == lib.windows
    assert int(r.headers["x-rerank-pairs"]) == lib.usage.pairs > len(docs)
    assert r.json()["meta"]["tokens"]["input_tokens"] == lib.usage.tokens


def test_search_without_rerank_is_dense_order(live):
    body = post(live, "/search", {"query": QUERIES[0], "rerank": False}).json()
    assert body["reranker"]["reranked"] is False and body["reranker"]["reason"] == "not_requested"
    scores = [h["dense_score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == TOP_K
    assert all(h["score"] == h["dense_score"] for h in body["results"])


def test_budget_too_small_skips_rerank(live):
    body = post(live, "/search", {"query": QUERIES[1], "budget_ms": 1}).json()
    assert body["reranker"]["reranked"] is False and body["reranker"]["reason"] == "budget"
    assert [h["score"] for h in body["results"]] == [h["dense_score"] for h in body["results"]]
    body = post(live, "/search", {"query": QUERIES[1], "budget_ms": 60_000}).json()
    assert body["reranker"]["reranked"] is True


def test_concurrent_requests_form_batches(live):
    rr = live.handle("Reranker")
    rr.stats.remote(reset=True).result(timeout_s=30)
    n = 16
    responses = concurrently(
        n, lambda q: post(live, "/search", {"query": q}), [QUERIES[i % 8] for i in range(n)]
    )
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["reranker"]["reranked"] for r in responses)
    st = rr.stats.remote().result(timeout_s=30)
    assert st["items"] == n and st["pairs"] == n * FETCH_K
    assert st["max_batch_requests"] > 1, st  # several requests' pairs went through one forward pass
    assert st["max_batch_pairs"] == st["max_batch_requests"] * FETCH_K
    assert st["batches"] < n


def test_stream_sends_dense_then_reranked(live):
    events = []
    with httpx.stream("POST", live.url + "/search/stream", json={"query": QUERIES[2]}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[len("data: ") :]), time.monotonic()))
    assert [e[0] for e in events] == ["dense", "reranked", "done"]
    dense, reranked, done = (e[1] for e in events)
    assert len(dense["results"]) == TOP_K and len(reranked["results"]) == TOP_K
    assert [h["dense_score"] for h in dense["results"]] == sorted(
        [h["dense_score"] for h in dense["results"]], reverse=True
    )
    assert reranked["reranker"]["reranked"] is True
    assert set(done["timings_ms"]) == {"embed", "retrieve", "rerank", "total", "strategy"}
    assert events[0][2] <= events[1][2]


def test_embed(live):
    vecs = post(live, "/embed", {"inputs": ["hello", "world"]}).json()
    assert len(vecs) == 2 and len(vecs[0]) == 384
    assert sum(x * x for x in vecs[0]) == pytest.approx(1.0, abs=1e-3)
    assert len(post(live, "/embed", {"inputs": "one"}).json()) == 1


# --------------------------------------------------------------------------------------------------
# rerank APIs: Cohere v2 (official client), Cohere v1, TEI
# --------------------------------------------------------------------------------------------------
DOCS = [
    "Carson City is the capital city of the American state of Nevada.",
    "The Commonwealth of the Northern Mariana Islands is a group of islands in the Pacific Ocean.",
    "Washington, D.C. is the capital of the United States.",
    "Capital punishment has existed in the United States since before it was a country.",
]


def test_cohere_client_v2(live):
    import cohere

    co = cohere.ClientV2(api_key="unused", base_url=live.url, timeout=120)
    resp = co.rerank(
        model="rerank-v3.5", query="What is the capital of the United States?", documents=DOCS, top_n=3
    )
    assert len(resp.results) == 3
    scores = [r.relevance_score for r in resp.results]
    assert scores == sorted(scores, reverse=True)
    assert {r.index for r in resp.results} <= set(range(len(DOCS)))
    assert resp.id and resp.meta.warnings  # the stand-in is reported
    # the same scores as TEI's shape
    tei = post(live, "/rerank", {"query": "What is the capital of the United States?", "texts": DOCS}).json()
    assert [t["index"] for t in tei[:3]] == [r.index for r in resp.results]
    assert [t["score"] for t in tei[:3]] == pytest.approx(scores, abs=1e-5)


def test_cohere_client_v1(live):
    import cohere

    co = cohere.Client(api_key="unused", base_url=live.url, timeout=120)
    resp = co.rerank(
        model="rerank-english-v3.0",
        query="capital of the US?",
        documents=DOCS,
        top_n=2,
        return_documents=True,
    )
    assert len(resp.results) == 2 and resp.results[0].document.text in DOCS


def test_tei_rerank(live):
    r = post(
        live,
        "/rerank",
        {"query": "capital of the US?", "texts": DOCS, "return_text": True, "raw_scores": False},
    )
    assert r.status_code == 200
    out = r.json()
    assert sorted(x["index"] for x in out) == list(range(len(DOCS)))
    assert [x["score"] for x in out] == sorted((x["score"] for x in out), reverse=True)
    assert all(0 <= x["score"] <= 1 and x["text"] == DOCS[x["index"]] for x in out)
    raw = post(live, "/rerank", {"query": "capital of the US?", "texts": DOCS, "raw_scores": True}).json()
    assert [x["index"] for x in raw] == [x["index"] for x in out] and "text" not in raw[0]


def test_jina_and_openai_clients(live):
    import openai
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    nodes = [NodeWithScore(node=TextNode(text=d, id_=f"n{i}"), score=0.0) for i, d in enumerate(DOCS)]
    jina = JinaRerank(
        top_n=2, model="jina-reranker-v2-base-multilingual", base_url=live.url + "/v1", api_key="x"
    )
    out = jina.postprocess_nodes(nodes, query_bundle=QueryBundle("capital of the US?"))
    assert len(out) == 2 and out[0].score >= out[1].score
    client = openai.OpenAI(api_key="unused", base_url=live.url + "/v1", timeout=120)
    resp = client.embeddings.create(
        model="text-embedding-3-small", input=["hello", "world"]
    )  # base64 on the wire
    tei = post(live, "/embed", {"inputs": ["hello", "world"]}).json()
    import numpy as np

    assert np.allclose([d.embedding for d in resp.data], tei, atol=1e-6)
    assert resp.usage.total_tokens == 6  # [CLS] hello [SEP], [CLS] world [SEP]


def test_long_document_windows_ids_and_usage_headers(live):
    long = " ".join(["Carson City is a city in Nevada with a long history of mining."] * 150) + " " + DOCS[2]
    r = post(
        live,
        "/v2/rerank",
        {
            "query": "capital of the US?",
            "documents": [{"id": "long", "text": long}, DOCS[0]],
            "return_documents": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    res = {x["index"]: x for x in body["results"]}
    assert res[0]["id"] == "long" and res[0]["windows"] > 3 and res[0]["document"]["text"] == long
    assert 0 <= res[0]["span"]["start"] < res[0]["span"]["end"] <= len(long) and "span" not in res[1]
    pairs = int(r.headers["x-rerank-pairs"])
    assert pairs == res[0]["windows"] + 1  # every window is a pair for the batcher
    assert body["meta"]["tokens"]["input_tokens"] == int(r.headers["x-compute-tokens"]) > 1500
    for h in ("x-total-time", "x-queue-time", "x-inference-time"):
        assert r.headers[h].isdigit()
    assert int(r.headers["x-total-time"]) >= int(r.headers["x-inference-time"]) > 0
    tei = post(live, "/rerank", {"query": "capital of the US?", "texts": [long], "truncate": False})
    assert tei.status_code == 422 and "truncate: false" in tei.json()["error"]


# --------------------------------------------------------------------------------------------------
# the error table, on the live app (rows that need a broken dependency: test_serve_errors.py)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "error_type", "words"),
    [
        ("/search", {"query": "   "}, "invalid_input", "non-empty"),
        ("/search", {"query": "x", "fetch_k": 5, "top_k": 6}, "invalid_input", "top_k"),
        ("/search", {"query": "x", "fetch_k": 5000}, "invalid_input", "fetch_k"),
        ("/search", {"query": "x", "top_k": 0}, "invalid_input", "top_k"),
        ("/search", {"query": 3}, "invalid_input", "query"),
        ("/search", {"query": "x", "collection": "nope_" + "x" * 8}, "collection_error", "does not exist"),
        ("/search", {"query": "x", "collection": "Bad-Name"}, "collection_error", "invalid collection"),
        ("/v2/rerank", {"query": "", "documents": ["a"]}, "invalid_input", "non-empty"),
        ("/v2/rerank", {"query": "q", "documents": ["a", 1]}, "invalid_input", "documents.1"),
        ("/v2/rerank", {"query": "q", "documents": []}, "invalid_input", "at least one"),
        ("/v2/rerank", {"query": "q", "documents": ["a"] * 65}, "invalid_input", "at most 64"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, "invalid_input", "top_n"),
        ("/rerank", {"query": "q", "texts": [None]}, "invalid_input", "texts.0"),
        ("/embed", {"inputs": [""]}, "invalid_input", "non-empty"),
    ],
)
def test_invalid_requests_are_422(live, path, body, error_type, words):
    r = post(live, path, body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert set(err) == {"error", "error_type"} and err["error_type"] == error_type
    assert words in err["error"]


def test_oversize_body_is_422(live):
    r = post(live, "/v2/rerank", {"query": "q", "documents": ["x" * 70_000]})
    assert r.status_code == 422 and r.json()["error_type"] == "body_too_large"


def test_unknown_route_is_404_json(live):
    r = httpx.get(live.url + "/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"


# --------------------------------------------------------------------------------------------------
# failures and overload (these change the Reranker's config in place; keep them last)
# --------------------------------------------------------------------------------------------------
def test_reranker_failure_degrades_search(live):
    live.deploy(with_reranker(live.config, user_config={"inject_failure": True}))
    try:
        body = post(live, "/search", {"query": QUERIES[3]}).json()
        assert body["reranker"]["reranked"] is False and body["reranker"]["reason"] == "reranker_error"
        assert "injected" in body["reranker"]["detail"]
        assert [h["score"] for h in body["results"]] == [h["dense_score"] for h in body["results"]]
        r = post(
            live, "/v2/rerank", {"query": "q", "documents": ["a", "b"]}
        )  # no dense order to fall back on
        assert r.status_code == 503 and r.json()["error_type"] == "reranker_error"
    finally:
        live.deploy(live.config)
    assert post(live, "/search", {"query": QUERIES[3]}).json()["reranker"]["reranked"] is True


def test_full_queue_is_503_with_retry_after(live):
    slow = with_reranker(
        live.config,
        max_ongoing_requests=1,
        max_queued_requests=1,
        user_config={"inject_delay_ms": 1500, "max_batch_size": 1},
    )
    live.deploy(slow)
    try:
        for _ in range(3):  # the ingress's handle learns the new queue limit by long poll: allow it a moment
            rs = concurrently(
                6, lambda i: post(live, "/rerank", {"query": f"q{i}", "texts": ["a", "b"]}), list(range(6))
            )
            codes = sorted(r.status_code for r in rs)
            if 503 in codes:
                break
        assert 200 in codes and 503 in codes, codes
        for r in rs:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error_type"] == "overloaded" and "queue is full" in r.json()["error"]
        # /search keeps answering under the same overload, in dense order
        rs = concurrently(6, lambda q: post(live, "/search", {"query": q}), QUERIES[:6])
        assert all(r.status_code == 200 for r in rs)
        reasons = {r.json()["reranker"]["reason"] for r in rs}
        assert "overloaded" in reasons, reasons  # refused at once (Ray's queue limit): not an error
    finally:
        live.deploy(live.config)


def test_reranker_refuses_work_it_cannot_finish_in_time(live):
    # A 6 s batch, measured once. With a 12 s budget the deadline the reranker gets is what is left of it
    # (~12 s): the first of three concurrent searches is admitted (~6-8 s); the others would finish after
    # ~12-16 s, past 0.8 x the deadline, so the replica refuses them at once instead of computing them.
    live.deploy(with_reranker(live.config, user_config={"inject_delay_ms": 6_000}))
    try:
        assert post(live, "/search", {"query": QUERIES[0]}).json()["reranker"]["reranked"] is True  # measured
        # let the ingress's own latency estimate (fed by earlier tests too) go stale, so that its budget check
        # lets the searches through and the decision is the reranker's
        time.sleep(6)
        rs = concurrently(3, lambda q: post(live, "/search", {"query": q, "budget_ms": 12_000}), QUERIES[1:4])
        assert all(r.status_code == 200 for r in rs)
        bodies = [r.json() for r in rs]
        assert sum(b["reranker"]["reranked"] for b in bodies) == 1, [b["reranker"] for b in bodies]
        for b in bodies:
            if b["reranker"]["reranked"]:
                assert b["timings_ms"]["total"] < 12_000  # the admitted one made its deadline
                continue
            assert b["reranker"]["reason"] == "overloaded", b["reranker"]
            assert "the reranker is busy" in b["reranker"]["detail"]
            assert b["timings_ms"]["total"] < 3_000  # answered at once, in dense order
            assert [h["score"] for h in b["results"]] == [h["dense_score"] for h in b["results"]]
    finally:
        live.deploy(live.config)


def _replicas(deployment: str) -> int:
    from ray import serve

    st = serve.status().applications[APP].deployments[deployment]
    return st.replica_states.get("RUNNING", 0)


def test_reranker_autoscales_up_and_down(live):
    cfg = with_reranker(
        live.config,
        num_replicas=None,
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
    )
    live.deploy(cfg)
    try:
        assert _replicas("Reranker") == 1
        stop = threading.Event()

        def load(i: int) -> None:
            with httpx.Client(timeout=120) as c:
                while not stop.is_set():
                    c.post(live.url + "/rerank", json={"query": f"load {i}", "texts": DOCS * 4})

        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        peak, deadline = 1, time.monotonic() + 150
        try:
            while time.monotonic() < deadline and peak < 2:
                time.sleep(1)
                peak = max(peak, _replicas("Reranker"))
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=150)
        assert peak == 2, "sustained load did not bring the Reranker to 2 replicas"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _replicas("Reranker") != 1:
            time.sleep(1)
        assert _replicas("Reranker") == 1, "the Reranker did not scale back to 1 replica after the load"
    finally:
        live.deploy(live.config)


def test_score_cache_on_the_live_app(live):
    """Last: the app redeployed with the score cache on (the Reranker restarts with its new args)."""
    cfg = copy.deepcopy(live.config)
    cfg["applications"][0]["args"]["rerank_cache"] = True
    live.deploy(cfg)
    from helpers import wait_ready

    wait_ready(live.url)
    body = {"query": "capital of the US? (cache test)", "documents": DOCS}
    first, second = post(live, "/v2/rerank", body), post(live, "/v2/rerank", body)
    assert first.headers["x-rerank-cache-hits"] == "0" and second.headers["x-rerank-cache-hits"] == str(
        len(DOCS)
    )
    assert [x["relevance_score"] for x in first.json()["results"]] == [
        x["relevance_score"] for x in second.json()["results"]
    ]
    cache = httpx.get(live.url + "/info", timeout=60).json()["stages"]["reranker"]["score_cache"]
    assert cache["enabled"] is True and cache["max_entries"] == 200_000 and cache["hits"] >= len(DOCS)
