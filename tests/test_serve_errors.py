"""The ingress without a cluster: its FastAPI app over fake DeploymentHandles.

Covers every row of deployments.ingress.ERROR_TABLE (including the ones a healthy live app cannot show: database
down, bugs, timeouts), the conversion of Ray's own failures (BackPressureError, RayTaskError, dead replicas),
the latency budget, degradation and strict mode, and readiness. Fast: no Ray cluster, no models.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deployments._service import SearchService
from deployments.ingress import ERROR_TABLE, create_app
from rag.errors import ConfigError, ModelError, RerankerError, StoreUnavailable
from rag.settings import SearchConfig, StoreConfig

INFO = {"backend": "cross-encoder", "model": "m", "device": "cpu", "dtype": "float32", "trained": False}


class FakeResponse:
    """Awaitable like a DeploymentResponse, with cancel()."""

    def __init__(self, coro: Any) -> None:
        self.coro, self.cancelled = coro, False

    def __await__(self):
        return self.coro.__await__()

    def cancel(self) -> None:
        self.cancelled = True


class FakeMethod:
    def __init__(self, fn: Any) -> None:
        self.fn, self.calls = fn, 0

    def remote(self, *args: Any, **kw: Any) -> FakeResponse:
        self.calls += 1
        self.last = FakeResponse(self.fn(*args, **kw))
        return self.last


class FakeHandle:
    def __init__(self, **methods: Any) -> None:
        for name, fn in methods.items():
            setattr(self, name, FakeMethod(fn))


def candidates(k: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"c{i}",
            "doc_id": f"d{i}",
            "source": "s",
            "chunk_index": 0,
            "content": f"document {i}",
            "metadata": {},
            "dense_score": 1 - i / 100,
        }
        for i in range(k)
    ]


async def _embed(q: str) -> np.ndarray:
    return np.ones(4, dtype=np.float32)


async def _embed_many(texts: list[str]) -> list[np.ndarray]:
    return [np.ones(4, dtype=np.float32) for _ in texts]


async def _search(
    collection: str, vec: Any, k: int, filter: Any = None, *, query: str | None = None, mode: str = "dense"
) -> list[dict]:
    return candidates(k)  # the Retriever's signature; every mode answers the same fake rows


async def _rerank(query: str, docs: list[str], deadline_s: float | None = None) -> list[float]:
    return [i / 100 for i in range(len(docs))]  # reverses the dense order


def _documents_via(rerank: Any):
    """The rerank routes' call (Reranker.rerank_documents) over a fake ``rerank``: one window per document."""

    from rag.rerank_engine import RerankResult, RerankTimings, RerankUsage

    async def fn(query: str, docs: list[str], deadline_s: float | None = None, **kw: Any) -> RerankResult:
        scores = await rerank(query, docs, deadline_s=deadline_s)
        n = len(docs)
        return RerankResult(
            scores, [None] * n, [1] * n, RerankUsage(n, 3 * n), RerankTimings(0.5, 1.0, 2.0), 0
        )

    return fn


async def _info() -> dict:
    return dict(INFO)


async def _ok() -> dict:
    return {}


def make(
    embedder: dict | None = None, retriever: dict | None = None, reranker: dict | None = None, **args: Any
) -> tuple[TestClient, SearchService]:
    e = {"embed": _embed, "embed_many": _embed_many, "ready": _ok, **(embedder or {})}
    r = {"search": _search, "ready": _ok, **(retriever or {})}
    rr = {"rerank": _rerank, "info": _info, "ready": _ok, **(reranker or {})}
    rr.setdefault("rerank_documents", _documents_via(rr["rerank"]))
    args = {
        "fetch_k": 20,
        "top_k": 5,
        "max_documents": 10,
        "max_body_bytes": 4096,
        "max_query_chars": 100,
        **args,
    }
    svc = SearchService(FakeHandle(**e), FakeHandle(**r), FakeHandle(**rr), SearchConfig(**args))
    return TestClient(create_app(svc), raise_server_exceptions=False), svc


