"""The rerank score cache (rag.score_cache): bounds, LRU order, only missing pairs computed, fidelity."""

from __future__ import annotations

import pytest

from rag.errors import InvalidInput
from rag.rerank import Scores
from rag.score_cache import ENTRY_OVERHEAD, CachedReranker, ScoreCache, model_key, with_cache
from rag.settings import Settings


class Counting:
    """A reranker whose score is a function of the pair; it records what it was asked to compute."""

    enabled = True
    tokenizer = None
    max_length = 0

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str]]] = []

    def score(self, pairs):
        self.calls.append(list(pairs))
        return Scores([len(q) + len(d) / 1000 for q, d in pairs])

    def info(self):
        return {"backend": "test", "model": "m", "revision": "r1"}


def test_only_missing_pairs_are_computed():
    inner = Counting()
    rr = CachedReranker(inner, ScoreCache(100, 1 << 20))
    first = rr.score([("q", "a"), ("q", "b"), ("q", "a")])
    assert inner.calls == [[("q", "a"), ("q", "b")]]  # deduplicated
    scores = rr.score([("q", "b"), ("q", "c"), ("p", "a")])  # each call says which pairs the cache answered
    timings, hits = scores.timings.as_dict(), scores.cached
    assert inner.calls[-1] == [("q", "c"), ("p", "a")]  # the query is part of the key
    assert hits == [True, False, False] and timings["cache_hits"] == 1 and timings["cache_misses"] == 2
    assert scores[0] == first[1]
    n = len(inner.calls)
    assert rr.score([("q", "a"), ("q", "b"), ("q", "c")]) == [first[0], first[1], scores[1]]
    assert len(inner.calls) == n  # all hits: no model call at all
    info = rr.cache.info()
    assert (
        info["entries"] == 4
        and info["hits"] == 1 + 3
        and info["misses"] == 3 + 2
        and info["max_entries"] == 100
    )


def test_lru_bounded_in_entries_and_bytes():
    c = ScoreCache(3, 1 << 20)
    keys = [c.key("q", str(i)) for i in range(5)]
    c.put_many([(k, float(i)) for i, k in enumerate(keys[:3])])
    assert c.get_many([keys[0]]) == [0.0]  # 0 is now the most recently used
    c.put_many([(keys[3], 3.0)])
    assert len(c) == 3 and c.get_many(keys[:4]) == [0.0, None, 2.0, 3.0]  # 1 was the least recent
    per_entry = ENTRY_OVERHEAD + 1 + 16
    b = ScoreCache(1000, 2 * per_entry)
    b.put_many([(b.key("q", str(i)), 1.0) for i in range(5)])
    assert len(b) == 2 and b.bytes == 2 * per_entry and b.evictions == 3
    huge = ScoreCache(10, 1000)
    huge.put_many([(huge.key("x" * 5000, "d"), 1.0)])  # larger than the whole cache: not stored
    assert len(huge) == 0


def test_key_holds_the_model_and_the_document_content():
    a, b = ScoreCache(10, 1 << 20, namespace="m@r1"), ScoreCache(10, 1 << 20, namespace="m@r2")
    assert a.key("q", "doc") != b.key("q", "doc")  # another revision never reads these scores
    assert a.key("q", "doc") == a.key("q", "doc") and a.key("q", "doc") != a.key("q", "doc.")
    assert "revision=r1" in model_key(Counting().info())


def test_setting_turns_it_off_and_bad_pairs_are_refused_first():
    inner = Counting()
    assert with_cache(inner, Settings(rerank_cache=False)) is inner
    rr = with_cache(inner, Settings(rerank_cache_entries=7, rerank_cache_bytes=10_000))
    assert isinstance(rr, CachedReranker) and rr.cache.max_entries == 7 and rr.cache.max_bytes == 10_000
    with pytest.raises(InvalidInput):
        rr.score([("q", "a\x00b")])
    assert inner.calls == [] and len(rr.cache) == 0


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_fidelity_cached_scores_are_identical_to_uncached(settings, dtype):
    """The same requests through the cache and straight to the model: identical scores, bit for bit."""
    import warnings

    from rag.models import StandInWarning
    from rag.rerank import CrossEncoderReranker

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        model = CrossEncoderReranker(
            settings.rerank_model, cache_dir=settings.model_cache, offline=True, dtype=dtype
        )
    from rag.ingest import iter_demo

    docs = [d.content[:400] for d in iter_demo(limit=40)]
    requests = [
        [("how do I parse a date", d) for d in docs[:30]],
        [("compress data with gzip", d) for d in docs[10:40]],
        [("how do I parse a date", d) for d in docs[:30]],  # a repeat: all hits
    ]
    cached = CachedReranker(model, ScoreCache(10_000, 1 << 24))
    for pairs in requests:
        uncached = model.score(pairs)
        got = cached.score(pairs)
        timings, hits = got.timings.as_dict(), got.cached
        assert got == uncached  # identical, not approximately equal
    assert all(hits) and timings["cache_misses"] == 0
