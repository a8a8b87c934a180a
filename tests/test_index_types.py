"""Vector index types per collection (rag.store.indexes) against the real embedded PostgreSQL + pgvector
(+ pgvectorscale): each type creates, ingests, searches (dense, filtered, hybrid) through its own index and
reports itself; binary re-ranks its candidates by the full vectors; the registry migration keeps old data."""

from __future__ import annotations

import itertools
import uuid

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from rag.errors import CollectionError, ConfigError
from rag.store import ChunkRow, DocumentRow, Store
from rag.store.indexes import INDEX_TYPES

DIM, N = 48, 3000


@pytest.fixture(scope="module")
def ann_store(db_url):
    """A store whose planner never picks a sequential scan: these tables are small enough that it would,
    and each test is about the index path (the exact fallbacks have their own tests). Binary re-ranks 4 x k
    candidates here, not the default 16: on tables this small, 16 x k filtered candidates make the planner
    sort the filter's rows instead of using the index (an exact scan, correct but not the path under test)."""
    s = Store(make_conninfo(db_url, options="-c enable_seqscan=off"), max_size=2, binary_rerank_factor=4.0)
    yield s
    s.close()


@pytest.fixture
def name(ann_store):
    n = "ix_" + uuid.uuid4().hex[:10]
    yield n
    ann_store.drop_collection(n)


def _data(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, DIM))
    pick = rng.integers(0, 30, N)
    x = (centres[pick] + 0.6 * rng.normal(size=(N, DIM))).astype(np.float32)
    q = (centres[rng.integers(0, 30, 8)] + 0.6 * rng.normal(size=(8, DIM))).astype(np.float32)
    return x, q


def _fill(store: Store, name: str, x: np.ndarray, batches: int = 1) -> None:
    docs = [DocumentRow(f"d{i}", "even" if i % 2 == 0 else "odd", f"h{i}") for i in range(len(x))]
    rows = [
        ChunkRow(f"d{i}", f"d{i}", docs[i].source, 0, f"note {i} about topic {i % 7}", f"h{i}")
        for i in range(len(x))
    ]
    edges = np.linspace(0, len(x), batches + 1).astype(int)
    for lo, hi in itertools.pairwise(edges):
        store.write_batch(name, docs[lo:hi], rows[lo:hi], x[lo:hi])
    with store.connection() as c:
        c.execute(f"ANALYZE rag_chunks_{name}")


def _need(store: Store, kind: str) -> None:
    if kind == "diskann" and not store.server_info()["vectorscale"]:
        pytest.skip("this PostgreSQL has no pgvectorscale (vectorscale extension): diskann cannot be tested")


def _cos(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (x @ q) / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_each_index_type_creates_ingests_searches_and_reports_itself(ann_store, name, kind):
    _need(ann_store, kind)
    x, queries = _data()
    ann_store.ensure_collection(name, dim=DIM, embedding_model="synthetic", index_type=kind)
    _fill(ann_store, name, x, batches=3 if kind == "diskann" else 1)  # diskann: built on the first batch
    assert ann_store.index_types()[name] == kind
    assert {c["name"]: c["index_type"] for c in ann_store.collections()}[name] == kind
    with ann_store.connection() as c:
        (indexdef,) = c.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = %s", [f"rag_chunks_{name}_{kind}"]
        ).fetchone()
    assert {"hnsw": "vector_cosine_ops", "halfvec": "halfvec_cosine_ops", "binary": "bit_hamming_ops"}.get(
        kind, "diskann"
    ) in indexdef

    k, recalls = 10, []
    for q in queries:
        hits = ann_store.search(name, q, k)
        assert hits.strategy == kind and len(hits) == k
        scores = [h["dense_score"] for h in hits]
        assert scores == sorted(scores, reverse=True)  # full-precision order, whatever picked them
        got = {h["id"]: h["dense_score"] for h in hits}
        cos = _cos(x, q)
        for i, s in got.items():
            assert s == pytest.approx(cos[int(i[1:])], abs=1e-5)  # the full vector's cosine
        exact = {h["id"] for h in ann_store.search(name, q, k, exact=True)}
        recalls.append(len(exact & set(got)) / k)
    # binary at 48 bits and 4 x k candidates is coarse (more candidates: the recall test below); diskann here
    # learnt its quantization from the first 1,000 rows only
    assert np.mean(recalls) >= {"binary": 0.5, "diskann": 0.8}.get(kind, 0.85), recalls

    # filtered: half the rows match, enough that the planner keeps the index (iterative / streaming scan)
    for q in queries[:4]:
        hits = ann_store.search(name, q, k, filter={"source": "even"})
        assert hits.strategy == (kind if kind == "diskann" else f"{kind}+iterative"), hits.strategy
        assert len(hits) == k and all(int(h["id"][1:]) % 2 == 0 for h in hits)
    # a filter matching 3 rows: every one of them, whatever path ran
    hits = ann_store.search(
        name, queries[0], k, filter={"source": "even", "doc_id": {"in": ["d0", "d2", "d4", "d5"]}}
    )
    assert sorted(h["id"] for h in hits) == ["d0", "d2", "d4"]

    hybrid = ann_store.search(name, queries[0], k, query="note about topic 3", mode="hybrid")
    assert hybrid.strategy.startswith(f"hybrid({kind}") and len(hybrid) == k


