"""rag.search: the one two-stage policy, driven with plain functions (no database, no models, no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from rag.errors import InvalidInput, Overloaded, RerankerError, StageTimeout, StageUnavailable
from rag.search import (
    Dense,
    Embed,
    LatencyModel,
    Rerank,
    Retrieve,
    make_request,
    run_async,
    run_sync,
    two_stage,
)
from rag.settings import Settings

CFG = Settings(fetch_k=6, top_k=3).slice("search")


def cands(n: int) -> list[dict]:
    return [
        {"id": f"c{i}", "content": f"doc {i}", "source": "s", "dense_score": 1 - i / 10} for i in range(n)
    ]


def stages(n: int = 6, rerank=None):
    calls: list[str] = []

    def do(step):
        calls.append(type(step).__name__)
        if isinstance(step, Embed):
            return [0.0]
        if isinstance(step, Retrieve):
            return cands(min(n, step.k))
        if isinstance(step, Rerank):
            if isinstance(rerank, BaseException):
                raise rerank
            return [i / 10 for i in range(len(step.documents))]  # reverses the dense order
        raise AssertionError(step)

    return do, calls


def run(error=None, *, n: int = 6, enabled: bool = True, strict: bool = False, **req):
    do, calls = stages(n, error)
    r = make_request(CFG, "q", **req)
    res = run_sync(two_stage(r, reranker_enabled=enabled, rerank_timeout_s=5.0, strict=strict), do)
    return res, calls


def test_reranked_order_and_timings():
    res, calls = run()
    assert res.reranked and res.reason is None
    assert [h["id"] for h in res.hits] == ["c5", "c4", "c3"]
    assert [c["id"] for c in res.candidates] == [f"c{i}" for i in range(6)]
    assert set(res.timings_ms) == {"embed", "retrieve", "rerank", "total"} and calls == [
        "Embed",
        "Retrieve",
        "Rerank",
    ]


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"rerank": False}, "not_requested"),
        ({"enabled": False}, "disabled"),
        ({"n": 0}, "no_candidates"),
        ({"rerank_error": Overloaded("busy")}, "overloaded"),
        ({"rerank_error": StageTimeout("slow")}, "reranker_error"),
        ({"rerank_error": StageUnavailable("gone")}, "reranker_error"),
        ({"rerank_error": RerankerError("boom")}, "reranker_error"),
        ({"rerank_error": TypeError("bug")}, "reranker_error"),
    ],
)
def test_each_degradation_answers_dense_order_with_its_reason(kw, reason):
    err = kw.pop("rerank_error", None)
    res, _ = run(err, **kw)
    assert not res.reranked and res.reason == reason
    assert [h["id"] for h in res.hits] == [c["id"] for c in res.candidates[:3]]
    assert all(h["score"] == h["dense_score"] for h in res.hits)


def test_budget_spent_or_too_small_skips_without_calling_the_reranker():
    latency = LatencyModel()
    latency.observe(1000.0, 1)  # 1 s per pair: nothing fits in 100 ms
    do, calls = stages()
    r = make_request(CFG, "q", budget_ms=100)
    res = run_sync(two_stage(r, reranker_enabled=True, rerank_timeout_s=5.0, latency=latency), do)
    assert res.reason == "budget" and "Rerank" not in calls


def test_a_budget_bound_timeout_is_a_budget_skip_and_strict_raises_on_failures():
    res, _ = run(StageTimeout("late"), budget_ms=60_000)
    assert res.reason == "reranker_error"  # the budget was not what bound the wait (5 s timeout < 60 s)
    res, _ = run(StageTimeout("late"), budget_ms=1_000)
    assert res.reason == "budget" and "remaining" in res.detail  # the budget bound the wait: a skip
    with pytest.raises(RerankerError):
        run(RerankerError("boom"), strict=True)
    res, _ = run(rerank=False, strict=True)  # not requested is never an error
    assert res.reason == "not_requested"


def test_validation_happens_before_any_stage():
    for bad in ({"fetch_k": 0}, {"top_k": 9}, {"fetch_k": 5000}):
        with pytest.raises(InvalidInput):
            make_request(CFG, "q", **bad)
    with pytest.raises(InvalidInput, match="surrogate"):
        make_request(CFG, "bad \ud800 text")
    with pytest.raises(InvalidInput, match="non-empty"):
        make_request(CFG, "  ")


def test_stage1_errors_propagate_and_precomputed_vectors_skip_embedding():
    def do(step):
        raise StageUnavailable("retriever gone")

    with pytest.raises(StageUnavailable):
        run_sync(two_stage(make_request(CFG, "q"), reranker_enabled=True, rerank_timeout_s=1), do)
    do2, calls = stages()
    run_sync(two_stage(make_request(CFG, "q", vector=[1.0]), reranker_enabled=True, rerank_timeout_s=1), do2)
    assert calls == ["Retrieve", "Rerank"]


def test_async_driver_hears_dense_first_and_sync_driver_works_inside_a_running_loop():
    do, _ = stages()
    seen: list[Dense] = []

    async def ado(step):
        return do(step)

    async def on_dense(d: Dense) -> None:
        seen.append(d)

    async def main():
        r = make_request(CFG, "q")
        a = await run_async(two_stage(r, reranker_enabled=True, rerank_timeout_s=1), ado, on_dense)
        b = run_sync(two_stage(r, reranker_enabled=True, rerank_timeout_s=1), do)  # no loop needed
        return a, b

    a, b = asyncio.run(main())
    assert [h["id"] for h in a.hits] == [h["id"] for h in b.hits]
    assert len(seen) == 1 and [h["id"] for h in seen[0].hits] == ["c0", "c1", "c2"]


def test_retrieve_carries_the_query_text_and_the_mode_and_the_strategy_comes_back():
    from rag.store import SearchHits

    seen: list[Retrieve] = []

    def do(step):
        if isinstance(step, Retrieve):
            seen.append(step)
            return SearchHits(
                [{**c, "lexical_rank": 1, "fused_score": 1 / (61 + i)} for i, c in enumerate(cands(step.k))],
                "hybrid(hnsw, bm25)",
            )
        return [0.0] if isinstance(step, Embed) else [0.0] * len(step.documents)

    res = run_sync(
        two_stage(make_request(CFG, "parse a date", rerank=False), reranker_enabled=True, rerank_timeout_s=1),
        do,
    )
    assert seen[0].query == "parse a date" and seen[0].mode == "hybrid"  # RAG_SEARCH_MODE's default
    assert res.strategy == "hybrid(hnsw, bm25)"
    # not reranked: the stage-1 order and score (the fused score in the hybrid mode)
    assert [h["score"] for h in res.hits] == [h["fused_score"] for h in res.candidates[:3]]
    run_sync(two_stage(make_request(CFG, "q", mode="dense"), reranker_enabled=True, rerank_timeout_s=1), do)
    assert seen[-1].mode == "dense"
    dense_default = Settings(fetch_k=6, top_k=3, search_mode="lexical").slice("search")
    assert make_request(dense_default, "q").mode == "lexical"
    with pytest.raises(InvalidInput, match="mode must be one of dense, lexical, hybrid"):
        make_request(CFG, "q", mode="semantic")
