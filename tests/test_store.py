"""Store against a real PostgreSQL + pgvector: round trip, idempotence, atomicity, k, HNSW vs exact."""

from __future__ import annotations

import numpy as np
import pytest

from rag.errors import CollectionError, DimensionMismatch, InvalidInput, StoreUnavailable
from rag.ingest import Document, ingest
from rag.store import ChunkRow, DocumentRow, Store

TOPICS = {
    "python": "Python lists support append, extend and slicing; dictionaries map keys to values.",
    "aero": "The boundary layer on a swept wing thickens toward the tip at high angles of attack.",
    "cooking": "Simmer the onions in butter until golden, then add stock and reduce by half.",
    "astronomy": "A neutron star is the collapsed core of a massive star after a supernova.",
    "finance": "Compound interest grows a deposit exponentially with the number of periods.",
}


def _docs(n_per_topic: int = 3) -> list[Document]:
    out = []
    for topic, text in TOPICS.items():
        for i in range(n_per_topic):
            out.append(Document(f"{topic}-{i}", f"{text} Variant {i} of the {topic} note.", f"{topic}.txt"))
    return out


def _ingest(docs, embedder, store, collection, **kw):
    return ingest(docs, embedder=embedder, store=store, collection=collection, **kw)


def test_round_trip_search_finds_the_topic(embedder, store, collection):
    rep = _ingest(_docs(), embedder, store, collection)
    assert rep.documents_added == 15 and rep.chunks_added == 15
    hits = store.search(collection, embedder.embed_query("what happens when a massive star collapses"), 5)
    assert hits[0]["doc_id"].startswith("astronomy-")
    assert set(hits[0]) >= {"id", "doc_id", "source", "content", "dense_score", "chunk_index", "metadata"}
    assert hits[0]["dense_score"] >= hits[-1]["dense_score"]


def test_reingest_adds_nothing_and_changed_documents_are_replaced(embedder, store, collection):
    _ingest(_docs(), embedder, store, collection)
    again = _ingest(_docs(), embedder, store, collection)
    assert (again.documents_added, again.chunks_added, again.documents_unchanged) == (0, 0, 15)
    assert store.count(collection) == 15
    changed = [Document("python-0", "Entirely new content about tuples and sets.", "python.txt")]
    rep = _ingest(changed, embedder, store, collection)
    assert rep.documents_replaced == 1 and store.count(collection) == 15
    hits = store.search(collection, embedder.embed_query("tuples and sets"), 1)
    assert hits[0]["doc_id"] == "python-0" and "tuples" in hits[0]["content"]


def test_interrupted_ingest_leaves_no_partial_document(embedder, store, collection, monkeypatch):
    _ingest(_docs(1), embedder, store, collection)  # creates the collection; 5 whole documents
    before = store.count(collection)

    def boom(*a, **kw):
        raise RuntimeError("simulated crash while copying chunks")

    monkeypatch.setattr(Store, "_copy_chunks", boom)
    long_doc = Document("long", " ".join(["Chunk me into many windows of text."] * 300), "long.txt")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _ingest([long_doc], embedder, store, collection, chunk_tokens=64)
    monkeypatch.undo()
    assert store.count(collection) == before
    assert store.existing_hashes(collection, ["long"]) == {}  # the document row rolled back too
    rep = _ingest([long_doc], embedder, store, collection, chunk_tokens=64)  # a re-run completes it
    assert rep.documents_added == 1 and rep.chunks_added > 5


def test_k_100_returns_100_rows_despite_ef_search_default(store, collection):
    rng = np.random.default_rng(0)
    dim = 16
    store.ensure_collection(collection, dim=dim, embedding_model="synthetic")
    vecs = rng.normal(size=(400, dim)).astype(np.float32)
    docs = [DocumentRow(f"d{i}", "syn", f"h{i}") for i in range(len(vecs))]
    chunks = [ChunkRow(f"d{i}", f"d{i}", "syn", 0, f"text {i}", f"h{i}") for i in range(len(vecs))]
    store.write_batch(collection, docs, chunks, vecs)
    assert len(store.search(collection, vecs[0], 100)) == 100
    assert len(store.search(collection, vecs[0], 250)) == 250


