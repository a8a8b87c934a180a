"""rag.client without a service: the retry policy (driven step by step on a fake clock), the error table
(every rag.errors type through the ingress's own error_response and back), Retry-After, and the clients'
requests and answers over httpx.MockTransport. Fast; the live app is tests/test_client.py's."""

from __future__ import annotations

import asyncio
import email.utils
import json
from typing import Any

import httpx
import pytest

from rag import errors
from rag.client import AsyncClient, Client, RetryPolicy
from rag.client._errors import ERROR_TYPES, error_for_body, error_for_response, error_for_transport
from rag.client._retry import Call, Send, Sleep, exchange, retry_after_s
from rag.errors import (
    InvalidInput,
    Overloaded,
    RagError,
    Retryable,
    ServiceError,
    StageTimeout,
    StageUnavailable,
    Unauthenticated,
)

URL = "http://rag.test"


# --------------------------------------------------------------------------------------------------
# the policy, step by step
# --------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def answer(status: int, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    if body is None and status >= 400:
        body = {"error": f"status {status}", "error_type": "overloaded" if status in (429, 503) else "x"}
    return httpx.Response(status, json=body, headers=headers)


def drive(call: Call, policy: RetryPolicy, replies: list[Any], *, timeout_s: float = 30.0, top: bool = True):
    """Run ``exchange`` against ``replies`` (responses, or transport errors to throw in). Sleeps advance the
    fake clock. Returns (the result or the raised error, the steps it yielded)."""
    clock = Clock()
    uniform = (lambda a, b: b) if top else (lambda a, b: a)  # the jitter's top or bottom
    gen = exchange(call, policy, timeout_s, base_url=URL, uniform=uniform, clock=clock, wall=lambda: 0.0)
    steps: list[Send | Sleep] = []
    feed = iter(replies)
    try:
        step = next(gen)
        while True:
            steps.append(step)
            if isinstance(step, Sleep):
                clock.t += step.seconds
                step = gen.send(None)
                continue
            reply = next(feed, None)
            assert reply is not None, f"the policy tried more often than scripted: {steps}"
            step = gen.throw(reply) if isinstance(reply, Exception) else gen.send(reply)
    except StopIteration as stop:
        return stop.value, steps
    except RagError as e:
        return e, steps


SEARCH = Call("POST", "/search", {"query": "q"})
SLEEPS = lambda steps: [s.seconds for s in steps if isinstance(s, Sleep)]  # noqa: E731


def test_503_waits_its_retry_after_plus_jitter_then_succeeds():
    policy = RetryPolicy(attempts=4, backoff_s=0.5, max_backoff_s=4, deadline_s=60)
    out, steps = drive(SEARCH, policy, [answer(503, headers={"Retry-After": "2"}), answer(200, {"ok": 1})])
    assert out.status_code == 200
    assert SLEEPS(steps) == [2.5]  # Retry-After 2 + the first jitter bound (0.5)
    _, steps = drive(SEARCH, policy, [answer(503, headers={"Retry-After": "2"}), answer(200)], top=False)
    assert SLEEPS(steps) == [2.0]  # never less than Retry-After


def test_429_without_retry_after_backs_off_exponentially_up_to_the_cap():
    policy = RetryPolicy(attempts=6, backoff_s=0.5, max_backoff_s=3, deadline_s=None)
    out, steps = drive(SEARCH, policy, [answer(429)] * 5 + [answer(200)])
    assert out.status_code == 200
    assert SLEEPS(steps) == [0.5, 1.0, 2.0, 3.0, 3.0]  # the bounds of the full jitter: doubling, capped


def test_attempts_bound_the_tries_and_the_last_error_is_raised():
    out, steps = drive(SEARCH, RetryPolicy(attempts=3, backoff_s=0.01), [answer(503)] * 3)
    assert isinstance(out, Overloaded) and out.status_code == 503
    assert sum(isinstance(s, Send) for s in steps) == 3 and len(SLEEPS(steps)) == 2


def test_no_wait_is_started_that_would_end_past_the_deadline():
    policy = RetryPolicy(attempts=10, backoff_s=0.1, deadline_s=10)
    out, steps = drive(SEARCH, policy, [answer(503, headers={"Retry-After": "30"})])
    assert isinstance(out, Overloaded) and SLEEPS(steps) == []  # raised at once, not after 30 s
    # each try's timeout is what is left of the deadline when that is less than the client's
    out, steps = drive(SEARCH, policy, [answer(503, headers={"Retry-After": "5"})] * 2, timeout_s=30)
    sends = [s.timeout_s for s in steps if isinstance(s, Send)]
    assert sends[0] == pytest.approx(10) and sends[1] == pytest.approx(10 - 5.1)
    assert isinstance(out, Overloaded) and len(sends) == 2  # a third try could not start in time


