"""The rerank engine (rag.rerank_engine) and its scheduler (rag.rerank_schedule), in this process.

Scheduler: chunks sized by the measured pairs/s, small requests first when a batch ends, a large one never
stalled. Engine: the library's path (``rerank_sync``) scores what the backend scores, splits long documents,
answers from the score cache, and refuses a request over the cost cap before any work. The service's path
is the same policy (tests/test_rerank_fairness.py, tests/test_rerank_api.py); tests/test_serve.py checks
that the library and the live service give identical results.
"""

from __future__ import annotations

import asyncio

import pytest

from rag.errors import InvalidInput, Overloaded
from rag.rerank_engine import RerankEngine, RerankOptions
from rag.rerank_schedule import MIN_SHARE, WHOLE_PAIRS, Item, Scheduler


def _item(ticket: int, n: int) -> Item:
    return Item("q", ("d",) * n, 16, 1600, 0.0, None, ticket)


def test_chunks_are_sized_by_measured_time_and_capped():
    s = Scheduler(chunk_cap=128, chunk_s=0.25)
    big = s.admit(1000, None)
    assert s.size_alone(big) == 128  # nothing measured yet: the cap
    s.observe(computed_pairs=16, seconds=0.1)  # 160 pairs/s -> 40 pairs per 250 ms
    assert s.budget() == 40 and s.size_alone(big) == 40
    s.observe(computed_pairs=16, seconds=1.0)  # slower: down at once
    assert s.pairs_per_s == 16 and s.size_alone(big) == 4
    s.observe(computed_pairs=16, seconds=1.0, compute_seconds=0.1)  # 0.9 s of the batch was not the model
    assert s.pairs_per_s == 16  # admission: what callers wait
    assert s.compute_pairs_per_s == pytest.approx(0.3 * 160 + 0.7 * 16)  # chunks: the model's own rate
    assert s.size_alone(big) == round(s.compute_pairs_per_s * 0.25)
    small = s.admit(WHOLE_PAIRS, None)
    assert s.size_alone(small) == WHOLE_PAIRS  # a small request is one chunk, whatever the budget
    off = Scheduler(chunk_cap=128, chunk_s=0)  # rerank_chunk_ms=0: chunks of rerank_chunk_pairs
    off.observe(16, 1.0)
    assert off.size_alone(off.admit(500, None)) == 128


def test_a_small_request_goes_ahead_and_a_large_one_keeps_its_share():
    async def scenario() -> tuple[list[int], list[int]]:
        s = Scheduler(chunk_cap=128, chunk_s=0.25)
        s.observe(160, 1.0)  # budget: 40 pairs per round
        big = s.admit(1000, None)
        first = await s.turn(big)  # idle: at once
        s.batch_started([_item(big.id, first)])
        s.scored(big, first)
        smalls = [s.admit(n, None) for n in (30, 25)]
        waits = [asyncio.ensure_future(s.turn(t)) for t in [big, *smalls]]  # big asked first
        await asyncio.sleep(0)
        assert not any(w.done() for w in waits)  # a batch runs: everyone waits for it
        s.batch_finished()
        grants = [await w for w in waits]
        return [first, *grants], [t.granted for t in [big, *smalls]]

    (first, big_next, small1, small2), granted = asyncio.run(scenario())
    assert first == 40
    assert (small1, small2) == (30, 25)  # whole, ahead of the large request's next chunk
    assert big_next == int(40 * MIN_SHARE)  # the round's budget was spent: its least share, not nothing
    assert granted == [big_next, 30, 25]


def test_admission_refuses_what_cannot_finish_in_time():
    s = Scheduler(chunk_cap=128, chunk_s=0.25)
    s.observe(46, 1.0)
    s.admit(1300, None)
    assert s.admit(100, deadline_s=30).remaining == 100  # a small one takes turns with it: in time
    with pytest.raises(Overloaded, match="deadline") as e:
        s.admit(1000, deadline_s=30)  # a large one shares the model with the other large one: too late
    assert e.value.retry_after_s >= 1
    assert s.admit(1000, deadline_s=None).remaining == 1000  # no deadline: always admitted


# --------------------------------------------------------------------------------------------------
# the engine over the stand-in cross-encoder
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_for(settings, reranker):
    def make(**overrides: object) -> RerankEngine:
        return RerankEngine(reranker, settings.with_overrides(**overrides).slice("reranker"))

    return make


def test_candidates_score_what_the_backend_scores(engine_for, reranker):
    docs = ["datetime.strptime parses a date", "gzip compresses data", "a lock guards shared state"]
    e = engine_for(rerank_cache=False)
    res = e.rerank_sync("how do I parse a date", docs, RerankOptions(kind="candidates"))
    assert res.scores == reranker.score([("how do I parse a date", d) for d in docs])
    assert res.spans == [None] * 3 and res.windows == [1] * 3 and res.usage.pairs == 3


def test_long_documents_are_split_and_the_cache_answers_repeats(engine_for):
    from rag.ingest import iter_demo

    long = (
        " ".join(" ".join(d.content for d in iter_demo(limit=80)).split()[:1500]) + " strptime parses dates"
    )
    e = engine_for()
    res = e.rerank_sync("parse a date", [long, "gzip"])
    assert res.windows[0] > 1 and res.spans[0] is not None and res.spans[1] is None
    assert res.usage.pairs == res.windows[0] + 1 and res.usage.tokens and res.cache_hits == 0
    again = e.rerank_sync("parse a date", [long, "gzip"])
    assert again.scores == res.scores and again.cache_hits == res.usage.pairs
    assert e.stats.as_dict()["requests"] == 2


def test_the_cost_cap_refuses_before_any_work(engine_for):
    e = engine_for(rerank_max_request_tokens=50)
    with pytest.raises(InvalidInput, match="RAG_RERANK_MAX_REQUEST_TOKENS"):
        e.rerank_sync("q", ["a long enough document about many things " * 20])
    st = e.stats.as_dict()
    assert st["refused_cost"] == 1 and st["batches"] == 0
