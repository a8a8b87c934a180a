"""The rerank and embedding routes with the clients people use, against the real deployment code.

No Ray cluster: the real ``Reranker`` and ``Embedder`` deployment classes (their methods, batching,
windows, score cache), the real stand-in cross-encoder and packaged embedder, the real ingress app, served by
uvicorn on a free port of 127.0.0.1. The clients are the ones from PyPI: ``cohere`` (ClientV2 -> /v2/rerank,
Client -> /v1/rerank), LlamaIndex's ``JinaRerank`` (-> /v1/rerank, Jina's shape), ``openai``
(-> /v1/embeddings, float and base64). The serve tier (tests/test_serve.py) runs the same routes on Ray.
"""

from __future__ import annotations

import inspect
import threading
import time
import warnings
from typing import Any

import httpx
import pytest
from helpers import free_port, in_process_batching

QUERY = "What is the capital of the United States?"
DOCS = [
    "Carson City is the capital city of the American state of Nevada.",
    "The Commonwealth of the Northern Mariana Islands is a group of islands in the Pacific Ocean.",
    "Washington, D.C. is the capital of the United States.",
    "Capital punishment has existed in the United States since before it was a country.",
]
MAX_DOCUMENTS = 50


class LocalMethod:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any, **kw: Any) -> Any:
        if inspect.iscoroutinefunction(self.fn):
            return self.fn(*args, **kw)

        async def call() -> Any:
            return self.fn(*args, **kw)

        return call()