def raising(exc: BaseException):
    async def fn(*a: Any, **k: Any) -> Any:
        raise exc

    return fn


def sleeping(s: float, then: Any = None):
    async def fn(*a: Any, **k: Any) -> Any:
        await asyncio.sleep(s)
        return then(*a) if callable(then) else then

    return fn


def check_error(r, status: int, error_type: str, retry_after: bool = False) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"}, body
    assert body["error_type"] == error_type and body["error"]
    assert ("retry-after" in r.headers) is retry_after
    return body


# --------------------------------------------------------------------------------------------------
# every row of the error table
# --------------------------------------------------------------------------------------------------
def test_table_rows_are_the_documented_ones():
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from rag.errors import (
        InvalidInput,
        Overloaded,
        Retryable,
        StageTimeout,
        StageUnavailable,
        Unauthenticated,
    )

    assert all(issubclass(c, Retryable) for c in (Overloaded, StageTimeout, StageUnavailable))
    rows = [(cls, status, retry) for cls, status, retry in ERROR_TABLE]
    assert rows == [
        (Unauthenticated, 401, False),
        (RequestValidationError, 422, False),
        (InvalidInput, 422, False),
        (Retryable, 503, True),
        (StoreUnavailable, 503, True),
        (ModelError, 503, True),
        (ConfigError, 500, False),
        (HTTPException, None, False),
        (Exception, 500, False),
    ]


def test_row_request_validation_error_is_422():
    c, _ = make()
    body = check_error(c.post("/v2/rerank", json={"query": "q", "documents": ["a", 1]}), 422, "invalid_input")
    assert "documents.1" in body["error"]  # neither a string nor a {text} object
    body = check_error(  # an object without a string text: InvalidInput, same 422
        c.post("/v2/rerank", json={"query": "q", "documents": ["a", {"x": 1}]}), 422, "invalid_input"
    )
    assert "documents[1]" in body["error"] and "'text'" in body["error"]
    check_error(c.post("/search", json={"query": "q", "unknown_field": 1}), 422, "invalid_input")
    check_error(
        c.post("/search", content=b"{not json", headers={"content-type": "application/json"}),
        422,
        "invalid_input",
    )


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/search", {"query": ""}, "non-empty"),
        ("/search", {"query": "q", "top_k": 30}, "top_k=30 is larger than fetch_k=20"),
        ("/search", {"query": "q", "fetch_k": 0}, "fetch_k"),
        ("/search", {"query": "q" * 101}, "characters"),
        ("/v2/rerank", {"query": "q", "documents": ["a"] * 11}, "at most 10"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": 11}, "top_n"),
        ("/rerank", {"query": "q", "texts": []}, "at least one"),
        ("/embed", {"inputs": []}, "at least one"),
    ],
)
def test_row_invalid_input_is_422(path, body, words):
    c, _ = make()
    assert words in check_error(c.post(path, json=body), 422, "invalid_input")["error"]


def test_oversize_body_is_422_with_and_without_content_length():
    c, _ = make()
    check_error(c.post("/v2/rerank", json={"query": "q", "documents": ["x" * 5000]}), 422, "body_too_large")

    def chunks():  # no content-length: counted while reading
        yield b'{"query": "q", "documents": ["'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"]}'

    r = c.post("/v2/rerank", content=chunks(), headers={"content-type": "application/json"})
    check_error(r, 422, "body_too_large")


def test_row_overloaded_backpressure_is_503_with_retry_after():
    from ray.serve.exceptions import BackPressureError

    exc = BackPressureError(num_queued_requests=5, max_queued_requests=5, retry_after_s=2)
    c, _ = make(reranker={"rerank": raising(exc)})
    r = c.post("/v2/rerank", json={"query": "q", "documents": ["a"]})
    body = check_error(r, 503, "overloaded", retry_after=True)
    assert r.headers["retry-after"] == "2" and "queue is full" in body["error"]
    # the embedder's queue full fails /search the same way (no dense order without stage 1)
    c, _ = make(embedder={"embed": raising(exc)})
    check_error(c.post("/search", json={"query": "q"}), 503, "overloaded", retry_after=True)


