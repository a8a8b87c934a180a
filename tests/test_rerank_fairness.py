"""Fair rerank capacity (issue 12 item 1): one large request can neither hold the Reranker past its own
deadline, nor keep computing for a caller that went away, nor keep /search from being reranked.

Two tiers. Default: the Reranker deployment class in this process (its real ``@serve.batch`` queue and the
stand-in cross-encoder): chunking, interleaving, cancellation, deadlines, the cost cap. ``serve``: a live app
(serve_config.cpu.yaml, real database): the issue's 1,000 x 1,000-character /v2/rerank, scaled down to 200 x
1,000 characters and the deadlines to 20 s so it stays affordable on 2 busy cores, sent while other clients
search; and a client that disconnects mid-rerank.

The assertions are about behaviour (who was reranked, what ran after whom, what was never computed), with
timeouts generous enough for a shared machine.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from helpers import (
    QUERIES,
    cpu_app_config,
    free_port,
    in_process_batching,
    ingest_demo,
    ray_cluster,
    wait_ready,
)

from rag.errors import InvalidInput, StageTimeout

CHUNK = 16  # rerank_chunk_pairs of the in-process tests


def _corpus_text() -> str:
    from rag.ingest import iter_demo

    return " ".join(" ".join(d.content for d in iter_demo(limit=400)).split())


def _docs(n: int, chars: int, text: str) -> list[str]:
    """``n`` distinct documents of ``chars`` characters of English-like text (~270 tokens per 1,000)."""
    long = text * (1 + (n * 997 + chars) // max(1, len(text)))
    return [f"{i}: " + long[i * 997 : i * 997 + chars] for i in range(n)]


def test_fair_pairs_ahead() -> None:
    from rag.rerank_schedule import fair_pairs_ahead

    assert fair_pairs_ahead([], 20, 128) == 0
    # a 1,000-pair request ahead costs a 20-pair request one chunk of it, not all of it
    assert fair_pairs_ahead([1000], 20, 128) == 128
    assert fair_pairs_ahead([1000, 10], 200, 128) == 256 + 10  # two rounds of each, at most
    assert fair_pairs_ahead([50], 300, 128) == 50


# --------------------------------------------------------------------------------------------------
# in process: the deployment class, its batch queue and the stand-in model
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rr(settings) -> Any:
    from ray.serve import batching

    from deployments.reranker import Reranker
    from rag.models import StandInWarning

    mp = (
        pytest.MonkeyPatch()
    )  # @serve.batch outside a replica: only its max_ongoing_requests check needs Serve
    mp.setattr(
        batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None
    )
    s = settings.with_overrides(
        rerank_dtype="float32",
        rerank_threads=1,
        rerank_cache=False,
        rerank_chunk_pairs=CHUNK,
        rerank_max_request_tokens=20_000,
    )
    with in_process_batching(Reranker.func_or_class):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StandInWarning)
            r = Reranker.func_or_class(s.slice("reranker"))
        r.reconfigure({"batch_wait_timeout_s": 0.01})
        loop = (
            asyncio.new_event_loop()
        )  # one loop: the batch queue and the gate belong to the first that runs
        r.run = loop.run_until_complete
        try:
            yield r
        finally:  # the batch queue's task waits on the loop: end it before the loop closes
            tasks = asyncio.all_tasks(loop)
            for t in tasks:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()
    mp.undo()


async def _until(pred: Any, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_a_large_request_is_interleaved_with_small_ones(rr: Any) -> None:
    big_docs = [f"document {i} about files, threads, dates and random numbers" for i in range(10 * CHUNK)]

    async def scenario() -> tuple[list[float], bool, dict[str, Any]]:
        rr.stats(reset=True)
        big = asyncio.ensure_future(rr.rerank("big request", big_docs))
        await _until(lambda: rr.stats()["batches"] >= 1)  # the big request's first chunk has run
        small = await rr.rerank("how do I parse a date", ["datetime.strptime parses a date", "gzip"], 120)
        big_running = not big.done()
        scores = await big
        return small, big_running, {**rr.stats(), "big": scores}

    small, big_running, st = rr.run(scenario())
    assert len(small) == 2 and len(st["big"]) == len(big_docs)
    assert big_running, "the small request waited for the whole large one"
    assert st["max_batch_pairs"] <= CHUNK + 2, st["recent_batches"]  # one chunk per request per batch
    assert st["pairs"] == len(big_docs) + 2 and st["pairs_dropped"] == 0


def test_a_cancelled_request_stops_at_the_next_chunk(rr: Any) -> None:
    docs = [f"passage {i} on sockets, compression and locks" for i in range(20 * CHUNK)]

    async def scenario() -> dict[str, Any]:
        rr.stats(reset=True)
        task = asyncio.ensure_future(rr.rerank("cancel me", docs))
        await _until(lambda: rr.stats()["batches"] >= 1)
        task.cancel()  # what Serve does when the HTTP client disconnects or the ingress times out
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(
            lambda: rr.engine.scheduler.running == 0
        )  # a chunk already in the model finishes; nothing after it
        await asyncio.sleep(0.3)  # a batch that would still start would do so now
        return rr.stats()

    st = rr.run(scenario())
    assert st["cancelled"] == 1 and st["active_requests"] == 0
    assert st["pairs"] <= 3 * CHUNK < len(docs), st
    # Not delivered: never scored, or (the chunk in the model at the cancel) scored for a caller that had gone.
    assert len(docs) - st["pairs"] <= st["pairs_dropped"] <= len(docs) - st["pairs"] + CHUNK, st


def test_a_request_past_its_deadline_stops(rr: Any) -> None:
    docs = [f"text {i} about email messages and path components" for i in range(40 * CHUNK)]

    async def scenario() -> dict[str, Any]:
        rr.stats(reset=True)
        with pytest.raises(StageTimeout, match="deadline"):
            await rr.rerank("expire me", docs, deadline_s=0.5)
        return rr.stats()

    st = rr.run(scenario())
    assert st["expired"] + st["expired_items"] >= 1
    assert st["pairs"] < len(docs) and st["active_requests"] == 0


def test_the_cost_cap_refuses_up_front(rr: Any) -> None:
    docs = _docs(100, 1000, _corpus_text())  # ~27,000 tokens > the 20,000 cap

    async def scenario() -> dict[str, Any]:
        rr.stats(reset=True)
        with pytest.raises(InvalidInput, match="RAG_RERANK_MAX_REQUEST_TOKENS") as e:
            await rr.rerank_documents("how do I parse a date", docs)
        assert "20000 tokens" in str(e.value)
        return rr.stats()

    st = rr.run(scenario())
    assert st["batches"] == 0 and st["refused_cost"] == 1
    out = rr.run(rr.rerank_documents("how do I parse a date", docs[:10]))  # under the cap: scored
    assert len(out.scores) == 10  # a RerankResult (was a dict)


# --------------------------------------------------------------------------------------------------
# serve tier: a live app
# --------------------------------------------------------------------------------------------------
APP = "rag"
DEADLINE_S = 20.0  # rerank_timeout_s: every rerank's deadline (the big request's and the searches')
BIG_DOCS, BIG_CHARS = 200, 1000  # the 1,000 x 1,000, scaled down
SERVE_CHUNK = 24
COST_CAP = 100_000  # tokens: the big request (~54,000) is under it, 60 x 8,000 characters (~140,000) over


@pytest.fixture(scope="module")
def fair_app(store, embedder, db_url, state_dir) -> Any:
    from deployments.launch import deploy

    name = ingest_demo(store, embedder, "fair", 120)
    cfg = cpu_app_config(
        db_url,
        state_dir,
        name,
        embedding_dtype="float32",
        rerank_dtype="float32",
        rerank_threads=1,
        fetch_k=20,
        top_k=5,
        max_documents=256,
        rerank_timeout_s=DEADLINE_S,
        rerank_cache=False,
        rerank_chunk_pairs=SERVE_CHUNK,
        rerank_max_request_tokens=COST_CAP,
    )
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] == "Reranker":
            d["user_config"]["batch_wait_timeout_s"] = 0.02
    port = free_port()
    try:
        with ray_cluster("rag-fair-tests"):
            deploy(cfg, host="127.0.0.1", port=port, wait=True, timeout_s=300)
            url = f"http://127.0.0.1:{port}"
            wait_ready(url)
            yield url
    finally:
        store.drop_collection(name)


def _stats(reset: bool = False) -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle("Reranker", app_name=APP).stats.remote(reset).result(timeout_s=60)


def _wait_idle(timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        st = _stats()
        if st["active_requests"] == 0:
            return st
        assert time.monotonic() < deadline, f"the Reranker still works for a request: {st}"
        time.sleep(0.2)


def _search(url: str, q: str) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    r = httpx.post(url + "/search", json={"query": q}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json(), time.monotonic() - t0


@pytest.mark.serve
def test_searches_are_reranked_while_a_large_rerank_runs(fair_app: str) -> None:
    url = fair_app
    for q in QUERIES[:2]:  # warm up: models loaded, the replica's pairs/s measured (admission uses it)
        body, _ = _search(url, q)
        assert body["reranker"]["reranked"], body["reranker"]
    _wait_idle(60)
    _stats(reset=True)
    big_docs = _docs(BIG_DOCS, BIG_CHARS, _corpus_text())
    with ThreadPoolExecutor(4) as pool:
        big = pool.submit(
            httpx.post,
            url + "/v2/rerank",
            json={"model": "rerank", "query": "how do I parse a date", "documents": big_docs},
            timeout=120,
        )
        deadline = time.monotonic() + 120
        while _stats()["active_requests"] == 0:  # the big request is being scored
            assert not big.done(), big.result().text
            assert time.monotonic() < deadline, "the large rerank never started"
            time.sleep(0.05)
        results: list[tuple[dict[str, Any], float, bool]] = []
        lock = threading.Lock()

        def client(qs: list[str]) -> None:
            for q in qs:
                body, s = _search(url, q)
                with lock:
                    results.append((body["reranker"], s, not big.done()))

        clients = [pool.submit(client, QUERIES[2:5]), pool.submit(client, QUERIES[5:8])]
        for c in clients:
            c.result(timeout=300)
        big_status = big.result(timeout=120).status_code
    st = _wait_idle(30)
    assert len(results) == 6
    for info, seconds, _ in results:
        assert info["reranked"], f"a search was not reranked while the large rerank ran: {info}"
        assert seconds < DEADLINE_S, f"a search took {seconds:.1f}s, past its {DEADLINE_S:g}s deadline"
    assert any(during for *_, during in results), "no search finished before the large rerank did"
    assert big_status in (200, 503)  # done within its deadline, or stopped at it
    assert st["max_batch_pairs"] <= SERVE_CHUNK + 2 * 20, st["recent_batches"]  # big chunk + two searches
    if big_status == 503:
        assert st["pairs"] < st["pairs_requested"], st


def _raw_post(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a POST and leave the answer unread: the caller closes the socket to disconnect."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    s.sendall(head.encode() + data)
    return s


@pytest.mark.serve
def test_a_client_that_disconnects_frees_the_reranker(fair_app: str) -> None:
    port = int(fair_app.rsplit(":", 1)[1])
    _wait_idle(60)
    _stats(reset=True)
    big_docs = _docs(BIG_DOCS, BIG_CHARS, _corpus_text())
    t0 = time.monotonic()
    sock = _raw_post(port, "/v2/rerank", {"model": "m", "query": "open a file", "documents": big_docs})
    try:
        deadline = time.monotonic() + 120
        while _stats()["pairs"] < SERVE_CHUNK:  # its first chunk is scored: the request is mid-rerank
            assert time.monotonic() < deadline, f"the rerank never started: {_stats()}"
            time.sleep(0.05)
    finally:
        sock.close()
    st = _wait_idle(DEADLINE_S)
    freed_after = time.monotonic() - t0
    assert st["pairs_requested"] == BIG_DOCS
    assert st["pairs"] < BIG_DOCS, f"all pairs were computed for a client that had gone: {st}"
    assert st["cancelled"] == 1, st
    # the ingress's own timeout would have cancelled it only after DEADLINE_S: this was the disconnect
    assert freed_after < DEADLINE_S, f"freed {freed_after:.1f}s after the request, not at the disconnect"


@pytest.mark.serve
def test_the_cost_cap_is_a_422_naming_the_setting(fair_app: str) -> None:
    docs = _docs(60, 8000, _corpus_text())
    r = httpx.post(fair_app + "/v2/rerank", json={"model": "m", "query": "q", "documents": docs}, timeout=120)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_type"] == "invalid_input"
    assert "RAG_RERANK_MAX_REQUEST_TOKENS" in body["error"] and str(COST_CAP) in body["error"]