class LocalHandle:
    """A DeploymentHandle stand-in that calls a deployment object in this process."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __getattr__(self, name: str) -> LocalMethod:
        return LocalMethod(getattr(self.obj, name))


class NoStore:
    candidates: list[dict] = []

    async def search(self, *a: Any, **kw: Any) -> list:
        return list(NoStore.candidates)

    def ready(self) -> dict:
        return {}

    def info(self) -> dict:
        return {}


class App:
    def __init__(self, url: str, reranker: Any, embedder: Any) -> None:
        self.url, self.reranker, self.embedder = url, reranker, embedder

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=120, **kw)


@pytest.fixture(scope="module")
def app(settings) -> App:
    import uvicorn
    from ray.serve import batching

    from deployments._service import SearchService
    from deployments.embedder import Embedder
    from deployments.ingress import create_app
    from deployments.reranker import Reranker
    from rag.models import StandInWarning

    # @serve.batch outside a replica: only its check of the replica's max_ongoing_requests needs Serve
    mp = pytest.MonkeyPatch()
    mp.setattr(
        batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None
    )
    s = settings.with_overrides(
        rerank_dtype="float32", embedding_dtype="float32", max_documents=MAX_DOCUMENTS
    )
    batching_here = in_process_batching(Reranker.func_or_class, Embedder.func_or_class)
    batching_here.__enter__()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        rr = Reranker.func_or_class(s.slice("reranker"))
    rr.reconfigure({"batch_wait_timeout_s": 0.005})
    emb = Embedder.func_or_class(s.slice("embedder"))
    emb.reconfigure({})
    service = SearchService(LocalHandle(emb), LocalHandle(NoStore()), LocalHandle(rr), s.slice("search"))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the test app did not start"
        time.sleep(0.2)
    try:
        yield App(url, rr, emb)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        batching_here.__exit__(None, None, None)
        mp.undo()


def _long_doc() -> tuple[str, str]:
    """A ~3,000-token document with DOCS[2] buried near its end."""
    from rag.ingest import iter_demo

    filler = " ".join(d.content for d in iter_demo(limit=200))
    filler = " ".join(filler.split()[:2400])
    return filler + " " + DOCS[2], DOCS[2]


# --------------------------------------------------------------------------------------------------
# real clients
# --------------------------------------------------------------------------------------------------
def test_cohere_client_v2_strings_and_long_documents(app):
    import cohere

    co = cohere.ClientV2(api_key="unused", base_url=app.url, timeout=120)
    long, _ = _long_doc()
    resp = co.rerank(
        model="rerank-v3.5", query=QUERY, documents=[*DOCS, long], top_n=3, max_tokens_per_doc=4096
    )
    assert len(resp.results) == 3
    scores = [r.relevance_score for r in resp.results]
    assert scores == sorted(scores, reverse=True)
    assert resp.id and resp.meta.warnings  # the stand-in is reported
    assert resp.meta.api_version.version == "2"
    assert resp.meta.billed_units.search_units == 1
    assert resp.meta.tokens.input_tokens > 3000  # the long document was read, in windows
    everything = app.post("/v2/rerank", {"query": QUERY, "documents": [*DOCS, long]})
    long_result = next(r for r in everything.json()["results"] if r["index"] == len(DOCS))
    assert long_result["windows"] > 5
    span = long_result["span"]
    assert 0 <= span["start"] < span["end"] <= len(long)


def test_cohere_client_v1_return_documents(app):
    import cohere

    co = cohere.Client(api_key="unused", base_url=app.url, timeout=120)
    resp = co.rerank(model="rerank-english-v3.0", query=QUERY, documents=DOCS, top_n=2, return_documents=True)
    assert len(resp.results) == 2 and resp.results[0].document.text in DOCS
    assert resp.meta.api_version.version == "1" and resp.meta.billed_units.search_units == 1
    plain = co.rerank(model="rerank-english-v3.0", query=QUERY, documents=DOCS)
    assert plain.results[0].document is None  # Cohere v1's default: no documents back


def test_llamaindex_jina_rerank(app):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    nodes = [NodeWithScore(node=TextNode(text=d, id_=f"n{i}"), score=0.0) for i, d in enumerate(DOCS)]
    jina = JinaRerank(
        top_n=3, model="jina-reranker-v2-base-multilingual", base_url=app.url + "/v1", api_key="x"
    )
    out = jina.postprocess_nodes(nodes, query_bundle=QueryBundle(QUERY))
    assert len(out) == 3 and {n.node.node_id for n in out} <= {f"n{i}" for i in range(len(DOCS))}
    assert [n.score for n in out] == sorted((n.score for n in out), reverse=True)
    tei = app.post("/rerank", {"query": QUERY, "texts": DOCS}).json()  # the same scores as TEI's shape
    assert [n.score for n in out] == pytest.approx([t["score"] for t in tei[:3]], abs=1e-6)


def test_jina_shape_by_hand(app):
    r = app.post(
        "/v1/rerank",
        {"model": "jina-reranker-v2-base-multilingual", "query": QUERY, "documents": DOCS, "top_n": 2},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "jina-reranker-v2-base-multilingual"
    assert (
        body["usage"]["total_tokens"] > 0
        and body["usage"]["total_tokens"] == body["meta"]["tokens"]["input_tokens"]
    )
    assert len(body["results"]) == 2
    assert all(res["document"]["text"] == DOCS[res["index"]] for res in body["results"])  # Jina's default
    off = app.post(
        "/v1/rerank", {"model": "jina-x", "query": QUERY, "documents": DOCS, "return_documents": False}
    )
    assert "document" not in off.json()["results"][0]


def test_openai_embeddings_float_and_base64(app):
    import numpy as np
    import openai

    client = openai.OpenAI(api_key="unused", base_url=app.url + "/v1", timeout=120)
    resp = client.embeddings.create(model="text-embedding-3-small", input=["hello world", "parse a date"])
    assert [d.index for d in resp.data] == [0, 1] and len(resp.data[0].embedding) == 384
    tok = app.embedder.embedder.tokenizer
    expected = sum(len(tok(t)["input_ids"]) for t in ["hello world", "parse a date"])  # with [CLS], [SEP]
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == expected
    assert resp.model == "sentence-transformers/all-MiniLM-L6-v2"
    as_float = client.embeddings.create(model="m", input="hello world", encoding_format="float")
    tei = app.post("/embed", {"inputs": "hello world"}).json()[0]
    assert np.allclose(resp.data[0].embedding, tei, atol=1e-6)
    assert np.allclose(as_float.data[0].embedding, tei, atol=1e-6)
    raw = app.post("/v1/embeddings", {"input": "hello world", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(__import__("base64").b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, np.asarray(tei, dtype=np.float32))
    assert app.post("/v1/embeddings", {"input": [1, 2, 3]}).status_code == 422  # token ids: not accepted
    r = app.post("/v1/embeddings", {"input": "x", "dimensions": 64})
    assert r.status_code == 422 and "384" in r.json()["error"]


# --------------------------------------------------------------------------------------------------
# ids, documents, usage headers
# --------------------------------------------------------------------------------------------------
def test_ids_come_back_and_mixed_documents_are_accepted(app):
    docs = [{"id": "dc", "text": DOCS[2]}, DOCS[0], {"text": DOCS[1]}, {"id": 7, "text": DOCS[3]}]
    for path in ("/v2/rerank", "/v1/rerank"):
        r = app.post(path, {"query": QUERY, "documents": docs, "return_documents": True})
        assert r.status_code == 200, r.text
        by_index = {x["index"]: x for x in r.json()["results"]}
        assert by_index[0]["id"] == "dc" and by_index[3]["id"] == 7 and "id" not in by_index[1]
        assert all(x["document"]["text"] == DOCS[[2, 0, 1, 3][i]] for i, x in by_index.items())


def test_usage_headers_on_every_rerank_route(app):
    bodies = {
        "/v2/rerank": {"query": QUERY, "documents": DOCS},
        "/v1/rerank": {"query": QUERY, "documents": DOCS},
        "/rerank": {"query": QUERY, "texts": DOCS},
    }
    for path, body in bodies.items():
        body = {**body, "query": f"{QUERY} ({path})"}  # a query of its own: not answered from the cache
        r = app.post(path, body)
        assert r.status_code == 200, r.text
        h = r.headers
        for name in ("x-compute-tokens", "x-total-time", "x-queue-time", "x-inference-time"):
            assert h[name].isdigit(), (path, name, h.get(name))
        assert int(h["x-compute-tokens"]) > 4 * 10
        assert int(h["x-inference-time"]) > 0 and int(h["x-total-time"]) >= int(h["x-inference-time"])
        assert h["x-rerank-pairs"] == "4" and h["x-rerank-cache-hits"] == "0"
        again = app.post(path, body)
        assert again.headers["x-rerank-cache-hits"] == "4"  # the second time, from the score cache


def test_cache_counts_windows_and_info_reports_the_bound(app):
    long, _ = _long_doc()
    rr = app.reranker
    rr.stats(reset=True)
    r = app.post("/rerank", {"query": "capital city", "texts": [long, DOCS[0]]})
    assert r.status_code == 200
    pairs = int(r.headers["x-rerank-pairs"])
    assert pairs > 6  # the long document's windows count as pairs ...
    assert rr.stats()["pairs"] == pairs  # ... in the batcher too
    info = rr.info()
    assert info["score_cache"]["max_entries"] == 200_000 and info["score_cache"]["max_bytes"] == 64 << 20
    assert info["long_documents"]["max_tokens_per_doc"] == 4096 and info["long_documents"]["split"] is True


def test_tei_truncate_keeps_its_meaning(app):
    long, _ = _long_doc()
    r = app.post("/rerank", {"query": QUERY, "texts": [DOCS[0], long], "truncate": False})
    assert r.status_code == 422 and "texts[1]" in r.json()["error"] and "truncate: false" in r.json()["error"]
    first = app.post("/rerank", {"query": QUERY, "texts": [long], "truncate": True})
    assert first.status_code == 200 and first.headers["x-rerank-pairs"] == "1"
    assert app.post("/rerank", {"query": QUERY, "texts": DOCS, "truncate": False}).status_code == 200


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_empty_and_whitespace_documents_are_scored(app):
    r = app.post("/v2/rerank", {"query": QUERY, "documents": ["", "   ", DOCS[2]]})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 3 and all(0 <= x["relevance_score"] <= 1 for x in res)
    by_index = {x["index"]: x["relevance_score"] for x in res}
    assert by_index[0] == pytest.approx(by_index[1], abs=1e-6)  # both: the query against nothing


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        (
            "/v2/rerank",
            {"query": "q", "documents": ["a"] * 10_000},
            "at most 50 per request (RAG_MAX_DOCUMENTS)",
        ),
        (
            "/v2/rerank",
            {"query": "q", "documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]},
            "repeats",
        ),
        ("/v1/rerank", {"query": "q", "documents": [{"text": 3}]}, "string 'text'"),
        ("/v1/rerank", {"query": "q", "documents": [{"id": "a"}]}, "string 'text'"),
        ("/v2/rerank", {"query": "q", "documents": ["a", 1]}, "documents.1"),
        (
            "/v2/rerank",
            {"query": "q", "documents": ["a"], "max_tokens_per_doc": 100_000},
            "between 1 and 4096",
        ),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}, "max_tokens_per_doc"),
    ],
)
def test_bad_input_is_422(app, path, body, words):
    r = app.post(path, body)
    assert r.status_code == 422, r.text
    assert words in r.json()["error"]


def test_a_1mb_document_is_bounded_by_max_tokens_per_doc(app):
    big = "lorem ipsum dolor sit amet " * 37_000  # ~1 MB, under the 1 MiB body limit
    t0 = time.perf_counter()
    r = app.post("/v2/rerank", {"query": QUERY, "documents": [big], "max_tokens_per_doc": 1024})
    assert r.status_code == 200, r.text
    assert time.perf_counter() - t0 < 60
    res = r.json()["results"][0]
    assert res["windows"] == 3 and res["span"]["end"] < 10_000
    assert r.json()["meta"]["tokens"]["input_tokens"] <= 3 * 512


def test_search_candidates_keep_one_window(app):
    long, _ = _long_doc()
    NoStore.candidates = [
        {"id": "c0", "doc_id": "d0", "source": "s", "content": long, "dense_score": 0.5, "metadata": {}}
    ]
    try:
        r = app.post("/search", {"query": QUERY, "fetch_k": 1, "top_k": 1, "collection": "default"})
    finally:
        NoStore.candidates = []
    assert r.status_code == 200, r.text
    assert r.json()["reranker"]["reranked"] is True
    first = app.post("/rerank", {"query": QUERY, "texts": [long], "truncate": True})
    # /search candidates are chunks: the first window only (rerank_search_windows = 1), like truncation
    assert r.json()["results"][0]["score"] == pytest.approx(first.json()[0]["score"], abs=1e-4)