def test_the_async_store_reports_and_searches_each_type(db_url, ann_store, name):
    """What the Retriever's ``/info`` reports (``AsyncStore.index_types``), and its search of a halfvec
    collection, which reaches the halfvec index."""
    import asyncio

    from rag.store import AsyncStore

    x, queries = _data()
    ann_store.ensure_collection(name, dim=DIM, embedding_model="synthetic", index_type="halfvec")
    _fill(ann_store, name, x)

    async def go():
        s = AsyncStore(make_conninfo(db_url, options="-c enable_seqscan=off"), max_size=1)
        await s.open()
        try:
            return await s.index_types(), await s.search(name, queries[0], 10)
        finally:
            await s.close()

    kinds, hits = asyncio.run(go())
    assert kinds[name] == "halfvec" and hits.strategy == "halfvec" and len(hits) == 10


def test_binary_reranks_its_hamming_candidates_by_the_full_vectors(ann_store, name):
    x, queries = _data(seed=5)
    ann_store.ensure_collection(name, dim=DIM, embedding_model="synthetic", index_type="binary")
    _fill(ann_store, name, x)
    k, factor = 10, 6
    ann_store.binary_rerank_factor = factor
    try:
        for q in queries[:4]:
            hits = ann_store.search(name, q, k)
            # the candidates, straight from the bit index with the same query-time settings
            with ann_store.connection() as c, c.transaction():
                c.execute("SET LOCAL hnsw.ef_search = 90")  # max(40, 60 x 1.5)
                c.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                cand = c.execute(
                    f"SELECT id FROM rag_chunks_{name} ORDER BY binary_quantize(embedding)::bit({DIM}) <~> "
                    "binary_quantize(%s::vector) LIMIT %s",
                    [q, k * factor],
                ).fetchall()
            ids = np.array([int(r[0][1:]) for r in cand])
            assert len(ids) == k * factor
            best = ids[np.argsort(-_cos(x[ids], q), kind="stable")[:k]]
            assert [h["id"] for h in hits] == [f"d{i}" for i in best]
    finally:
        ann_store.binary_rerank_factor = 4.0


def test_more_binary_candidates_find_more_of_the_true_neighbours(ann_store, name):
    x, queries = _data(seed=7)
    ann_store.ensure_collection(name, dim=DIM, embedding_model="synthetic", index_type="binary")
    _fill(ann_store, name, x)
    k, recall = 20, {}
    try:
        for factor in (1.0, 10.0):
            ann_store.binary_rerank_factor = factor
            r = []
            for q in queries:
                exact = set(np.argsort(-_cos(x, q))[:k])
                r.append(len(exact & {int(h["id"][1:]) for h in ann_store.search(name, q, k)}) / k)
            recall[factor] = float(np.mean(r))
    finally:
        ann_store.binary_rerank_factor = 4.0
    assert recall[10.0] > recall[1.0] and recall[10.0] >= 0.9, recall


def test_the_default_index_type_and_a_clash_with_an_existing_collection(db_url, name):
    with Store(db_url, max_size=1, index_type="halfvec") as s:
        s.ensure_collection(name, dim=4, embedding_model="m")  # the store's default
        assert s.index_types()[name] == "halfvec"
        s.ensure_collection(name, dim=4, embedding_model="m")  # idempotent
        s.ensure_collection(name, dim=4, embedding_model="m", index_type="halfvec")
        with pytest.raises(CollectionError, match="index type is chosen when it is created"):
            s.ensure_collection(name, dim=4, embedding_model="m", index_type="binary")
        s.drop_collection(name)
    with pytest.raises(ConfigError, match="hnsw, halfvec, binary, diskann"):
        Store(db_url, max_size=1, index_type="ivfflat")


def _scratch_db(db_url: str) -> str:
    dbname = "rag_ix_" + uuid.uuid4().hex[:8]
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {dbname}")
    return dbname


def _drop_db(db_url: str, dbname: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def test_diskann_without_pgvectorscale_is_a_clear_error(db_url):
    from rag.store.collections import require_vectorscale

    dbname = _scratch_db(db_url)
    try:
        with psycopg.connect(make_conninfo(db_url, dbname=dbname), autocommit=True) as c:
            c.execute("CREATE ROLE rag_no_ext_" + dbname[-8:])  # may not create extensions
            c.execute("SET ROLE rag_no_ext_" + dbname[-8:])
            with pytest.raises(ConfigError) as e:
                require_vectorscale(c)
            c.execute("RESET ROLE")
            c.execute("DROP ROLE rag_no_ext_" + dbname[-8:])
        msg = str(e.value)
        assert "pgvectorscale" in msg and "hnsw, halfvec or binary" in msg, msg
    finally:
        _drop_db(db_url, dbname)


def test_registry_migration_keeps_existing_collections_as_hnsw(db_url):
    """A data folder from before index types (schema 3): its collection keeps every row, is ``hnsw``, and
    searches as before; new collections can then pick another type."""
    from rag.store import SCHEMA_VERSION, migrate

    dbname = _scratch_db(db_url)
    url = make_conninfo(db_url, dbname=dbname)
    try:
        x, queries = _data()
        with Store(url, max_size=1, index_type="hnsw") as s:  # what every collection had before schema 4
            s.ensure_collection("old", dim=DIM, embedding_model="m")
            _fill(s, "old", x[:500])
        with psycopg.connect(url, autocommit=True) as c:  # what schema 3 left behind
            c.execute("ALTER TABLE rag_collections DROP COLUMN index_type")
            c.execute("DELETE FROM rag_schema WHERE version = 4")
        assert migrate(url) == SCHEMA_VERSION == 4
        with Store(url, max_size=1) as s:
            assert s.index_types() == {"old": "hnsw"}
            assert s.count("old") == 500
            assert len(s.search("old", queries[0], 10)) == 10
            s.ensure_collection("new", dim=DIM, embedding_model="m", index_type="binary")
            assert s.index_types() == {"new": "binary", "old": "hnsw"}
    finally:
        _drop_db(db_url, dbname)