def test_row_overloaded_timeout_is_503_and_cancels():
    c, svc = make(retriever={"search": sleeping(5, lambda *a: [])}, retrieve_timeout_s=0.2)
    body = check_error(c.post("/search", json={"query": "q"}), 503, "timeout", retry_after=True)
    assert "within 0.2s" in body["error"]
    assert svc.retriever.search.last.cancelled  # the request is cancelled, not left running


def test_row_overloaded_dead_replica_is_503():
    from ray.exceptions import RayActorError

    c, _ = make(embedder={"embed": raising(RayActorError())})
    check_error(c.post("/search", json={"query": "q"}), 503, "unavailable", retry_after=True)


def test_row_store_unavailable_is_503_through_ray_task_error():
    from ray.exceptions import RayTaskError

    cause = StoreUnavailable("cannot reach PostgreSQL at postgresql://x:***@db/rag: connection refused")
    wrapped = RayTaskError("search", "Traceback ...", cause).as_instanceof_cause()
    c, _ = make(retriever={"search": raising(wrapped)})
    body = check_error(c.post("/search", json={"query": "q"}), 503, "store_unavailable", retry_after=True)
    assert body["error"] == str(cause)  # the replica's message, not Ray's traceback


def test_row_model_error_is_503():
    c, _ = make(reranker={"rerank": raising(RerankerError("forward pass failed: CUDA out of memory"))})
    body = check_error(
        c.post("/rerank", json={"query": "q", "texts": ["a"]}), 503, "reranker_error", retry_after=True
    )
    assert "out of memory" in body["error"]


def test_row_config_error_is_500():
    c, _ = make(reranker={"rerank": raising(ConfigError("the cohere reranker needs an API key"))})
    check_error(c.post("/v2/rerank", json={"query": "q", "documents": ["a"]}), 500, "config_error")


def test_row_http_exception_keeps_its_status():
    c, _ = make()
    check_error(c.get("/nope"), 404, "not_found")
    check_error(c.get("/search"), 405, "method_not_allowed")


def test_row_bug_is_500_without_internals():
    c, _ = make(retriever={"search": raising(KeyError("secret internal detail"))})
    body = check_error(c.post("/search", json={"query": "q"}), 500, "internal_error")
    assert "secret" not in body["error"] and "bug" in body["error"]


# --------------------------------------------------------------------------------------------------
# degradation, strict mode, budget
# --------------------------------------------------------------------------------------------------
def test_reranker_failure_degrades_to_dense_order():
    c, _ = make(reranker={"rerank": raising(RerankerError("boom"))})
    body = c.post("/search", json={"query": "q"}).json()
    assert body["reranker"]["reranked"] is False and body["reranker"]["reason"] == "reranker_error"
    assert [h["id"] for h in body["results"]] == [f"c{i}" for i in range(5)]
    assert "boom" in body["reranker"]["detail"]


def test_reranker_bug_or_timeout_also_degrades():
    c, _ = make(reranker={"rerank": raising(ZeroDivisionError())})
    assert c.post("/search", json={"query": "q"}).json()["reranker"]["reason"] == "reranker_error"
    c, _ = make(reranker={"rerank": sleeping(5)}, rerank_timeout_s=0.2)
    body = c.post("/search", json={"query": "q"}).json()
    assert body["reranker"]["reason"] == "reranker_error" and "timeout" in body["reranker"]["detail"].lower()


