"""rag.client, and the LangChain and LlamaIndex retrievers over it, against a live app.

One module-scoped Ray + Serve app (CPU config, the session's embedded PostgreSQL, the packaged embedder, the
offline stand-in reranker), started with API keys on; the last test turns them off. Every client method
runs against it, sync and async; the errors come back as the rag.errors types; two real overloads give
real 503s with Retry-After that the client waits out: the Reranker's full queue (the service's JSON
``overloaded`` body) and the Ingress's full queue (Ray Serve's proxy answers a plain-text 503 itself).

The score cache is on (the configs' default), so a repeated request gets the scores it got before: the
retrievers' scores are compared for equality with the client's ``retrieve_and_rerank``.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import QUERIES, cpu_app_config, free_port, ingest_demo, ray_cluster, wait_ready

from rag.client import AsyncClient, Client, DenseEvent, DoneEvent, RerankedEvent, RetryPolicy
from rag.errors import (
    CollectionError,
    InvalidInput,
    Overloaded,
    Unauthenticated,
)

pytestmark = pytest.mark.serve

FETCH_K, TOP_K = 20, 5
KEYS = ("client-key-1", "client-key-2")
KEY = KEYS[1]
HIT_TYPES = {"id": str, "doc_id": str, "source": str, "content": str, "score": float, "dense_score": float,
             "chunk_index": int, "metadata": dict}  # fmt: skip
DOCS = [
    "Carson City is the capital city of the American state of Nevada.",
    "Washington, D.C. is the capital of the United States.",
    "Capital punishment has existed in the United States since before it was a country.",
]


# --------------------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coll(store, embedder):
    name = ingest_demo(store, embedder, "client", 120)
    yield name
    store.drop_collection(name)


class App:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config, self.port = config, free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def deploy(self, cfg: dict[str, Any]) -> None:
        from deployments.launch import deploy

        deploy(cfg, host="127.0.0.1", port=self.port, timeout_s=600)  # slow on a busy machine

    def configured(self, **deployments: dict[str, Any]) -> dict[str, Any]:
        """A copy of the config with deployment options merged in (``user_config`` merged key by key)."""
        cfg = copy.deepcopy(self.config)
        for d in cfg["applications"][0]["deployments"]:
            for k, v in deployments.get(d["name"], {}).items():
                d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
        return cfg


@pytest.fixture(scope="module")
def app(db_url, state_dir, coll):
    cfg = cpu_app_config(
        db_url,
        state_dir,
        coll,
        embedding_dtype="float32",  # what the in-process embedder runs: the library comparison below
        rerank_threads=1,
        search_mode="dense",  # dense answers (score == dense_score without rerank); mode=: test_modes_pass
        fetch_k=FETCH_K,
        top_k=TOP_K,
        rerank_timeout_s=60,
        api_keys=",".join(KEYS),
    )
    with ray_cluster("rag-client-tests"):
        a = App(cfg)
        a.deploy(cfg)
        wait_ready(a.url)
        yield a


@pytest.fixture(scope="module")
def client(app):
    with Client(app.url, api_key=KEY) as c:
        yield c


def run(coro):
    return asyncio.run(coro)


async def _async_calls(url: str, query: str, coll: str) -> dict[str, Any]:
    async with AsyncClient(url, api_key=KEY) as c:
        events = [e async for e in c.search_stream(query, fetch_k=FETCH_K, top_k=TOP_K)]
        return {
            "ready": await c.ready(),
            "info": await c.info(),
            "search": await c.search(query, fetch_k=FETCH_K, top_k=TOP_K),
            "rr": await c.retrieve_and_rerank(query, fetch_k=FETCH_K, top_k=TOP_K, collection=coll),
            "dense": await c.retrieve(query, k=TOP_K),
            "events": events,
            "rerank": await c.rerank("capital of the US?", DOCS, top_n=2),
            "embed": await c.embed(["hello", "world"]),
        }


# --------------------------------------------------------------------------------------------------
# every method
# --------------------------------------------------------------------------------------------------
def test_ready_and_info(app, client):
    ready = client.ready()
    assert ready and ready.reason is None
    assert {"embedder", "database", "reranker"} <= set(ready.components)
    assert Client(app.url, api_key="").ready()  # the probe is open without a key
    info = client.info()
    assert info["stages"]["search"]["config"]["fetch_k"] == FETCH_K and info["service"]["version"]


def test_search_answer_is_typed_and_passes_options_through(client, coll):
    ans = client.search(QUERIES[0], fetch_k=FETCH_K, top_k=TOP_K)
    assert ans.collection == coll and ans.candidates == FETCH_K and len(ans.results) == TOP_K
    assert ans.reranker.reranked is True and ans.reranker.reason is None and ans.reranker.trained is False
    assert {"embed", "retrieve", "rerank", "total"} <= set(ans.timings_ms)
    scores = [h["score"] for h in ans.results]
    assert scores == sorted(scores, reverse=True)
    assert client.search(QUERIES[0], rerank=False).reranker.reason == "not_requested"
    budget = client.search(QUERIES[1], budget_ms=1)
    assert budget.reranker.reason == "budget"
    assert [h["score"] for h in budget.results] == [h["dense_score"] for h in budget.results]
    source = ans.results[0]["source"]
    narrowed = client.search(QUERIES[0], filter={"source": source}, rerank=False)
    assert narrowed.results and {h["source"] for h in narrowed.results} == {source}
    assert client.search(QUERIES[0], collection=coll, top_k=3, fetch_k=3).candidates == 3


def test_hits_have_the_librarys_shape_and_order(client, settings, embedder, store, coll):
    from rag.pipeline import Pipeline

    # stage 1 only: no reranker is loaded; dense, as the app serves by default
    pipe = Pipeline(settings.with_overrides(search_mode="dense"), embedder=embedder, store=store)
    for q in QUERIES[:3]:
        local = pipe.retrieve(q, k=TOP_K, collection=coll)
        remote = client.retrieve(q, k=TOP_K, collection=coll)
        assert [h["id"] for h in remote] == [h["id"] for h in local] or _close_swaps(remote, local)
        for r, h in zip(remote, local, strict=True):
            assert set(r) == set(h) == set(HIT_TYPES)
            assert {k: type(v) for k, v in r.items()} == {k: type(v) for k, v in h.items()} == HIT_TYPES
            assert r["score"] == r["dense_score"] == pytest.approx(h["dense_score"], abs=1e-4)
    reranked = client.retrieve_and_rerank(QUERIES[0], fetch_k=FETCH_K, top_k=TOP_K)
    assert len(reranked) == TOP_K
    assert all({k: type(v) for k, v in h.items()} == HIT_TYPES for h in reranked)


def test_modes_pass_through_and_match_the_library(client, settings, embedder, store, coll):
    from rag.pipeline import Pipeline

    pipe = Pipeline(settings, embedder=embedder, store=store)
    for mode in ("lexical", "hybrid"):
        local = pipe.retrieve(QUERIES[0], k=TOP_K, collection=coll, mode=mode)
        remote = client.retrieve(QUERIES[0], k=TOP_K, collection=coll, mode=mode)
        assert [h["id"] for h in remote] == [h["id"] for h in local], mode
        assert [h["fused_score"] for h in remote] == pytest.approx([h["fused_score"] for h in local]), mode
        assert all(h["score"] == h["fused_score"] for h in remote)  # stage 1's own score, not the dense one


def _close_swaps(a: list[dict], b: list[dict]) -> bool:
    """Same ids; where the orders differ, the dense scores are within 1e-4 (a tie broken differently)."""
    if {h["id"] for h in a} != {h["id"] for h in b}:
        return False
    return all(
        x["id"] == y["id"] or abs(x["dense_score"] - y["dense_score"]) < 1e-4
        for x, y in zip(a, b, strict=True)
    )


def test_stream_events_are_typed_and_end_in_the_reranked_answer(client):
    q = QUERIES[2]
    events = list(client.search_stream(q, fetch_k=FETCH_K, top_k=TOP_K))
    assert [type(e) for e in events] == [DenseEvent, RerankedEvent, DoneEvent]
    dense, reranked, done = events
    assert [h["score"] for h in dense.results] == [h["dense_score"] for h in dense.results]
    assert reranked.reranker.reranked is True and done.candidates == FETCH_K
    assert reranked.results == client.retrieve_and_rerank(q, fetch_k=FETCH_K, top_k=TOP_K)  # cached scores
    for ev in client.search_stream(q):  # leaving early closes the stream; the client keeps working
        assert isinstance(ev, DenseEvent)
        break
    assert client.ready()


def test_rerank_and_embed(client):
    out = client.rerank("capital of the US?", [DOCS[0], {"id": "dc", "text": DOCS[1]}, DOCS[2]], top_n=2)
    assert len(out) == 2 and out[0].score >= out[1].score and all(0 <= r.score <= 1 for r in out)
    full = client.rerank("capital of the US?", [DOCS[0], {"id": "dc", "text": DOCS[1]}, DOCS[2]])
    assert [r.index for r in full[:2]] == [r.index for r in out]
    assert sorted(r.index for r in full) == [0, 1, 2]
    assert {r.index: r.id for r in full}[1] == "dc"
    vecs = client.embed(["hello", "world"])
    assert len(vecs) == 2 and len(vecs[0]) == 384
    assert sum(x * x for x in vecs[0]) == pytest.approx(1.0, abs=1e-3)
    assert np.allclose(client.embed("one"), client.embed(["one"]), atol=1e-6)


def test_async_client_gives_what_the_sync_one_gives(app, client, coll):
    q = QUERIES[3]
    got = run(_async_calls(app.url, q, coll))
    assert got["ready"] and got["info"]["stages"]["search"]["config"]["fetch_k"] == FETCH_K
    assert got["search"].results == client.search(q, fetch_k=FETCH_K, top_k=TOP_K).results
    assert got["rr"] == client.retrieve_and_rerank(q, fetch_k=FETCH_K, top_k=TOP_K)
    assert [h["id"] for h in got["dense"]] == [h["id"] for h in client.retrieve(q, k=TOP_K)]
    assert [type(e) for e in got["events"]] == [DenseEvent, RerankedEvent, DoneEvent]
    assert got["events"][1].results == got["rr"]
    assert [r.index for r in got["rerank"]] == [
        r.index for r in client.rerank("capital of the US?", DOCS)[:2]
    ]
    assert np.allclose(got["embed"], client.embed(["hello", "world"]), atol=1e-6)


def test_one_client_shared_by_threads(client):
    expected = {q: [h["id"] for h in client.retrieve(q, k=TOP_K)] for q in QUERIES}
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda q: (q, [h["id"] for h in client.retrieve(q, k=TOP_K)]), QUERIES * 3))
    assert all(ids == expected[q] for q, ids in got)


def test_closed_client_and_context_manager(app):
    with Client(app.url, api_key=KEY) as c:
        assert c.ready()
    with pytest.raises(RuntimeError, match="closed"):
        c.info()


# --------------------------------------------------------------------------------------------------
# errors: auth, and the error table's rows a healthy app can show
# --------------------------------------------------------------------------------------------------
class Recording(httpx.HTTPTransport):
    """A real transport that notes every exchange: (sent at, answered at, status, Retry-After)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[float, float, int, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        response = super().handle_request(request)
        self.log.append((sent, time.monotonic(), response.status_code, response.headers.get("retry-after")))
        return response


def test_auth_on(app, monkeypatch):
    for key in ("", "not-a-key"):
        rec = Recording()
        c = Client(app.url, api_key=key, transport=rec)
        with pytest.raises(Unauthenticated, match="RAG_API_KEY") as e:
            c.search(QUERIES[0])
        assert e.value.status_code == 401 and [x[2] for x in rec.log] == [401]  # not retried
    from rag.settings import get_settings

    monkeypatch.setenv("RAG_API_KEY", KEYS[0])
    get_settings.cache_clear()
    try:
        assert len(Client(app.url).retrieve(QUERIES[0], k=3)) == 3  # the key from the environment
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda c: c.search("   "), InvalidInput, "non-empty"),
        (lambda c: c.retrieve_and_rerank("x", fetch_k=5, top_k=6), InvalidInput, "top_k"),
        (lambda c: c.retrieve("x", k=5000), InvalidInput, "fetch_k"),
        (lambda c: c.search("x", collection="nope_" + "x" * 8), CollectionError, "does not exist"),
        (lambda c: c.retrieve("x", collection="Bad-Name"), CollectionError, "invalid collection"),
        (lambda c: c.search("x", filter={"colour": "red"}), InvalidInput, "filter"),
        (lambda c: c.rerank("q", []), InvalidInput, "at least one"),
        (lambda c: c.rerank("", ["a"]), InvalidInput, "non-empty"),
        (lambda c: c.embed([""]), InvalidInput, "non-empty"),
    ],
)
def test_errors_map_back_to_rag_errors(app, call, error, words):
    rec = Recording()
    with pytest.raises(error, match=words) as e:
        call(Client(app.url, api_key=KEY, transport=rec))
    assert type(e.value) is error and e.value.status_code == 422
    assert [x[2] for x in rec.log] == [422]  # a 422 is not retried


