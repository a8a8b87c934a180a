"""Filtered dense search on a real PostgreSQL + pgvector 0.8: the grammar, k rows at high and low selectivity
(iterative scans, the planner's exact scan, the exact fallback), recall against exact filtered search, bad
input, SQL in filter values, and the async store."""

from __future__ import annotations

import asyncio
import pickle
import uuid

import numpy as np
import pytest

from rag.errors import InvalidInput
from rag.store import AsyncStore, ChunkRow, DocumentRow, SearchFilter, SearchHits, parse_filter

N, DIM, K = 6000, 32, 20


def _source(i: int) -> str:
    if i % 200 == 7:
        return "rare.txt"  # 0.5 %
    if i % 20 == 3:
        return "docs/a_b.txt"  # 5 %
    return "common.txt" if i % 2 == 0 else "other.txt"  # ~50 % / ~45 %


def _meta(i: int) -> dict:
    return {"lang": "en" if i % 2 else "de", "tier": "gold" if i % 100 == 11 else "plain", "n": i % 7}


@pytest.fixture(scope="module")
def corpus(store):
    """An owned collection of clustered vectors with sources and metadata at several selectivities."""
    name = "f_" + uuid.uuid4().hex[:10]
    rng = np.random.default_rng(5)
    centers = rng.normal(size=(30, DIM))
    vecs = (centers[rng.integers(0, 30, N)] + 0.6 * rng.normal(size=(N, DIM))).astype(np.float32)
    store.ensure_collection(name, dim=DIM, embedding_model="synthetic")
    docs = [DocumentRow(f"d{i}", _source(i), f"h{i}", _meta(i)) for i in range(N)]
    chunks = [ChunkRow(f"c{i}", f"d{i}", _source(i), 0, f"text {i}", f"h{i}", _meta(i)) for i in range(N)]
    store.write_batch(name, docs, chunks, vecs)
    with store.connection() as conn:
        conn.execute(f"ANALYZE rag_chunks_{name}")
        conn.commit()
    queries = (centers[rng.integers(0, 30, 12)] + 0.6 * rng.normal(size=(12, DIM))).astype(np.float32)
    yield name, vecs, queries
    store.drop_collection(name)


def _matches(i: int, f: dict) -> bool:
    src, meta = _source(i), _meta(i)
    s = f.get("source")
    if isinstance(s, str) and src != s:
        return False
    if isinstance(s, dict) and "in" in s and src not in s["in"]:
        return False
    if isinstance(s, dict) and "prefix" in s and not src.startswith(s["prefix"]):
        return False
    d = f.get("doc_id")
    if isinstance(d, str) and f"d{i}" != d:
        return False
    if isinstance(d, dict) and f"d{i}" not in d["in"]:
        return False
    return all(meta.get(k) == v for k, v in f.get("metadata", {}).items())


FILTERS = {
    "source 50%": {"source": "common.txt"},
    "metadata 50%": {"metadata": {"lang": "en"}},
    "and ~25%": {"source": "common.txt", "metadata": {"n": 3}},
    "prefix 5%": {"source": {"prefix": "docs/a_"}},
    "in 5.5%": {"source": {"in": ["rare.txt", "docs/a_b.txt"]}},
    "metadata 1%": {"metadata": {"tier": "gold"}},
    "source 0.5%": {"source": "rare.txt"},
}


@pytest.mark.parametrize("label", list(FILTERS))
def test_filtered_search_returns_k_rows_matching_exact_filtered_search(store, corpus, label):
    name, _, queries = corpus
    raw = FILTERS[label]
    f = parse_filter(raw)
    n_match = sum(_matches(i, raw) for i in range(N))
    assert n_match >= K
    recalls, strategies = [], set()
    for q in queries:
        hits = store.search(name, q, K, filter=f)
        exact = store.search(name, q, K, filter=f, exact=True)
        assert isinstance(hits, SearchHits) and exact.strategy == "exact"
        assert len(hits) == K and len(exact) == K, (label, hits.strategy)
        assert all(_matches(int(h["doc_id"][1:]), raw) for h in hits), label
        assert [h["dense_score"] for h in hits] == sorted((h["dense_score"] for h in hits), reverse=True)
        recalls.append(len({h["id"] for h in hits} & {h["id"] for h in exact}) / K)
        strategies.add(hits.strategy)
    assert np.mean(recalls) >= 0.95, (label, recalls, strategies)
    assert strategies <= {"hnsw+iterative", "exact", "hnsw+iterative->exact"}, strategies
    if label.endswith("50%"):
        assert strategies == {"hnsw+iterative"}, strategies  # unselective: the index, iteratively
    if label == "source 0.5%":
        assert all("exact" in s for s in strategies), strategies  # selective: an exact scan answered


def test_without_iterative_scans_the_exact_fallback_still_returns_k_rows(store, corpus, monkeypatch):
    name, _, queries = corpus
    monkeypatch.setattr(store, "_server", {**store.server_info(), "iterative_scan": False})
    for raw in (FILTERS["source 0.5%"], FILTERS["metadata 1%"], FILTERS["source 50%"]):
        f = parse_filter(raw)
        for q in queries[:3]:
            hits = store.search(name, q, K, filter=f)
            exact = store.search(name, q, K, filter=f, exact=True)
            assert len(hits) == K, (raw, hits.strategy)
            assert hits.strategy in {"hnsw", "exact", "hnsw->exact"}, hits.strategy
            assert {h["id"] for h in hits} == {h["id"] for h in exact} or hits.strategy == "hnsw"


