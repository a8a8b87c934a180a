"""Attached tables and lexical search: a BM25 index or a tsvector column is found (or named with
``--lexical-column``) and used by the lexical and hybrid modes; without either the table is searched dense
only and says so in one line; in every case the table is never written (rows, xmin, indexes, columns and
its file are the same before and after)."""

from __future__ import annotations

import pytest

from rag.errors import ConfigError, InvalidInput
from rag.ingest import iter_demo

QUERY = "TypeError"


def _snapshot(conn, table: str) -> tuple:
    """Everything a write would change: each row with its xmin, the columns, the indexes, the file."""
    rows = conn.execute(
        f"SELECT md5(coalesce(string_agg(xmin::text || ':' || ctid::text || ':' || t::text, '|' "
        f"ORDER BY ctid), '')), count(*) FROM {table} t"
    ).fetchone()
    cols = conn.execute(
        "SELECT column_name, data_type, is_nullable, column_default, generation_expression "
        "FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s ORDER BY 1",
        [table],
    ).fetchall()
    idx = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s ORDER BY 1", [table]).fetchall()
    node = conn.execute("SELECT pg_relation_filenode(%s::regclass)", [table]).fetchone()
    return rows, cols, idx, node


@pytest.fixture(scope="module")
def texts(embedder):
    seen, out = set(), []
    for d in iter_demo(limit=300):
        text = d.content[:300]
        if text not in seen:
            seen.add(text)
            out.append((text, d.source))
        if len(out) == 150:
            break
    vecs = embedder.embed_documents([t for t, _ in out])
    return [(t, s, v) for (t, s), v in zip(out, vecs, strict=True)]


@pytest.fixture
def make_table(store, texts):
    made = []

    def make(name: str, extra_sql: list[str]) -> str:
        with store.connection() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {name}")
            conn.execute(
                f"CREATE TABLE {name} (id bigserial PRIMARY KEY, content text NOT NULL, source text, "
                "embedding vector(384))"
            )
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {name} (content, source, embedding) VALUES (%s, %s, %s)", texts)
            conn.execute(f"CREATE INDEX ON {name} USING hnsw (embedding vector_cosine_ops)")
            for stmt in extra_sql:
                conn.execute(stmt.format(t=name))
            conn.execute(f"ANALYZE {name}")
            conn.commit()
        made.append(name)
        return name

    yield make
    with store.connection() as conn:
        for name in made:
            conn.execute(f"DROP TABLE IF EXISTS {name}")
        conn.commit()


def _searches(store, name, embedder) -> dict[str, list[str]]:
    v = embedder.embed_query(QUERY)
    out = {}
    for mode in ("dense", "lexical", "hybrid"):
        hits = store.search(name, v, 8, query=QUERY, mode=mode)
        out[mode] = [h["id"] for h in hits]
        out[mode + "_strategy"] = hits.strategy
        out[mode + "_hits"] = hits
    return out