def test_errors_are_the_same_in_the_async_client(app):
    async def go() -> None:
        async with AsyncClient(app.url, api_key=KEY) as c:
            with pytest.raises(CollectionError):
                await c.search("x", collection="nope_" + "y" * 8)
        async with AsyncClient(app.url, api_key="wrong") as c:
            with pytest.raises(Unauthenticated):
                await c.info()

    run(go())


# --------------------------------------------------------------------------------------------------
# real 503s with Retry-After, waited out (these reconfigure the app in place and restore it)
# --------------------------------------------------------------------------------------------------
def _until_refused(fn, n: int) -> list[Any]:
    """``n`` concurrent ``fn(i)``, repeated until one answer is a 503: the handles learn a new queue limit
    by long poll, so the first round may still run under the old one."""
    for _ in range(5):
        with ThreadPoolExecutor(n) as ex:
            out = list(ex.map(fn, range(n)))
        if any(getattr(r, "status_code", None) == 503 for r in out):
            return out
    raise AssertionError(f"no 503 in 5 rounds of {n}: {[getattr(r, 'status_code', r) for r in out]}")


def _waited_out(logs: list[list[tuple[float, float, int, str | None]]]) -> int:
    """Every retry came Retry-After seconds (or more) after the 503 it follows; returns the 503s seen."""
    refused = 0
    for log in logs:
        assert log[-1][2] == 200, log  # each call ended in an answer
        for (_, answered, status, after), (sent, *_) in itertools.pairwise(log):
            assert status == 503 and after is not None, log  # only 503s were retried
            refused += 1
            assert sent - answered >= float(after), log
    return refused


