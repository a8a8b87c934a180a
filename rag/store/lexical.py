"""Lexical indexes: BM25 (pg_textsearch) where the server has it, PostgreSQL's full-text search elsewhere.

=========== ==========================================================================================
``bm25``    pg_textsearch's ``bm25`` index on a text column; rows ranked by ``col <@> to_bm25query(q,
            index)`` (the negated BM25 score, so ascending is best; k1 = 1.2, b = 0.75). The index scan
            computes its top ``LIMIT`` with Block-Max WAND and widens its own limit when a filter drops
            rows, so a filtered scan still fills ``LIMIT`` while matching rows remain.
``fts``     a ``tsvector`` column with a GIN index (every PostgreSQL has both): the rows that hold any
            query term, ranked by ``ts_rank(tsv, q, 1)``; exact by construction.
=========== ==========================================================================================

A natural-language question is never ANDed into nothing: BM25 sums the scores of the terms a row has, and the
FTS query is ``plainto_tsquery``'s lexemes joined by OR (``|``) instead of its AND (``&``).

Owned collections get their index with their tables (``owned_lexical_ddl``); attached tables are only read:
``detect`` finds a BM25 index or a tsvector column (or checks the one named with ``--lexical-column``).
``rag.store.hybrid`` builds the queries.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql

__all__ = [
    "LEXICAL_METHODS",
    "Detected",
    "LexicalIndex",
    "bm25_available",
    "detect",
    "owned_lexical_ddl",
    "owned_lexical_index",
]

LEXICAL_METHODS = ("bm25", "fts")
TSV_COLUMN = "tsv"  # an owned collection's generated tsvector column (fts only)
_TEXT_TYPES = {"text", "varchar", "bpchar"}
_CONFIG_IN_DEFAULT = re.compile(r"to_tsvector\('([^']+)'::regconfig")


@dataclass(frozen=True)
class LexicalIndex:
    """How a collection is searched lexically (recorded in ``rag_collections.lexical``).

    ``column`` is the text column a ``bm25`` index covers, or the ``tsvector`` column for ``fts``;
    ``index`` the BM25 index (schema-qualified for attached tables) or the GIN index (None: none, a scan);
    ``config`` the text search configuration: ``fts`` normalises the query with it, ``bm25`` reports it."""

    method: str
    column: str
    config: str
    index: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(obj: Mapping[str, Any] | None) -> LexicalIndex | None:
        if not obj:
            return None
        return LexicalIndex(str(obj["method"]), str(obj["column"]), str(obj["config"]), obj.get("index"))

    def describe(self) -> str:
        if self.method == "bm25":
            return f"BM25 index {self.index} on {self.column}"
        on = f"GIN index {self.index}" if self.index else "no index (a scan per query)"
        return f"full-text search on tsvector column {self.column} ({self.config}, {on})"


def bm25_available(conn: psycopg.Connection) -> bool:
    """Whether pg_textsearch is installed in this database (``migrate`` creates it where the server can)."""
    row = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_textsearch'").fetchone()
    return row is not None


def owned_lexical_index(collection: str, method: str, config: str) -> LexicalIndex:
    if method == "bm25":
        return LexicalIndex("bm25", "content", config, f"rag_chunks_{collection}_bm25")
    return LexicalIndex("fts", TSV_COLUMN, config, f"rag_chunks_{collection}_fts")


def owned_lexical_ddl(collection: str, lex: LexicalIndex) -> list[sql.Composable]:
    """The statements that give an owned collection's chunks table its lexical index (idempotent)."""
    chunks = sql.Identifier(f"rag_chunks_{collection}")
    index = sql.Identifier(str(lex.index))
    if lex.method == "bm25":
        return [
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {} ON {} USING bm25 (content) WITH (text_config = {})"
            ).format(index, chunks, sql.Literal(lex.config))
        ]
    return [
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} tsvector "
            "GENERATED ALWAYS AS (to_tsvector({}::regconfig, content)) STORED"
        ).format(chunks, sql.Identifier(TSV_COLUMN), sql.Literal(lex.config)),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING gin ({})").format(
            index, chunks, sql.Identifier(TSV_COLUMN)
        ),
    ]


@dataclass(frozen=True)
class Detected:
    """What an attached table offers for lexical search: the index to use (or None), and why."""

    lexical: LexicalIndex | None
    problem: str | None = None  # a hard error: a named --lexical-column that cannot serve
    warning: str | None = None  # usable, but something to fix (e.g. a tsvector column without a GIN index)
    notice: str | None = None  # nothing lexical: dense only