@pytest.mark.parametrize(
    "call",
    [Call("POST", "/ingest", {"x": 1}, idempotent=False), Call("GET", "/readyz", retry=False)],
    ids=["not-idempotent", "probe"],
)
def test_only_idempotent_calls_that_want_it_are_retried(call):
    out, steps = drive(call, RetryPolicy(attempts=5), [answer(503)])
    assert isinstance(out, Overloaded) and SLEEPS(steps) == []


def test_other_errors_are_not_retried():
    for status, body, cls in [
        (422, {"error": "top_k must be <= fetch_k", "error_type": "invalid_input"}, InvalidInput),
        (401, {"error": "missing key", "error_type": "unauthenticated"}, Unauthenticated),
        (500, {"error": "internal error (KeyError)", "error_type": "internal_error"}, ServiceError),
    ]:
        out, steps = drive(SEARCH, RetryPolicy(attempts=5), [answer(status, body)])
        assert type(out) is cls and out.status_code == status and SLEEPS(steps) == []


def test_transport_errors_retry_only_when_nothing_was_answered():
    req = httpx.Request("POST", URL + "/search")
    refused = httpx.ConnectError("connection refused", request=req)
    out, steps = drive(SEARCH, RetryPolicy(attempts=3, backoff_s=0.01), [refused, answer(200)])
    assert out.status_code == 200 and len(SLEEPS(steps)) == 1
    out, _ = drive(SEARCH, RetryPolicy(attempts=3, backoff_s=0.01), [refused] * 3)
    assert isinstance(out, StageUnavailable) and "cannot connect" in str(out) and URL in str(out)
    assert isinstance(out.__cause__, httpx.ConnectError)
    slow = httpx.ReadTimeout("timed out", request=req)  # the service may still be computing it: no 2nd copy
    out, steps = drive(SEARCH, RetryPolicy(attempts=3), [slow], timeout_s=7)
    assert isinstance(out, StageTimeout) and "7s" in str(out) and SLEEPS(steps) == []


def test_answers_listed_by_the_call_are_returned_not_raised():
    probe = Call("GET", "/readyz", retry=False, answers=frozenset({503}))
    out, _ = drive(probe, RetryPolicy(), [answer(503, {"error": "not ready", "error_type": "not_ready"})])
    assert out.status_code == 503


def test_retry_after_forms():
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after": " 1.5 "}) == 1.5
    assert retry_after_s({}) is None and retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({"retry-after": "-4"}) == 0.0 and retry_after_s({"retry-after": "nan"}) is None
    date = email.utils.formatdate(1_000_030, usegmt=True)  # an HTTP date, 30 s after "now"
    assert retry_after_s({"retry-after": date}, now=1_000_000) == pytest.approx(30)


def test_policy_rejects_nonsense():
    for kw in ({"attempts": 0}, {"backoff_s": -1}, {"deadline_s": 0}):
        with pytest.raises(InvalidInput):
            RetryPolicy(**kw)


# --------------------------------------------------------------------------------------------------
# the error table: derived from rag.errors, and the inverse of the ingress's
# --------------------------------------------------------------------------------------------------
def _error_classes() -> list[type[RagError]]:
    return [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, RagError)]


def test_every_error_type_maps_back_to_its_class_or_a_subclass_sharing_its_kind():
    for cls in _error_classes():
        err = error_for_body(422, {"error": "m", "error_type": cls.error_type})
        assert isinstance(err, RagError) and err.error_type == cls.error_type
        assert type(err) is cls or issubclass(type(err), cls), (cls, type(err))
    assert ERROR_TYPES["unavailable"] is StageUnavailable  # the subclass wins over Retryable
    assert set(ERROR_TYPES) == {c.error_type for c in _error_classes()}


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_the_ingress_error_answers_come_back_as_the_same_exception(cls):
    from deployments.ingress import error_response

    original = cls("what to fix", 3.0) if issubclass(cls, Retryable) else cls("what to fix")
    resp = error_response(original)
    err = error_for_response(resp.status_code, resp.headers, bytes(resp.body), retry_after_s(resp.headers))
    expected = ERROR_TYPES[cls.error_type]  # Retryable itself answers as its kind's class
    assert type(err) is expected and err.status_code == resp.status_code
    assert str(err).startswith("what to fix")
    if issubclass(cls, Retryable):
        assert err.retry_after_s == 3.0