def test_a_full_reranker_queue_is_waited_out(app):
    app.deploy(
        app.configured(
            Reranker={
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
                "user_config": {"inject_delay_ms": 1500, "max_batch_size": 1},
            }
        )
    )
    try:
        no_retry = Client(app.url, api_key=KEY, retry=RetryPolicy(attempts=1))

        def once(i: int) -> Any:
            try:
                return no_retry.rerank(f"queue probe {i} {time.time()}", DOCS)
            except Overloaded as e:
                return e

        refused = [r for r in _until_refused(once, 5) if isinstance(r, Overloaded)]
        assert refused[0].retry_after_s == 1.0 and refused[0].error_type == "overloaded"
        assert "queue is full" in str(refused[0])

        def patient(i: int) -> list:
            rec = Recording()
            c = Client(app.url, api_key=KEY, transport=rec, retry=RetryPolicy(attempts=20, deadline_s=120))
            assert len(c.rerank(f"patient {i} {time.time()}", DOCS)) == len(DOCS)
            return rec.log

        with ThreadPoolExecutor(5) as ex:
            logs = list(ex.map(patient, range(5)))
        assert _waited_out(logs) >= 1, logs  # some were refused, and every one of them got its answer
    finally:
        app.deploy(app.config)


def test_a_full_ingress_queue_is_waited_out(app):
    """Ray Serve's proxy refuses with its own plain-text 503 + Retry-After: 1 (the client maps it by status)."""
    app.deploy(
        app.configured(
            Ingress={"max_ongoing_requests": 1, "max_queued_requests": 1},
            Reranker={"user_config": {"inject_delay_ms": 1000}},
        )
    )
    try:
        no_retry = Client(app.url, api_key=KEY, retry=RetryPolicy(attempts=1))

        def once(i: int) -> Any:
            try:
                return no_retry.search(f"ingress probe {i} {time.time()}", fetch_k=5, top_k=2)
            except Overloaded as e:
                return e

        refused = [r for r in _until_refused(once, 5) if isinstance(r, Overloaded)]
        assert refused[0].retry_after_s == 1.0 and refused[0].status_code == 503

        def patient(i: int) -> list:
            rec = Recording()
            c = Client(app.url, api_key=KEY, transport=rec, retry=RetryPolicy(attempts=20, deadline_s=120))
            assert c.search(f"patient {i} {time.time()}", fetch_k=5, top_k=2).reranker.reranked
            return rec.log

        with ThreadPoolExecutor(4) as ex:
            logs = list(ex.map(patient, range(4)))
        assert _waited_out(logs) >= 1, logs
    finally:
        app.deploy(app.config)