def test_fewer_matches_than_k_and_no_match(store, corpus):
    name, _, queries = corpus
    few = store.search(name, queries[0], K, filter=parse_filter({"doc_id": {"in": ["d1", "d2", "d3"]}}))
    assert sorted(h["doc_id"] for h in few) == ["d1", "d2", "d3"]
    one = store.search(name, queries[0], K, filter=parse_filter({"doc_id": "d42"}))
    assert [h["id"] for h in one] == ["c42"] and one[0]["metadata"] == _meta(42)
    none = store.search(name, queries[0], K, filter=parse_filter({"source": "no-such-source"}))
    assert none == [] and isinstance(none, SearchHits) and none.strategy
    literal = store.search(name, queries[0], K, filter=parse_filter({"source": {"prefix": "docs/a%"}}))
    assert literal == []  # % is literal in a prefix, not a wildcard


def test_sql_in_filter_values_is_only_data(store, corpus):
    name, _, queries = corpus
    evil = "'; DROP TABLE chunks; --"
    for raw in (
        {"source": evil},
        {"source": {"in": [evil, "x"]}},
        {"source": {"prefix": evil}},
        {"doc_id": evil},
        {"metadata": {evil: evil}},
    ):
        assert store.search(name, queries[0], K, filter=parse_filter(raw)) == []
    assert store.count(name) == N


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"lang": "en"}, r"unknown filter key.*'lang'.*allowed keys.*source.*doc_id.*metadata"),
        ({"'; DROP TABLE x; --": 1}, "unknown filter key"),
        ({"source": 3}, r"filter source: the value must be a string, got 3"),
        ({"source": None}, "must be a string"),
        ({"source": {"in": []}}, r"filter source: \"in\" needs at least one value"),
        ({"doc_id": {"in": []}}, r"filter doc_id: \"in\" needs at least one value"),
        ({"source": {"in": ["a", 2]}}, r"\"in\" values must be a string"),
        ({"source": {"in": "a"}}, r"\"in\" takes a list"),
        ({"source": {"eq": "a"}}, r"expected a string or one operator"),
        ({"source": {"in": ["a"], "prefix": "b"}}, "one operator"),
        ({"doc_id": {"prefix": "d"}}, r"doc_id: expected a string or one operator \(\{\"in\": \.\.\.\}\)"),
        ({"metadata": "en"}, r"filter metadata: expected a JSON object"),
        ({"metadata": {"x": float("nan")}}, "not plain JSON"),
        (["source", "a"], "filter must be a JSON object"),
        ({"source": {"in": ["a"] * 1001}}, "at most 1000"),
    ],
)
def test_bad_filters_are_invalid_input_naming_the_fix(raw, match):
    with pytest.raises(InvalidInput, match=match):
        parse_filter(raw)


def test_filter_grammar_round_trips_and_pickles():
    assert parse_filter(None) is None and parse_filter({}) is None and parse_filter({"metadata": {}}) is None
    for raw in (*FILTERS.values(), {"doc_id": {"in": ["a", "b"]}}, {"metadata": {"a": {"b": [1, 2]}}}):
        f = parse_filter(raw)
        assert isinstance(f, SearchFilter) and f.as_dict() == raw
        assert pickle.loads(pickle.dumps(f)) == f and hash(f) == hash(parse_filter(raw))
        assert parse_filter(f) is f
    hits = SearchHits([{"id": "a", "dense_score": 0.5}], "hnsw+iterative")
    back = pickle.loads(pickle.dumps(hits))
    assert isinstance(back, SearchHits) and back == hits and back.strategy == "hnsw+iterative"


def test_owned_collections_get_the_indexes_filters_need(store, corpus):
    name, _, _ = corpus
    with store.connection() as conn:
        defs = [
            r[0]
            for r in conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE tablename = %s", [f"rag_chunks_{name}"]
            )
        ]
    assert any("text_pattern_ops" in d and "(source" in d for d in defs), defs
    assert any("gin" in d and "jsonb_path_ops" in d for d in defs), defs
    assert any("hnsw" in d for d in defs), defs


def test_async_store_filters_and_server_info(db_url, corpus):
    name, _, queries = corpus

    async def go():
        s = AsyncStore(db_url, max_size=2)
        await s.open()
        try:
            info = await s.server_info()
            hits = await s.search(name, queries[0], K, filter=parse_filter({"source": "rare.txt"}))
            plain = await s.search(name, queries[0], K)
            with pytest.raises(InvalidInput):
                await s.search(name, queries[0], K, filter={"nope": 1})
            return info, hits, plain
        finally:
            await s.close()

    info, hits, plain = asyncio.run(go())
    assert set(info) == {"postgresql", "pgvector", "iterative_scan", "vectorscale"}
    assert len(hits) == K and {h["source"] for h in hits} == {"rare.txt"} and "exact" in hits.strategy
    assert len(plain) == K and plain.strategy == "hnsw"