@pytest.mark.parametrize(
    ("kind", "extra", "method"),
    [
        (
            "tsvector",
            [
                "ALTER TABLE {t} ADD COLUMN body_tsv tsvector "
                "GENERATED ALWAYS AS (to_tsvector('english', content)) STORED",
                "CREATE INDEX ON {t} USING gin (body_tsv)",
            ],
            "fts",
        ),
        (
            "bm25",
            ["CREATE INDEX {t}_bm25 ON {t} USING bm25 (content) WITH (text_config = 'english')"],
            "bm25",
        ),
    ],
)
def test_a_lexical_index_of_the_table_is_found_and_used(store, embedder, make_table, kind, extra, method):
    name = make_table(f"lex_{kind}", extra)
    with store.connection() as conn:
        before = _snapshot(conn, name)
    rep = store.attach(f"att_{kind}", name, embed_dim=embedder.dim)
    try:
        assert rep.lexical is not None and rep.lexical["method"] == method and rep.notices == []
        assert rep.warnings == []
        if method == "fts":
            assert (rep.lexical["column"], rep.lexical["config"]) == (
                "body_tsv",
                "english",
            )  # read off the column
        got = _searches(store, f"att_{kind}", embedder)
        assert got["lexical_strategy"].startswith(method) and f", {method}" in got["hybrid_strategy"]
        lexical = got["lexical_hits"]
        assert lexical and all("TypeError" in h["content"] for h in lexical)
        # the identifier's chunk: dense ranks it low, the lexical side first, hybrid in its top 8
        target = lexical[0]["id"]
        assert target not in got["dense"] and target in got["hybrid"]
        f = {"source": {"prefix": "python3.11/ast"}}
        hits = store.search(
            f"att_{kind}", embedder.embed_query(QUERY), 5, query=QUERY, mode="hybrid", filter=f
        )
        assert hits and all(h["source"].startswith("python3.11/ast") for h in hits)
        assert store.validate_attached(embedder.dim) == [] and store.dense_only_notices() == []
    finally:
        store.detach(f"att_{kind}")
    with store.connection() as conn:
        assert _snapshot(conn, name) == before


def test_without_a_lexical_index_the_table_is_dense_only_and_says_so(store, embedder, make_table):
    name = make_table("lex_none", [])
    with store.connection() as conn:
        before = _snapshot(conn, name)
    rep = store.attach("att_none", name, embed_dim=embedder.dim)
    try:
        assert rep.lexical is None and rep.warnings == []
        assert (
            len(rep.notices) == 1 and "searched dense only" in rep.notices[0] and "\n" not in rep.notices[0]
        )
        assert any("'att_none'" in n and "dense only" in n for n in store.dense_only_notices())
        v = embedder.embed_query(QUERY)
        hybrid = store.search("att_none", v, 8, query=QUERY, mode="hybrid")
        dense = store.search("att_none", v, 8, mode="dense")
        assert list(hybrid) == list(dense) and hybrid.strategy == dense.strategy
        with pytest.raises(
            InvalidInput, match='no lexical index.*mode "dense" or "hybrid".*--lexical-column'
        ):
            store.search("att_none", v, 8, query=QUERY, mode="lexical")
    finally:
        store.detach("att_none")
    with store.connection() as conn:
        assert _snapshot(conn, name) == before


def test_lexical_column_names_the_column_or_fails_naming_the_fix(store, embedder, make_table):
    name = make_table(
        "lex_named",
        [
            "ALTER TABLE {t} ADD COLUMN a_tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', content)) STORED",
            "ALTER TABLE {t} ADD COLUMN b_tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', source)) STORED",
        ],
    )
    with store.connection() as conn:
        before = _snapshot(conn, name)
    try:
        rep = store.attach("att_named", name, embed_dim=embedder.dim)  # two candidates: neither is guessed
        assert rep.lexical is None and "several tsvector columns" in rep.notices[0]
        rep = store.attach("att_named", name, embed_dim=embedder.dim, lexical_column="a_tsv")
        assert rep.lexical == {"method": "fts", "column": "a_tsv", "config": "simple", "index": None}
        assert any("no GIN index" in w and "CREATE INDEX" in w for w in rep.warnings)
        hits = store.search("att_named", embedder.embed_query(QUERY), 5, query=QUERY, mode="lexical")
        assert hits.strategy == "fts" and all("TypeError" in h["content"] for h in hits) and hits
        with pytest.raises(ConfigError, match="content is text without a BM25 index"):
            store.attach("att_named", name, embed_dim=embedder.dim, lexical_column="content")
        with pytest.raises(ConfigError, match="no column 'nope' for --lexical-column"):
            store.attach("att_named", name, embed_dim=embedder.dim, lexical_column="nope")
    finally:
        store.detach("att_named")
    with store.connection() as conn:
        assert _snapshot(conn, name) == before