def _bm25_indexes(conn: psycopg.Connection, oid: int) -> list[tuple[str, str]]:
    """(index, column) of every valid single-column, non-partial BM25 index on the table."""
    return [
        (str(r[0]), str(r[1]))
        for r in conn.execute(
            "SELECT i.relname, a.attname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "JOIN pg_am am ON am.oid = i.relam "
            "JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0] "
            "WHERE x.indrelid = %s AND am.amname = 'bm25' AND x.indnatts = 1 AND x.indkey[0] <> 0 "
            "AND x.indpred IS NULL AND x.indisvalid ORDER BY i.relname",
            [oid],
        ).fetchall()
    ]


def _gin_index(conn: psycopg.Connection, oid: int, attnum: int) -> str | None:
    row = conn.execute(
        "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
        "JOIN pg_am am ON am.oid = i.relam WHERE x.indrelid = %s AND am.amname = 'gin' "
        "AND x.indnatts = 1 AND x.indkey[0] = %s AND x.indpred IS NULL AND x.indisvalid ORDER BY 1 LIMIT 1",
        [oid, attnum],
    ).fetchone()
    return str(row[0]) if row else None


def _tsvector_config(conn: psycopg.Connection, oid: int, attnum: int, default: str) -> str:
    """The configuration a generated tsvector column is built with (``to_tsvector('english'::regconfig,
    ...)``), else ``default``: the query must be normalised as the column was."""
    row = conn.execute(
        "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = %s AND adnum = %s", [oid, attnum]
    ).fetchone()
    m = _CONFIG_IN_DEFAULT.search(str(row[0])) if row else None
    return m.group(1) if m else default


def detect(
    conn: psycopg.Connection,
    *,
    oid: int,
    schema: str,
    label: str,
    columns: Mapping[str, tuple[str, int]],
    content_column: str,
    lexical_column: str | None,
    default_config: str,
) -> Detected:
    """The lexical index an attached table offers. Reads the catalog only.

    ``columns`` maps each column to (type name, attnum). Without ``lexical_column``: a BM25 index (on the
    content column first), else the one tsvector column (a GIN-indexed one first), else none."""
    bm25 = _bm25_indexes(conn, oid) if bm25_available(conn) else []

    def qualified(index: str) -> str:
        return sql.Identifier(schema, index).as_string(conn)

    def from_tsvector(col: str) -> Detected:
        attnum = columns[col][1]
        gin = _gin_index(conn, oid, attnum)
        lex = LexicalIndex("fts", col, _tsvector_config(conn, oid, attnum, default_config), gin)
        warning = None
        if gin is None:
            create = sql.SQL("CREATE INDEX ON {} USING gin ({});").format(
                sql.Identifier(*label.split(".", 1)), sql.Identifier(col)
            )
            warning = (
                f"{label}.{col} has no GIN index, so every lexical search scans the table: create one with "
                + create.as_string(conn)
            )
        return Detected(lex, warning=warning)

    if lexical_column is not None:
        if lexical_column not in columns:
            return Detected(None, problem=f"{label} has no column {lexical_column!r} for --lexical-column")
        typ = columns[lexical_column][0]
        if typ == "tsvector":
            return from_tsvector(lexical_column)
        named = [idx for idx, col in bm25 if col == lexical_column]
        if typ in _TEXT_TYPES and named:
            return Detected(
                LexicalIndex("bm25", lexical_column, _bm25_config(conn, named[0]), qualified(named[0]))
            )
        return Detected(
            None,
            problem=f"{label}.{lexical_column} is {typ} without a BM25 index: name a tsvector column, or "
            "a text column with a BM25 index (CREATE INDEX ON <table> USING bm25 (<column>) WITH "
            "(text_config = 'english'), where the server has pg_textsearch)",
        )
    if bm25:
        idx, col = next(((i, c) for i, c in bm25 if c == content_column), bm25[0])
        return Detected(LexicalIndex("bm25", col, _bm25_config(conn, idx), qualified(idx)))
    tsv = [c for c, (typ, _) in columns.items() if typ == "tsvector"]
    indexed = [c for c in tsv if _gin_index(conn, oid, columns[c][1])]
    pick = indexed if indexed else tsv
    if len(pick) == 1:
        return from_tsvector(pick[0])
    if pick:
        return Detected(
            None,
            notice=f"{label} has several tsvector columns ({', '.join(pick)}): dense only; name one with "
            "--lexical-column",
        )
    return Detected(
        None,
        notice=f"{label} has no BM25 index or tsvector column, so it is searched dense only (lexical and "
        "hybrid modes need one: add it, then attach again, or name it with --lexical-column)",
    )


def _bm25_config(conn: psycopg.Connection, index: str) -> str:
    """A BM25 index's ``text_config`` (its reloptions), for reports."""
    row = conn.execute(
        "SELECT option_value FROM pg_class c, pg_options_to_table(c.reloptions) "
        "WHERE c.relname = %s AND option_name = 'text_config'",
        [index],
    ).fetchone()
    return str(row[0]) if row else "english"
