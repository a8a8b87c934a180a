"""Lexical and hybrid search against a real PostgreSQL (pgvector, pg_textsearch): BM25 and built-in full-text
search, RRF fusion in SQL, filters on both sides, exactly k rows, the sync and async stores alike, ingest
idempotence and kills with the lexical index, and schema migration 3."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import psycopg
import pytest

from rag.errors import InvalidInput
from rag.ingest import Document, ingest
from rag.store import AsyncStore, Fusion, Store, parse_filter

# Short notes on five topics; a few hold exact identifiers that only the lexical side can match reliably.
NOTES = {
    "py": [
        "Lists grow with append and shrink with pop; slicing copies a range of items.",
        "A dictionary maps keys to values; get returns a default when the key is missing.",
        "The socket constant AF_INET selects IPv4 addresses for a new connection.",
        "Raise ValueError_E1234 when the argument has the right type but a bad value.",
    ],
    "aero": [
        "The boundary layer on a swept wing thickens toward the tip at high angles of attack.",
        "Shock waves over a transonic airfoil raise drag sharply near Mach one.",
        "Heat transfer to a hypersonic nose cone depends on the stagnation enthalpy.",
    ],
    "food": [
        "Simmer the onions in butter until golden, then add stock and reduce by half.",
        "Knead the dough for ten minutes and let it rise in a warm place.",
    ],
    "space": [
        "A neutron star is the collapsed core of a massive star after a supernova.",
        "Jupiter's great red spot is a storm larger than the Earth.",
    ],
    "money": [
        "Compound interest grows a deposit exponentially with the number of periods.",
        "An index fund tracks a market benchmark at a low fee.",
    ],
}
QUESTION = "why does the drag of an airfoil rise near the speed of sound"


def _docs(copies: int = 3) -> list[Document]:
    out = []
    for topic, texts in NOTES.items():
        for i, text in enumerate(texts):
            for c in range(copies):
                out.append(
                    Document(f"{topic}-{i}-{c}", f"{text} (note {c})", f"{topic}/{i}.txt", {"topic": topic})
                )
    return out


@pytest.fixture(scope="module")
def filled(store, embedder):
    import uuid

    name = "hyb_" + uuid.uuid4().hex[:10]
    ingest(_docs(), embedder=embedder, store=store, collection=name)
    yield name
    store.drop_collection(name)


def _rrf(dense: list[str], lexical: list[str], fusion: Fusion, k: int) -> list[str]:
    """RRF in Python: the order the SQL must produce (ties: dense rank, then lexical rank)."""
    big = 10**9
    rank_d = {h: r for r, h in enumerate(dense, 1)}
    rank_l = {h: r for r, h in enumerate(lexical, 1)}

    def score(h: str) -> float:
        s = fusion.dense_weight / (fusion.k + rank_d[h]) if h in rank_d else 0.0
        return s + (fusion.lexical_weight / (fusion.k + rank_l[h]) if h in rank_l else 0.0)

    ids = list(dict.fromkeys(dense + lexical))
    return sorted(ids, key=lambda h: (-score(h), rank_d.get(h, big), rank_l.get(h, big)))[:k]


def test_store_offers_bm25_and_owned_collections_get_it(store, filled):
    assert store.lexical_info() == {"lexical": "bm25", "pg_textsearch": "1.0.0"}
    lex = store.target(filled).lexical
    assert lex is not None and (lex.method, lex.column, lex.config) == ("bm25", "content", "english")
    listed = {c["name"]: c for c in store.collections()}
    assert listed[filled]["lexical"] == "bm25"


def test_an_exact_identifier_is_found_lexically(store, embedder, filled):
    q = "ValueError_E1234"
    hits = store.search(filled, embedder.embed_query(q), 5, query=q, mode="lexical")
    assert (
        hits.strategy in ("bm25", "bm25-scored") and len(hits) == 3
    )  # the three copies hold the term; nothing else does
    assert all("ValueError_E1234" in h["content"] for h in hits)
    assert [h["lexical_rank"] for h in hits] == [1, 2, 3]
    assert [h["fused_score"] for h in hits] == sorted((h["fused_score"] for h in hits), reverse=True)
    assert all(isinstance(h["dense_score"], float) for h in hits)  # still the cosine similarity


def test_a_question_is_not_anded_into_nothing(store, embedder, filled):
    hits = store.search(filled, embedder.embed_query(QUESTION), 5, query=QUESTION, mode="lexical")
    assert len(hits) == 5 and hits[0]["doc_id"].startswith(
        "aero-1-"
    )  # "drag", "airfoil" match; "why" etc. not


def test_hybrid_is_rrf_of_the_two_sides_in_one_statement(store, embedder, filled):
    fusion = store.fusion
    for q in (QUESTION, "AF_INET", "bake bread dough"):
        v = embedder.embed_query(q)
        k = 10
        depth = fusion.depth(k)
        dense = [h["id"] for h in store.search(filled, v, depth, mode="dense", exact=True)]
        lexical = [h["id"] for h in store.search(filled, v, depth, query=q, mode="lexical")]
        hits = store.search(filled, v, k, query=q, mode="hybrid", exact=True)
        assert hits.strategy in ("hybrid(exact, bm25)", "hybrid(exact, bm25-scored)") and len(hits) == k
        assert [h["id"] for h in hits] == _rrf(dense, lexical, fusion, k), q
        for h in hits:
            lrank = lexical.index(h["id"]) + 1 if h["id"] in lexical else None
            assert h["lexical_rank"] == lrank
            drank = dense.index(h["id"]) + 1
            assert h["fused_score"] == pytest.approx(1 / (60 + drank) + (1 / (60 + lrank) if lrank else 0))
        assert {"id", "content", "source", "dense_score", "doc_id", "chunk_index", "metadata"} <= set(hits[0])


def test_hybrid_finds_the_identifier_dense_ranks_low(store, embedder, filled):
    q = "AF_INET"
    v = embedder.embed_query(q)
    dense = store.search(filled, v, 3, mode="dense")
    hybrid = store.search(filled, v, 3, query=q, mode="hybrid")
    assert any("AF_INET" in h["content"] for h in hybrid)
    assert sum("AF_INET" in h["content"] for h in hybrid) >= sum("AF_INET" in h["content"] for h in dense)


@pytest.mark.parametrize("mode", ["lexical", "hybrid"])
def test_filters_apply_to_both_sides(store, embedder, filled, mode):
    for raw, q, ok in (
        ({"metadata": {"topic": "aero"}}, QUESTION, lambda h: h["metadata"]["topic"] == "aero"),
        ({"source": {"prefix": "py/"}}, "AF_INET sockets", lambda h: h["source"].startswith("py/")),
        (
            {"doc_id": {"in": ["food-0-0", "food-1-2"]}},
            "dough",
            lambda h: h["doc_id"] in ("food-0-0", "food-1-2"),
        ),
    ):
        hits = store.search(filled, embedder.embed_query(q), 8, filter=raw, query=q, mode=mode)
        assert hits and all(ok(h) for h in hits), (raw, [h["doc_id"] for h in hits])
        if mode == "lexical":
            assert all(h["lexical_rank"] is not None for h in hits)


def test_hybrid_returns_exactly_k_whenever_k_rows_match(store, embedder, filled):
    v = embedder.embed_query("bake bread dough")
    n = store.count(filled)
    assert len(store.search(filled, v, n, query="bake bread dough", mode="hybrid")) == n
    assert len(store.search(filled, v, n + 5, query="bake bread dough", mode="hybrid")) == n
    f = parse_filter({"metadata": {"topic": "space"}})  # 6 rows, none holds a query term
    hits = store.search(filled, v, 5, filter=f, query="bake bread dough", mode="hybrid")
    assert len(hits) == 5 and all(h["lexical_rank"] is None for h in hits)
    assert len(store.search(filled, v, 50, filter=f, query="bake bread dough", mode="hybrid")) == 6
    # lexical alone: only the rows that hold a term
    assert store.search(filled, v, 5, filter=f, query="bake bread dough", mode="lexical") == []


def test_mode_and_query_are_checked(store, embedder, filled):
    v = embedder.embed_query("x")
    with pytest.raises(InvalidInput, match="mode must be one of dense, lexical, hybrid"):
        store.search(filled, v, 5, query="x", mode="sparse")
    with pytest.raises(InvalidInput, match='mode "hybrid" needs the query text'):
        store.search(filled, v, 5, mode="hybrid")
    with pytest.raises(InvalidInput, match="NUL"):
        store.search(filled, v, 5, query="a\x00b", mode="lexical")
    assert store.search(filled, v, 5, query="the of and", mode="lexical") == []  # stop words only


def test_full_text_search_where_there_is_no_bm25(db_url, embedder):
    import uuid

    with Store(db_url, max_size=2, lexical_index="fts") as fts:
        name = "fts_" + uuid.uuid4().hex[:10]
        ingest(_docs(1), embedder=embedder, store=fts, collection=name)
        try:
            lex = fts.target(name).lexical
            assert lex is not None and (lex.method, lex.column) == ("fts", "tsv")
            v = embedder.embed_query(QUESTION)
            hits = fts.search(name, v, 3, query=QUESTION, mode="lexical")
            # an OR query: the note with "airfoil", "drag" and "near" first, then the one that only says "rise"
            assert hits.strategy == "fts" and [h["doc_id"] for h in hits] == ["aero-1-0", "food-1-0"]
            assert [h["lexical_rank"] for h in hits] == [1, 2]
            hyb = fts.search(name, v, 5, query=QUESTION, mode="hybrid")
            assert hyb.strategy.startswith("hybrid(") and hyb.strategy.endswith(", fts)") and len(hyb) == 5
            f = parse_filter({"metadata": {"topic": "py"}})
            assert all(
                h["metadata"]["topic"] == "py"
                for h in fts.search(name, v, 5, filter=f, query="AF_INET", mode="hybrid")
            )
        finally:
            fts.drop_collection(name)


def test_async_store_runs_the_same_programs(db_url, store, embedder, filled):
    v = embedder.embed_query(QUESTION)
    f = {"metadata": {"topic": "aero"}}

    async def go():
        s = AsyncStore(db_url, max_size=2)
        await s.open()
        try:
            return [
                await s.search(filled, v, 6, query=QUESTION, mode=m, filter=f)
                for m in ("dense", "lexical", "hybrid")
            ]
        finally:
            await s.close()

    got = asyncio.run(go())
    want = [
        store.search(filled, v, 6, query=QUESTION, mode=m, filter=f) for m in ("dense", "lexical", "hybrid")
    ]
    assert [list(g) for g in got] == [list(w) for w in want]
    assert [g.strategy for g in got] == [w.strategy for w in want]


def test_reingest_is_idempotent_with_the_lexical_index(store, embedder, collection):
    ingest(_docs(1), embedder=embedder, store=store, collection=collection)
    v = embedder.embed_query("AF_INET")
    before = store.search(collection, v, 5, query="AF_INET", mode="lexical")
    rep = ingest(_docs(1), embedder=embedder, store=store, collection=collection)
    assert (rep.documents_added, rep.chunks_added) == (0, 0)
    assert store.search(collection, v, 5, query="AF_INET", mode="lexical") == before
    changed = Document(
        "py-2-0", "The constant SOCK_DGRAM selects datagram sockets.", "py/2.txt", {"topic": "py"}
    )
    assert ingest([changed], embedder=embedder, store=store, collection=collection).documents_replaced == 1
    assert store.search(collection, v, 5, query="AF_INET", mode="lexical") == []  # the old text is gone
    hits = store.search(collection, v, 5, query="SOCK_DGRAM", mode="lexical")
    assert [h["doc_id"] for h in hits] == ["py-2-0"]


KILLED_INGEST = textwrap.dedent(
    """
    import os, signal, sys
    from rag.embed import Embedder
    from rag.ingest import Document, ingest
    from rag.store import Store

    url, name = sys.argv[1], sys.argv[2]
    store = Store(url, max_size=1)
    copy = Store._copy_chunks

    class Dying(list):  # the process dies half-way through the chunks' COPY, its transaction open
        def __iter__(self):
            for i, c in enumerate(list.__iter__(self)):
                if i == len(self) // 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield c

    Store._copy_chunks = lambda self, cur, table, chunks, *a: copy(self, cur, table, Dying(chunks), *a)
    emb = Embedder("sentence-transformers/all-MiniLM-L6-v2", dtype="float32", offline=True)
    doc = Document("long", " ".join(["zanzibarquux is a word only this document holds."] * 200), "long.txt")
    ingest([doc], embedder=emb, store=store, collection=name, chunk_tokens=64)
    """
)


def test_a_killed_ingest_leaves_no_half_written_document(db_url, store, embedder, collection):
    ingest(_docs(1), embedder=embedder, store=store, collection=collection)
    before = store.count(collection)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-c", KILLED_INGEST, db_url, collection], env=env, capture_output=True, timeout=600
    )
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    assert store.count(collection) == before and store.existing_hashes(collection, ["long"]) == {}
    v = embedder.embed_query("zanzibarquux")
    assert store.search(collection, v, 5, query="zanzibarquux", mode="lexical") == []
    long_doc = Document(
        "long", " ".join(["zanzibarquux is a word only this document holds."] * 200), "long.txt"
    )
    rep = ingest([long_doc], embedder=embedder, store=store, collection=collection, chunk_tokens=64)
    assert rep.documents_added == 1
    hits = store.search(collection, v, 100, query="zanzibarquux", mode="lexical")
    assert len(hits) == rep.chunks_added > 5 and {h["doc_id"] for h in hits} == {"long"}


def test_schema_2_collections_get_their_lexical_index_by_migration(db_url, embedder):
    import uuid

    from psycopg.conninfo import make_conninfo

    from rag.store.schema import _MIGRATIONS

    dbname = "rag_mig3_" + uuid.uuid4().hex[:8]
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {dbname}")
    url = make_conninfo(db_url, dbname=dbname)
    try:
        with psycopg.connect(url, autocommit=True) as c:  # what schema 2 left behind: one owned collection
            c.execute("CREATE EXTENSION vector")
            c.execute("CREATE TABLE rag_schema (version integer NOT NULL)")
            c.execute(_MIGRATIONS[1])
            c.execute(_MIGRATIONS[2])
            c.execute("INSERT INTO rag_schema VALUES (1), (2)")
            c.execute("CREATE TABLE rag_docs_old (doc_id text PRIMARY KEY, source text NOT NULL)")
            c.execute(
                "CREATE TABLE rag_chunks_old (id text PRIMARY KEY, doc_id text NOT NULL, source text NOT NULL,"
                " chunk_index integer NOT NULL, content text NOT NULL, metadata jsonb NOT NULL DEFAULT '{}',"
                " content_hash text NOT NULL, embedding vector(384) NOT NULL)"
            )
            texts = [t for ts in NOTES.values() for t in ts]
            vecs = embedder.embed_documents(texts)
            for i, (t, e) in enumerate(zip(texts, vecs, strict=True)):
                c.execute("INSERT INTO rag_docs_old VALUES (%s, 's')", [f"d{i}"])
                c.execute(
                    "INSERT INTO rag_chunks_old VALUES (%s, %s, 's', 0, %s, '{}', 'h', %s::vector)",
                    [f"c{i}", f"d{i}", t, str(list(map(float, e)))],
                )
            c.execute(
                "INSERT INTO rag_collections (name, dim, embedding_model, hnsw_m, hnsw_ef_construction) "
                "VALUES ('old', 384, 'm', 16, 64)"
            )
        with Store(url, max_size=1) as s:
            assert s.target("old").lexical.method == "bm25"
            v = embedder.embed_query("AF_INET")
            hits = s.search("old", v, 3, query="AF_INET", mode="lexical")
            assert len(hits) == 1 and "AF_INET" in hits[0]["content"]
            assert s.search("old", v, 3, query="AF_INET", mode="hybrid").strategy.endswith(
                (", bm25)", ", bm25-scored)")
            )
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def test_hnsw_path_of_the_dense_side_and_its_exact_fallback(store, collection):
    """A hybrid search on the HNSW index; with a filter too selective for it, the dense side runs exact."""
    from rag.store import ChunkRow, DocumentRow

    rng = np.random.default_rng(3)
    dim, n = 16, 3000
    store.ensure_collection(collection, dim=dim, embedding_model="synthetic")
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    docs = [DocumentRow(f"d{i}", "rare" if i % 500 == 0 else "common", f"h{i}") for i in range(n)]
    chunks = [
        ChunkRow(f"d{i}", f"d{i}", docs[i].source, 0, f"{words[i % 5]} item {i}", f"h{i}") for i in range(n)
    ]
    store.write_batch(collection, docs, chunks, vecs)
    with store.connection() as conn:
        conn.execute(f"ANALYZE rag_chunks_{collection}")
        conn.commit()
    hits = store.search(collection, vecs[0], 100, query="gamma", mode="hybrid")
    assert hits.strategy in ("hybrid(hnsw, bm25)", "hybrid(exact, bm25)") and len(hits) == 100  # BM25's index
    rare = store.search(collection, vecs[0], 20, query="gamma", mode="hybrid", filter={"source": "rare"})
    assert (
        len(rare) == 6 and rare.strategy.endswith((", bm25)", ", bm25-scored)")) and "exact" in rare.strategy
    )