def test_answers_without_our_body_fall_back_on_their_status():
    plain = error_for_response(503, {"retry-after": "1"}, b"Service Unavailable", 1.0)  # Ray's proxy
    assert type(plain) is Overloaded and plain.retry_after_s == 1.0 and "Service Unavailable" in str(plain)
    assert type(error_for_response(401, {}, b"")) is Unauthenticated
    page = error_for_response(502, {}, b"<html>Bad Gateway</html>")
    assert type(page) is ServiceError and page.status_code == 502 and "Bad Gateway" in str(page)
    nf = error_for_body(404, {"error": "Not Found", "error_type": "not_found"})
    assert type(nf) is ServiceError and nf.error_type == "not_found"
    key = error_for_body(401, {"error": "missing or unknown API key", "error_type": "unauthenticated"})
    assert "RAG_API_KEY" in str(key)  # says how to give the client a key


def test_transport_error_kinds():
    req = httpx.Request("GET", URL)
    assert type(error_for_transport(httpx.ConnectTimeout("t", request=req), URL, 5)) is StageUnavailable
    assert type(error_for_transport(httpx.PoolTimeout("t", request=req), URL, 5)) is StageTimeout
    gone = error_for_transport(httpx.RemoteProtocolError("closed", request=req), URL, 5)
    assert type(gone) is StageUnavailable and "failed" in str(gone)


# --------------------------------------------------------------------------------------------------
# the clients over a MockTransport: requests as sent, answers as read, the drivers
# --------------------------------------------------------------------------------------------------
HIT = {"id": "a#0", "doc_id": "a", "source": "a.py:1", "content": "text", "score": 0.9, "dense_score": 0.5,
       "chunk_index": 0, "metadata": {}}  # fmt: skip
ANSWER = {"query": "q", "collection": "default", "candidates": 3, "results": [HIT],
          "timings_ms": {"embed": 1.0, "retrieve": 2.0, "rerank": 3.0, "total": 6.5, "strategy": "hnsw"},
          "reranker": {"model": "m", "device": "cpu", "dtype": "float32", "trained": False, "reranked": True}}  # fmt: skip


class Recorder:
    """A MockTransport handler: answers from a script, records every request."""

    def __init__(self, *replies: httpx.Response) -> None:
        self.replies, self.requests = list(replies), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests]


def test_search_sends_only_what_the_caller_set_and_reads_a_typed_answer():
    rec = Recorder(httpx.Response(200, json=ANSWER))
    with Client(URL, api_key="k1", transport=httpx.MockTransport(rec)) as c:
        ans = c.search("q")
        assert ans.results == [HIT] and ans.reranker.reranked is True and ans.timings_ms["strategy"] == "hnsw"
        c.search("q", fetch_k=50, top_k=4, rerank=False, budget_ms=200, collection="docs",
                 filter={"source": {"prefix": "a"}}, mode="hybrid")  # fmt: skip
        assert c.retrieve_and_rerank("q") == [HIT]
        assert c.retrieve("q", k=3) == [HIT]
    first, full, rr, dense = rec.bodies()
    assert first == {"query": "q", "rerank": True}  # no mode, no defaults: the service's apply
    assert full == {"query": "q", "rerank": False, "fetch_k": 50, "top_k": 4, "budget_ms": 200,
                    "collection": "docs", "filter": {"source": {"prefix": "a"}}, "mode": "hybrid"}  # fmt: skip
    assert rr == {"query": "q", "rerank": True, "fetch_k": 100, "top_k": 8}  # the library's defaults
    assert dense == {"query": "q", "rerank": False, "fetch_k": 3, "top_k": 3}
    assert all(r.headers["authorization"] == "Bearer k1" for r in rec.requests)


def test_api_key_and_url_come_from_settings(monkeypatch):
    from rag.settings import get_settings

    monkeypatch.setenv("RAG_API_KEY", "from-env")
    monkeypatch.setenv("RAG_SERVICE_URL", URL + "/")
    get_settings.cache_clear()
    try:
        rec = Recorder(httpx.Response(200, json={"service": {}}))
        c = Client(transport=httpx.MockTransport(rec))
        c.info()
        assert c.url == URL and rec.requests[0].headers["authorization"] == "Bearer from-env"
        assert "from-env" not in repr(c)
        Client(api_key="", transport=httpx.MockTransport(rec)).info()  # "" sends none
        assert "authorization" not in rec.requests[1].headers
    finally:
        get_settings.cache_clear()
    with pytest.raises(errors.ConfigError, match="http://host:port"):
        Client("localhost:8000")