def test_an_overloaded_reranker_is_skipped_at_once_with_its_reason():
    from rag.errors import Overloaded

    seen: dict[str, Any] = {}

    async def busy(query: str, docs: list[str], deadline_s: float | None = None) -> list[float]:
        seen["deadline_s"] = deadline_s
        raise Overloaded("the reranker is busy: this request would finish in about 41.0s")

    c, _ = make(reranker={"rerank": busy}, rerank_timeout_s=7)
    body = c.post("/search", json={"query": "q"}).json()
    assert seen["deadline_s"] == 7  # the reranker is told how long the ingress will wait
    assert body["reranker"]["reranked"] is False and body["reranker"]["reason"] == "overloaded"
    assert "41.0s" in body["reranker"]["detail"]
    assert [h["id"] for h in body["results"]] == [f"c{i}" for i in range(5)]  # dense order
    # /v2/rerank has no dense order to fall back on: 503 with Retry-After
    check_error(
        c.post("/v2/rerank", json={"query": "q", "documents": ["a"]}), 503, "overloaded", retry_after=True
    )


def test_a_replicas_overloaded_keeps_its_retry_after_through_ray():
    from ray.exceptions import RayTaskError

    from rag.errors import Overloaded

    cause = pickle.loads(
        pickle.dumps(Overloaded("the reranker is busy", retry_after_s=7.5))
    )  # across processes
    assert cause.retry_after_s == 7.5 and str(cause) == "the reranker is busy"
    wrapped = RayTaskError("rerank", "Traceback ...", cause).as_instanceof_cause()
    c, _ = make(reranker={"rerank": raising(wrapped)})
    r = c.post("/v2/rerank", json={"query": "q", "documents": ["a"]})
    check_error(r, 503, "overloaded", retry_after=True)
    assert r.headers["retry-after"] == "8"


def test_admission_estimate():
    from rag.rerank_schedule import admission_wait_s

    assert admission_wait_s(0, 100, 46.0) is None  # idle: always admitted
    assert admission_wait_s(500, 100, None) is None  # nothing measured yet
    assert admission_wait_s(1300, 100, 46.0) == pytest.approx(1400 / 46)  # > 30 s: refused at a 30 s deadline
    assert admission_wait_s(200, 100, 46.0) == pytest.approx(300 / 46)


def test_strict_rerank_fails_instead():
    c, _ = make(reranker={"rerank": raising(RerankerError("boom"))}, strict_rerank=True)
    check_error(c.post("/search", json={"query": "q"}), 503, "reranker_error", retry_after=True)


def test_reranking_disabled_is_reported():
    async def info():
        return {"backend": "none", "model": None, "device": None, "dtype": None, "trained": None}

    c, svc = make(reranker={"info": info})
    body = c.post("/search", json={"query": "q"}).json()
    assert body["reranker"]["reason"] == "disabled" and svc.reranker.rerank.calls == 0


def test_budget_skips_rerank_when_the_estimate_does_not_fit():
    c, svc = make(reranker={"rerank": sleeping(0.3, lambda q, docs: [0.0] * len(docs))})
    body = c.post("/search", json={"query": "q", "budget_ms": 10_000}).json()
    assert body["reranker"]["reranked"] is True  # no estimate yet: try, with the budget as timeout
    assert svc.latency.estimate_ms(20) >= 250
    body = c.post("/search", json={"query": "q", "budget_ms": 150}).json()
    assert body["reranker"] == {
        **INFO,
        "reranked": False,
        "reason": "budget",
        "detail": body["reranker"]["detail"],
    }
    assert svc.reranker.rerank.calls == 1  # skipped without calling the reranker
    assert [h["score"] for h in body["results"]] == [h["dense_score"] for h in body["results"]]


def test_budget_bounds_the_wait_for_the_reranker():
    c, _ = make(reranker={"rerank": sleeping(2, lambda q, docs: [0.0] * len(docs))})
    body = c.post("/search", json={"query": "q", "budget_ms": 200}).json()
    assert body["reranker"]["reason"] == "budget" and body["timings_ms"]["total"] < 1500