# --------------------------------------------------------------------------------------------------
# the retrievers, for real
# --------------------------------------------------------------------------------------------------
def test_langchain_retriever(app, client, coll):
    from langchain_core.documents import Document

    from rag.integrations.langchain import LangChainRetriever

    q = QUERIES[4]
    expected = client.retrieve_and_rerank(q, fetch_k=FETCH_K, top_k=TOP_K, collection=coll)
    r = LangChainRetriever(url=app.url, api_key=KEY, fetch_k=FETCH_K, top_k=TOP_K, collection=coll)

    async def ainvoke() -> list[Document]:  # an AsyncClient's connections belong to one event loop
        try:
            return await r.ainvoke(q)
        finally:
            await r.aclose()

    for docs in (r.invoke(q), run(ainvoke())):
        assert all(isinstance(d, Document) for d in docs)
        assert [d.page_content for d in docs] == [h["content"] for h in expected]
        assert [d.id for d in docs] == [h["id"] for h in expected]
        for d, h in zip(docs, expected, strict=True):
            assert d.metadata == {k: v for k, v in h.items() if k != "content"}
            assert {k: d.metadata[k] for k in ("id", "source", "score", "dense_score", "chunk_index")} == {
                k: h[k] for k in ("id", "source", "score", "dense_score", "chunk_index")
            }
    source = expected[0]["source"]
    narrowed = LangChainRetriever(client=client, filter={"source": source}, budget_ms=1, top_k=3).invoke(q)
    assert narrowed and {d.metadata["source"] for d in narrowed} == {source}
    assert all(d.metadata["score"] == d.metadata["dense_score"] for d in narrowed)  # the budget went through
    with pytest.raises(CollectionError):
        LangChainRetriever(client=client, collection="nope_" + "z" * 8).invoke(q)