def test_the_sync_and_async_drivers_really_wait_and_retry():
    def script() -> Recorder:
        busy = httpx.Response(
            503, json={"error": "busy", "error_type": "overloaded"}, headers={"Retry-After": "0"}
        )
        return Recorder(busy, busy, httpx.Response(200, json=[[0.6, 0.8]]))

    policy = RetryPolicy(attempts=3, backoff_s=0.01)
    rec = script()
    assert Client(URL, retry=policy, transport=httpx.MockTransport(rec)).embed("x") == [[0.6, 0.8]]
    assert len(rec.requests) == 3 and rec.bodies()[0] == {"inputs": ["x"]}

    async def run() -> list[list[float]]:
        async with AsyncClient(URL, retry=policy, transport=httpx.MockTransport(arec)) as c:
            return await c.embed(["x", "y"])

    arec = script()
    assert asyncio.run(run()) == [[0.6, 0.8]] and len(arec.requests) == 3


SSE = (
    'event: dense\ndata: {"results": [], "candidates": 0, "timings_ms": {"embed": 1}}\n\n'
    ": keep-alive\n\n"
    'event: novel\ndata: {"x": 1}\n\n'
    'event: error\ndata: {"error": "reranker failed: boom", "error_type": "reranker_error"}\n\n'
)


def test_stream_events_are_typed_and_an_error_event_raises_its_type():
    rec = Recorder(httpx.Response(200, text=SSE, headers={"content-type": "text/event-stream"}))
    seen = []
    with pytest.raises(errors.RerankerError, match="boom"):
        for ev in Client(URL, transport=httpx.MockTransport(rec)).search_stream("q", mode="dense"):
            seen.append(ev)
    assert [e.event for e in seen] == ["dense"]  # the unknown event is skipped, the error raised
    assert rec.requests[0].url.path == "/search/stream" and rec.bodies()[0]["mode"] == "dense"


def test_rerank_and_ready_answers():
    rerank = {"id": "x", "results": [{"index": 1, "relevance_score": 0.9, "id": "b", "span": {"start": 0, "end": 5},
              "windows": 2}, {"index": 0, "relevance_score": 0.1}], "meta": {}}  # fmt: skip
    rec = Recorder(httpx.Response(200, json=rerank))
    out = Client(URL, transport=httpx.MockTransport(rec)).rerank(
        "q", ["a", {"id": "b", "text": "bb"}], top_n=2
    )
    assert [(r.index, r.score, r.id) for r in out] == [(1, 0.9, "b"), (0, 0.1, None)]
    assert out[0].span.end == 5 and rec.bodies()[0]["top_n"] == 2
    down = {"error": "not ready: reranker: loading", "error_type": "not_ready", "reranker": {"ready": False}}
    rec = Recorder(httpx.Response(503, json=down, headers={"Retry-After": "1"}))
    ready = Client(URL, transport=httpx.MockTransport(rec)).ready()
    assert not ready and "loading" in ready.reason and ready.components["reranker"]["ready"] is False
    assert len(rec.requests) == 1  # a probe is not retried


def test_sync_and_async_twins_and_the_retrievers_pairs():
    from rag.integrations.langchain import LangChainRetriever
    from rag.integrations.llamaindex import LlamaIndexRetriever

    policy = RetryPolicy(attempts=2)
    c = Client(URL, api_key="k", timeout_s=7, retry=policy)
    twin = c.to_async()
    assert (twin.url, twin.timeout_s, twin.retry, twin._headers) == (URL, 7, policy, c._headers)
    assert c.to_async().to_sync()._headers["authorization"] == "Bearer k"
    for r in (LangChainRetriever(client=c), LlamaIndexRetriever(client=c)):
        assert r.client is c and r.async_client.url == URL and r.async_client._headers == c._headers
    lc = LangChainRetriever(url=URL, api_key="s3cret", top_k=3)
    assert lc.client._headers["authorization"] == "Bearer s3cret" and "s3cret" not in repr(lc)


def test_the_client_is_light():
    """An application that only talks to the service loads no model library, no Ray, no database driver,
    and neither framework until its retriever is asked for."""
    import subprocess
    import sys

    code = (
        "import sys, rag.client, rag.integrations\n"
        "rag.client.Client('http://127.0.0.1:9'); rag.client.Client()\n"
        "heavy = {'torch', 'ray', 'numpy', 'psycopg', 'sentence_transformers', 'transformers', 'openvino',\n"
        "         'langchain_core', 'llama_index'}\n"
        "loaded = sorted(heavy & {m.split('.')[0] for m in sys.modules})\n"
        "assert not loaded, loaded\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