def test_default_budget_comes_from_settings():
    c, _ = make(budget_ms=0.001)
    assert c.post("/search", json={"query": "q"}).json()["reranker"]["reason"] == "budget"


# --------------------------------------------------------------------------------------------------
# readiness, stream, shapes
# --------------------------------------------------------------------------------------------------
def test_readyz_503_until_every_part_answers():
    state = {"loaded": False}

    async def reranker_ready():
        if not state["loaded"]:
            await asyncio.sleep(10)  # a replica still loading its model does not answer
        return dict(INFO)

    c, _ = make(reranker={"ready": reranker_ready}, ready_timeout_s=0.2)
    r = c.get("/readyz")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    body = r.json()
    assert body["error_type"] == "not_ready" and "reranker" in body["error"]
    assert body["embedder"]["ready"] and body["database"]["ready"] and not body["reranker"]["ready"]
    state["loaded"] = True
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True


def test_readyz_names_the_unreachable_database():
    c, _ = make(retriever={"ready": raising(StoreUnavailable("cannot reach PostgreSQL at db:5432"))})
    r = c.get("/readyz")
    assert r.status_code == 503 and "database: cannot reach PostgreSQL" in r.json()["error"]


def test_healthz_needs_nothing():
    c, _ = make(embedder={"ready": raising(RuntimeError())})
    assert c.get("/healthz").json() == {"status": "ok"}


def test_stream_events_in_order_and_strict_error_in_band():
    c, _ = make()
    text = c.post("/search/stream", json={"query": "q"}).text
    events = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
    assert events == ["dense", "reranked", "done"]
    c, _ = make(reranker={"rerank": raising(RerankerError("boom"))}, strict_rerank=True)
    text = c.post("/search/stream", json={"query": "q"}).text
    assert [ln for ln in text.splitlines() if ln.startswith("event: ")] == ["event: dense", "event: error"]
    # stage-1 errors come before the stream starts: a real status
    c, _ = make(retriever={"search": raising(StoreUnavailable("down"))})
    assert c.post("/search/stream", json={"query": "q"}).status_code == 503


def test_cohere_and_tei_shapes():
    c, _ = make()
    body = c.post(
        "/v2/rerank", json={"model": "rerank-v3.5", "query": "q", "documents": ["a", "b", "c"], "top_n": 5}
    ).json()
    assert [r["index"] for r in body["results"]] == [2, 1, 0]  # top_n above len(documents) is clamped
    assert body["id"] and body["meta"]["api_version"]["version"] == "2"
    v1 = c.post(
        "/v1/rerank", json={"query": "q", "documents": [{"text": "a"}, "b"], "return_documents": True}
    )
    assert v1.json()["results"][0] == {"index": 1, "relevance_score": 0.01, "document": {"text": "b"}}
    tei = c.post("/rerank", json={"query": "q", "texts": ["a", "b"], "return_text": True}).json()
    assert tei == [{"index": 1, "score": 0.01, "text": "b"}, {"index": 0, "score": 0.0, "text": "a"}]


def test_batch_cost_bounds_requests_and_pairs():
    from rag.rerank_schedule import Item as _Item
    from rag.rerank_schedule import batch_cost as _batch_cost

    def items(*sizes: int) -> list:
        return [_Item("q", ("d",) * n, request_cap=4, pair_cap=100, enqueued_at=0.0) for n in sizes]

    assert _batch_cost(items(10)) == 1
    assert _batch_cost(items(10, 10, 10, 10)) == 4  # 4 requests, 40 pairs: fits
    assert _batch_cost(items(1, 1, 1, 1, 1)) == 5  # too many requests
    assert _batch_cost(items(100)) == 4  # exactly the pair cap fits
    assert _batch_cost(items(60, 41)) == 5  # 101 pairs: too many