def test_hnsw_agrees_with_exact_search(store, collection):
    rng = np.random.default_rng(1)
    dim, n = 32, 3000
    centers = rng.normal(size=(20, dim))
    vecs = (centers[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)
    store.ensure_collection(collection, dim=dim, embedding_model="synthetic")
    docs = [DocumentRow(f"d{i}", "syn", f"h{i}") for i in range(n)]
    chunks = [ChunkRow(f"d{i}", f"d{i}", "syn", 0, "x", f"h{i}") for i in range(n)]
    store.write_batch(collection, docs, chunks, vecs)
    recalls = []
    queries = centers[rng.integers(0, 20, 10)] + 0.5 * rng.normal(size=(10, dim))  # like the data
    for q in queries.astype(np.float32):
        approx = {h["id"] for h in store.search(collection, q, 100)}
        exact = {h["id"] for h in store.search(collection, q, 100, exact=True)}
        recalls.append(len(approx & exact) / 100)
    assert np.mean(recalls) >= 0.95, recalls


def test_dimension_mismatch_is_a_clear_error(store, collection):
    store.ensure_collection(collection, dim=8, embedding_model="a")
    with pytest.raises(DimensionMismatch, match="8-dimension"):
        store.search(collection, np.ones(384, dtype=np.float32), 5)
    with pytest.raises(DimensionMismatch, match="another --collection|drop it"):
        store.ensure_collection(collection, dim=384, embedding_model="b")


def test_unknown_and_invalid_collections(store):
    with pytest.raises(CollectionError, match="does not exist.*rag ingest"):
        store.search("no_such_collection", np.ones(8), 5)
    with pytest.raises(CollectionError, match="lower-case"):
        store.search("Robert'); DROP TABLE x;--", np.ones(8), 5)
    with pytest.raises(InvalidInput, match="k must be"):
        store.search("no_such_collection", np.ones(8), 0)


def test_unreachable_database_names_the_url_redacted_and_the_fix():
    with pytest.raises(StoreUnavailable) as e:
        Store("postgresql://bob:hunter2@127.0.0.1:1/db", timeout_s=1)
    msg = str(e.value)
    assert "hunter2" not in msg and "bob:***@127.0.0.1:1" in msg and "rag db start" in msg


def test_a_data_folder_of_another_postgresql_major_is_refused_and_left_alone(tmp_path):
    from rag.db import EmbeddedPostgres, bundled_major

    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("16\n")
    (pgdata / "base").mkdir()
    (pgdata / "base" / "1").write_text("old data")
    before = sorted((p.relative_to(pgdata), p.stat().st_mtime_ns) for p in pgdata.rglob("*"))
    with pytest.raises(StoreUnavailable) as e:
        EmbeddedPostgres(pgdata).start()
    msg = str(e.value)
    assert f"made by PostgreSQL 16, and the installed PostgreSQL {bundled_major()} cannot open it" in msg
    assert "nothing was changed" in msg and f"mv {pgdata} {pgdata}.pg16" in msg and "RAG_DATABASE_URL" in msg
    assert sorted((p.relative_to(pgdata), p.stat().st_mtime_ns) for p in pgdata.rglob("*")) == before
    assert bundled_major() == "18"


def test_search_hits_say_which_strategy_ran(store, collection):
    store.ensure_collection(collection, dim=4, embedding_model="synthetic")
    docs = [DocumentRow(f"d{i}", "syn", f"h{i}") for i in range(3)]
    chunks = [ChunkRow(f"d{i}", f"d{i}", "syn", 0, f"t{i}", f"h{i}") for i in range(3)]
    store.write_batch(collection, docs, chunks, np.eye(3, 4, dtype=np.float32))
    assert store.search(collection, np.ones(4), 2).strategy in ("hnsw", "exact")  # the planner's choice
    assert store.search(collection, np.ones(4), 5).strategy in ("hnsw->exact", "exact")  # fewer rows than k
    assert len(store.search(collection, np.ones(4), 5)) == 3
    assert store.search(collection, np.ones(4), 2, exact=True).strategy == "exact"


def test_schema_1_databases_migrate_and_their_collections_get_the_filter_indexes(db_url):
    import uuid

    import psycopg
    from psycopg.conninfo import make_conninfo

    from rag.store import SCHEMA_VERSION, migrate, parse_filter
    from rag.store.schema import _MIGRATIONS

    name = "rag_mig_" + uuid.uuid4().hex[:8]
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = make_conninfo(db_url, dbname=name)
    try:
        with psycopg.connect(url, autocommit=True) as c:  # what schema 1 left behind
            c.execute("CREATE EXTENSION vector")
            c.execute("CREATE TABLE rag_schema (version integer NOT NULL)")
            c.execute(_MIGRATIONS[1])
            c.execute("INSERT INTO rag_schema VALUES (1)")
            c.execute("CREATE TABLE rag_docs_old (doc_id text PRIMARY KEY, source text NOT NULL)")
            c.execute(
                "CREATE TABLE rag_chunks_old (id text PRIMARY KEY, doc_id text NOT NULL, source text NOT NULL,"
                " chunk_index integer NOT NULL, content text NOT NULL, metadata jsonb NOT NULL DEFAULT '{}',"
                " content_hash text NOT NULL, embedding vector(2) NOT NULL)"
            )
            c.execute("INSERT INTO rag_docs_old VALUES ('d', 's.txt')")
            c.execute(
                "INSERT INTO rag_chunks_old VALUES ('c', 'd', 's.txt', 0, 'x', '{\"a\": 1}', 'h', '[1,0]')"
            )
            c.execute("INSERT INTO rag_collections VALUES ('old', 2, 'm', 16, 64, now())")
        assert migrate(url) == SCHEMA_VERSION == 4
        with psycopg.connect(url) as c:
            defs = [
                r[0] for r in c.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'rag_chunks_old'")
            ]
        assert any("text_pattern_ops" in d for d in defs) and any("jsonb_path_ops" in d for d in defs), defs
        with Store(url, max_size=1) as s:
            assert [(c["name"], c["kind"], c["chunks"]) for c in s.collections()] == [("old", "owned", 1)]
            hits = s.search(
                "old", np.array([1, 0], dtype=np.float32), 5, filter=parse_filter({"metadata": {"a": 1}})
            )
            assert [h["id"] for h in hits] == ["c"]
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