def test_llamaindex_retriever(app, client, coll):
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

    from rag.integrations.llamaindex import LlamaIndexRetriever

    q = QUERIES[5]
    expected = client.retrieve_and_rerank(q, fetch_k=FETCH_K, top_k=TOP_K, collection=coll)
    r = LlamaIndexRetriever(app.url, api_key=KEY, fetch_k=FETCH_K, top_k=TOP_K, collection=coll)

    async def aretrieve() -> list[NodeWithScore]:
        try:
            return await r.aretrieve(QueryBundle(q))
        finally:
            await r.aclose()

    for nodes in (r.retrieve(q), run(aretrieve())):
        assert all(isinstance(n, NodeWithScore) for n in nodes)
        assert [n.score for n in nodes] == [h["score"] for h in expected]
        assert [n.node.node_id for n in nodes] == [h["id"] for h in expected]
        assert [n.node.get_content() for n in nodes] == [h["content"] for h in expected]
        assert [n.node.ref_doc_id for n in nodes] == [h["doc_id"] for h in expected]
        assert nodes[0].node.metadata["dense_score"] == expected[0]["dense_score"]
        llm_view = nodes[0].node.get_content(MetadataMode.LLM)
        assert expected[0]["source"] in llm_view and "dense_score" not in llm_view
    dense = LlamaIndexRetriever(client=client, rerank=False, top_k=4).retrieve(q)
    assert [n.score for n in dense] == [n.node.metadata["dense_score"] for n in dense] and len(dense) == 4


# --------------------------------------------------------------------------------------------------
# last: the app without API keys
# --------------------------------------------------------------------------------------------------
def test_auth_off(app):
    cfg = copy.deepcopy(app.config)
    cfg["applications"][0]["args"].pop("api_keys")
    app.deploy(cfg)
    wait_ready(app.url)
    deadline = time.monotonic() + 60
    while True:  # the new Ingress replica serves once it is up; the old one wants a key until then
        try:
            hits = Client(app.url, api_key="").retrieve(QUERIES[0], k=3)
            break
        except Unauthenticated:
            assert time.monotonic() < deadline, "the app still wants a key 60 s after it was deployed without"
            time.sleep(0.5)
    assert len(hits) == 3
    assert len(Client(app.url, api_key="any-key").retrieve(QUERIES[0], k=3)) == 3  # a key is not refused