def test_retriever_replica_starts_without_database_and_reports_it():
    """The real Retriever class (no Serve): a dead database -> StoreUnavailable per call, not a failed start."""
    from deployments.retriever import Retriever

    cls = Retriever.func_or_class
    args = StoreConfig(database_url="postgresql://nobody@127.0.0.1:1/rag", connect_timeout_s=1)

    async def run() -> None:
        r = cls.__new__(cls)
        await r.__init__(args)  # what Serve does with an async constructor; must not raise
        with pytest.raises(StoreUnavailable, match="cannot reach PostgreSQL"):
            await r.ready()
        with pytest.raises(StoreUnavailable):
            await r.search("default", np.ones(4, dtype=np.float32), 5)
        assert r.__del__() is None  # no pool was ever opened

    asyncio.run(run())


# --------------------------------------------------------------------------------------------------
# API keys (RAG_API_KEYS)
# --------------------------------------------------------------------------------------------------
def test_api_keys_guard_every_route_but_the_probes():
    client, _ = make(api_keys="key-one, key-two")
    for path in ("/healthz", "/readyz"):
        assert client.get(path).status_code == 200, path  # probes stay open
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic a2V5LW9uZQ=="}):
        r = client.post("/search", json={"query": "q"}, headers=headers)
        body = check_error(r, 401, "unauthenticated")
        assert "RAG_API_KEYS" in body["error"] and r.headers["www-authenticate"].startswith("Bearer")
        assert "key-one" not in r.text
    for path in ("/info", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 401, path
    ok = {"Authorization": "Bearer key-two"}
    assert client.post("/search", json={"query": "q"}, headers=ok).status_code == 200
    assert (
        client.post("/search", json={"query": "q"}, headers={"authorization": "bearer key-one"}).status_code
        == 200
    )
    assert client.get("/openapi.json", headers=ok).status_code == 200


def test_the_real_cohere_client_sends_its_key_as_bearer():
    import cohere

    client, _ = make(api_keys="co-key")
    good = cohere.ClientV2(api_key="co-key", base_url="http://testserver", httpx_client=client)
    res = good.rerank(model="m", query="capital of France?", documents=["Paris", "Berlin"], top_n=2)
    assert sorted(r.index for r in res.results) == [0, 1]
    bad = cohere.ClientV2(api_key="wrong", base_url="http://testserver", httpx_client=client)
    with pytest.raises(Exception) as e:
        bad.rerank(model="m", query="q", documents=["a"])
    assert getattr(e.value, "status_code", None) == 401


def test_no_keys_means_open_and_the_start_up_line_says_so():
    from deployments.api.auth import auth_line, key_matches
    from rag.settings import Settings

    client, _ = make()
    assert client.post("/search", json={"query": "q"}).status_code == 200
    assert "OFF" in auth_line(Settings().slice("search"))
    assert "on (2 API keys" in auth_line(Settings(api_keys="a,b").slice("search"))
    assert key_matches("b", ["a", "b"]) and not key_matches("c", ["a", "b"]) and not key_matches(None, ["a"])


def test_retriever_readiness_says_database_unreachable_when_it_hangs():
    """A database that accepts TCP but never answers: ready() names it within 1.5 s, not a stage timeout."""
    import socket
    import time

    from deployments.retriever import READY_PING_S, Retriever

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)  # never accepted: the handshake hangs
        port = srv.getsockname()[1]
        cls = Retriever.func_or_class
        cfg = StoreConfig(database_url=f"postgresql://u:pw@127.0.0.1:{port}/rag", connect_timeout_s=10)

        async def run() -> float:
            r = cls.__new__(cls)  # the constructor would wait the pool's timeout: set its state directly
            r.config, r._store, r._lock, r._last_error = cfg, None, asyncio.Lock(), None
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="database unreachable") as e:
                await r.ready()
            assert "pw" not in str(e.value)
            return time.monotonic() - t0

        assert asyncio.run(run()) < READY_PING_S + 1.0
