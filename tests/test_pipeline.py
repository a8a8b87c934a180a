"""The library API: shapes, stage timings, and every bad input as a typed error naming the fix."""

from __future__ import annotations

import pytest

from rag.errors import InvalidInput
from rag.ingest import Document, ingest


@pytest.fixture
def filled(embedder, store, collection):
    texts = [
        "The datetime module supplies classes for manipulating dates and times.",
        "strptime parses a string into a datetime according to a format.",
        "The json module encodes and decodes JSON documents.",
        "Sockets provide low-level network communication endpoints.",
        "A lock synchronises threads: acquire blocks until release.",
    ] * 4
    docs = [Document(f"d{i}", f"{t} (copy {i})", f"src{i % 5}.txt") for i, t in enumerate(texts)]
    ingest(docs, embedder=embedder, store=store, collection=collection)
    return collection


def test_retrieve_and_rerank_shape(pipeline, filled):
    hits = pipeline.retrieve_and_rerank("parse a date string", fetch_k=20, top_k=8, collection=filled)
    assert len(hits) == 8
    for h in hits:
        assert {"id", "content", "source", "score", "dense_score"} <= set(h)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_retrieve_is_dense_order(pipeline, filled):
    hits = pipeline.retrieve("parse a date string", 5, collection=filled, mode="dense")
    assert len(hits) == 5 and all(h["score"] == h["dense_score"] for h in hits)
    assert "datetime" in hits[0]["content"] or "strptime" in hits[0]["content"]


def test_search_reports_timings_and_reranker(pipeline, filled):
    res = pipeline.search("thread locks", fetch_k=10, top_k=3, collection=filled)
    assert set(res.timings_ms) == {"embed", "retrieve", "rerank", "total"}
    assert res.reranked and res.reranker["trained"] is False
    assert res.timings_ms["total"] >= res.timings_ms["rerank"] > 0
    res2 = pipeline.search("thread locks", fetch_k=10, top_k=3, rerank=False, collection=filled)
    assert not res2.reranked and res2.reason == "not_requested" and res2.timings_ms["rerank"] == 0


@pytest.mark.parametrize(
    ("query", "fetch_k", "top_k", "match"),
    [
        ("", 100, 8, "non-empty"),
        ("   \n\t", 100, 8, "non-empty"),
        ("ok", 100, 0, "top_k must be an integer >= 1"),
        ("ok", 5, 8, "top_k=8 is larger than fetch_k=5"),
        ("ok", 5000, 8, "above the maximum 1000"),
        ("ok", 0, 1, "fetch_k must be a positive integer"),
    ],
)
def test_bad_search_input(pipeline, filled, query, fetch_k, top_k, match):
    with pytest.raises(InvalidInput, match=match):
        pipeline.retrieve_and_rerank(query, fetch_k=fetch_k, top_k=top_k, collection=filled)
