"""Owned collections: their schema, ingest writes (COPY, one transaction per batch) and idempotence.

Each collection gets its own pair of tables, ``rag_docs_<name>`` and ``rag_chunks_<name>``, with its own
vector index (``rag.store.indexes``: float32, halfvec or binary HNSW, or DiskANN; cosine) and its own vector
dimension, recorded in ``rag_collections``. A table per
collection means HNSW scans only the collection's own rows. Filters get their indexes too: a btree on
``source`` (``text_pattern_ops``: equality, IN and prefix), the ``doc_id`` btree and a GIN index on
``metadata`` (``jsonb_path_ops``: containment). And a lexical index for the lexical and hybrid modes
(``rag.store.lexical``): BM25 where the server has pg_textsearch, else a generated ``tsvector`` column with a
GIN index; either is written by PostgreSQL in the same transaction as the chunk rows, so ingest stays one
transaction per batch, idempotent and safe to kill.

Nothing here ever touches an attached table: every write path first checks the registry's ``kind``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from rag.errors import CollectionError, ConfigError, DimensionMismatch, InvalidInput
from rag.store.indexes import VECTORSCALE_FIX, check_index_type, index_ddl, index_name
from rag.store.lexical import LexicalIndex, owned_lexical_ddl, owned_lexical_index
from rag.store.schema import lexical_method
from rag.store.search import Target, owned_target
from rag.validation import validate_collection_name

__all__ = [
    "ChunkRow",
    "DocumentRow",
    "OwnedCollections",
    "WriteStats",
    "attached_refusal",
    "owned_tables",
    "require_vectorscale",
]


@dataclass(frozen=True)
class DocumentRow:
    doc_id: str
    source: str
    content_hash: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkRow:
    id: str
    doc_id: str
    source: str
    chunk_index: int
    content: str
    content_hash: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class WriteStats:
    documents_added: int = 0
    documents_replaced: int = 0
    documents_unchanged: int = 0
    chunks_added: int = 0


def owned_tables(collection: str) -> tuple[sql.Identifier, sql.Identifier]:
    validate_collection_name(collection)
    return sql.Identifier(f"rag_docs_{collection}"), sql.Identifier(f"rag_chunks_{collection}")


def attached_refusal(collection: str, table: str, what: str) -> CollectionError:
    return CollectionError(
        f"collection {collection!r} is an attached table ({table}), which rag reads and never writes, so "
        f"it cannot {what}: use an owned collection (--collection another_name), or "
        f"`rag detach {collection}` first (the table itself is left alone)"
    )


def require_vectorscale(conn: psycopg.Connection) -> None:
    """Create pgvectorscale's extension (DiskANN) if this server has it, else ConfigError naming the fix."""
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS vectorscale")
    except psycopg.Error as e:
        raise ConfigError(
            f"index type diskann needs the vectorscale extension (pgvectorscale), which this PostgreSQL "
            f"cannot create ({str(e).strip().splitlines()[0]}): {VECTORSCALE_FIX}"
        ) from e


class OwnedCollections:
    """Mixin of ``Store``: create, fill and drop owned collections."""

    connection: Callable[[], AbstractContextManager[psycopg.Connection]]
    _targets: dict[str, Target]
    hnsw_m: int
    hnsw_ef_construction: int
    index_type: str  # the vector index of new collections (rag.store.indexes)
    lexical_index: str  # auto | bm25 | fts
    text_search_config: str

    def target(self, collection: str) -> Target:  # provided by Store
        raise NotImplementedError

    def _refuse_attached(self, conn: psycopg.Connection, collection: str, what: str) -> None:
        row = conn.execute(
            "SELECT kind, attached FROM rag_collections WHERE name = %s", [collection]
        ).fetchone()
        if row is not None and row[0] == "attached":
            a = row[1] or {}
            raise attached_refusal(collection, f"{a.get('schema')}.{a.get('table')}", what)

    def ensure_collection(
        self, collection: str, *, dim: int, embedding_model: str, index_type: str | None = None
    ) -> None:
        """Create the collection's tables and indexes if needed; check its dimension if it exists.

        ``index_type``: its vector index (``rag.store.indexes``; None: the store's ``index_type``), chosen
        once, at creation: asking an existing collection for another is a ``CollectionError``. An attached
        collection is refused with ``CollectionError`` (``rag ingest`` never writes to one)."""
        docs, chunks = owned_tables(collection)
        kind = check_index_type(index_type or self.index_type)
        with self.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('rag_collections'))")
            self._refuse_attached(conn, collection, "be ingested into")
            row = conn.execute(
                "SELECT dim, embedding_model, lexical, index_type FROM rag_collections WHERE name = %s",
                [collection],
            ).fetchone()
            if row is not None:
                if index_type is not None and row[3] != index_type:
                    raise CollectionError(
                        f"collection {collection!r} has a {row[3]} index; a collection's index type is "
                        f"chosen when it is created: ingest into another --collection with --index-type "
                        f"{index_type}, or drop it first (`rag db drop-collection {collection}`)"
                    )
                if int(row[0]) != dim:
                    raise DimensionMismatch(
                        f"collection {collection!r} was built with {row[1]!r} "
                        f"({row[0]}-dimension vectors) but "
                        f"the embedding model produces {dim}: use the same model, another --collection, or "
                        f"drop it first (`rag db drop-collection {collection}`)"
                    )
                self._targets[collection] = owned_target(
                    collection, dim, LexicalIndex.from_json(row[2]), row[3]
                )
                return
            if kind == "diskann":
                require_vectorscale(conn)
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {docs} ("
                    " doc_id text PRIMARY KEY, source text NOT NULL, content_hash text NOT NULL,"
                    " n_chunks integer NOT NULL, metadata jsonb NOT NULL DEFAULT '{{}}',"
                    " ingested_at timestamptz NOT NULL DEFAULT now())"
                ).format(docs=docs)
            )
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {chunks} ("
                    " id text PRIMARY KEY,"
                    " doc_id text NOT NULL REFERENCES {docs}(doc_id) ON DELETE CASCADE,"
                    " source text NOT NULL, chunk_index integer NOT NULL, content text NOT NULL,"
                    " metadata jsonb NOT NULL DEFAULT '{{}}', content_hash text NOT NULL,"
                    " embedding vector({dim}) NOT NULL)"
                ).format(chunks=chunks, docs=docs, dim=sql.Literal(dim))
            )
            for suffix, spec in (
                ("doc", "(doc_id)"),
                ("source", "(source text_pattern_ops)"),
                ("meta", "USING gin (metadata jsonb_path_ops)"),
            ):
                conn.execute(
                    sql.SQL("CREATE INDEX {} ON {} " + spec).format(
                        sql.Identifier(f"rag_chunks_{collection}_{suffix}"), chunks
                    )
                )
            if kind != "diskann":  # DiskANN: built on the first rows written (see ``write_batch``)
                m, efc = self.hnsw_m, self.hnsw_ef_construction
                conn.execute(index_ddl(kind, collection, chunks, dim, m=m, ef_construction=efc))
            lex = owned_lexical_index(
                collection, lexical_method(conn, self.lexical_index), self.text_search_config
            )
            for stmt in owned_lexical_ddl(collection, lex):
                conn.execute(stmt)
            conn.execute(
                "INSERT INTO rag_collections"
                " (name, dim, embedding_model, hnsw_m, hnsw_ef_construction, lexical, index_type)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [
                    collection,
                    dim,
                    embedding_model,
                    self.hnsw_m,
                    self.hnsw_ef_construction,
                    Jsonb(lex.as_json()),
                    kind,
                ],
            )
        self._targets[collection] = owned_target(collection, dim, lex, kind)

    def build_lexical(self, collection: str, method: str) -> LexicalIndex:
        """Give an owned collection the lexical index ``method`` (bm25, fts) if it lacks it, and search with
        that one from now on (the other, if any, is left in place). Returns what is recorded."""
        t = self.target(collection)
        if t.kind != "owned":
            raise attached_refusal(collection, t.label, "be given a lexical index")
        with self.connection() as conn, conn.transaction():
            lex = owned_lexical_index(collection, lexical_method(conn, method), self.text_search_config)
            for stmt in owned_lexical_ddl(collection, lex):
                conn.execute(stmt)
            conn.execute(
                "UPDATE rag_collections SET lexical = %s WHERE name = %s", [Jsonb(lex.as_json()), collection]
            )
        self._targets.pop(collection, None)
        return lex

    def drop_collection(self, collection: str) -> bool:
        """Drop an owned collection and its tables. An attached one is refused (use ``detach``)."""
        docs, chunks = owned_tables(collection)
        with self.connection() as conn, conn.transaction():
            self._refuse_attached(conn, collection, "be dropped")
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(chunks))
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(docs))
            cur = conn.execute("DELETE FROM rag_collections WHERE name = %s AND kind = 'owned'", [collection])
        self._targets.pop(collection, None)
        return cur.rowcount > 0

    def count(self, collection: str) -> int:
        """Number of chunks (an attached table's rows) in the collection (0 when it does not exist)."""
        try:
            t = self.target(collection)
        except CollectionError:
            return 0
        with self.connection() as conn:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t.table)).fetchone()
        return int(row[0]) if row else 0

    # -- ingest ----------------------------------------------------------------------------------
    def existing_hashes(self, collection: str, doc_ids: Sequence[str]) -> dict[str, str]:
        docs, _ = owned_tables(collection)
        if self.target(collection).kind != "owned":
            return {}
        with self.connection() as conn:
            rows = conn.execute(
                sql.SQL("SELECT doc_id, content_hash FROM {} WHERE doc_id = ANY(%s)").format(docs),
                [list(doc_ids)],
            ).fetchall()
        return dict(rows)

    def write_batch(
        self,
        collection: str,
        documents: Sequence[DocumentRow],
        chunks: Sequence[ChunkRow],
        embeddings: np.ndarray,
    ) -> WriteStats:
        """Write documents and their chunks in one transaction, with COPY.

        A document whose ``doc_id`` exists with the same content hash is left alone; with another hash it
        is replaced (old chunks deleted). Either the whole batch lands or none of it does.
        """
        t = self.target(collection)
        if t.kind != "owned":
            raise attached_refusal(collection, t.label, "be written to")
        dim = t.dim
        if len(chunks) != len(embeddings):
            raise InvalidInput(f"{len(chunks)} chunks but {len(embeddings)} embeddings")
        if len(chunks) and embeddings.shape[1] != dim:
            raise DimensionMismatch(
                f"collection {collection!r} stores {dim}-dimension vectors, the embeddings have "
                f"{embeddings.shape[1]}: ingest with the collection's embedding model or another --collection"
            )
        docs_t, chunks_t = owned_tables(collection)
        stats = WriteStats()
        with self.connection() as conn, conn.transaction():
            # One writer per collection at a time: concurrent ingests of the same files stay idempotent.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"rag_ingest:{collection}"])
            ids = [d.doc_id for d in documents]
            existing = dict(
                conn.execute(
                    sql.SQL("SELECT doc_id, content_hash FROM {} WHERE doc_id = ANY(%s)").format(docs_t),
                    [ids],
                ).fetchall()
            )
            keep_docs = []
            replace = []
            for d in documents:
                old = existing.get(d.doc_id)
                if old == d.content_hash:
                    stats.documents_unchanged += 1
                    continue
                if old is not None:
                    replace.append(d.doc_id)
                keep_docs.append(d)
            stats.documents_replaced = len(replace)
            stats.documents_added = len(keep_docs) - len(replace)
            if not keep_docs:
                return stats
            if replace:
                conn.execute(sql.SQL("DELETE FROM {} WHERE doc_id = ANY(%s)").format(docs_t), [replace])
            wanted = {d.doc_id for d in keep_docs}
            n_chunks: dict[str, int] = {}
            for c in chunks:
                n_chunks[c.doc_id] = n_chunks.get(c.doc_id, 0) + 1
            with conn.cursor() as cur:
                with cur.copy(
                    sql.SQL("COPY {} (doc_id, source, content_hash, n_chunks, metadata) FROM STDIN").format(
                        docs_t
                    )
                ) as cp:
                    for d in keep_docs:
                        cp.write_row(
                            (d.doc_id, d.source, d.content_hash, n_chunks.get(d.doc_id, 0), Jsonb(d.metadata))
                        )
                self._copy_chunks(cur, chunks_t, chunks, embeddings, wanted, stats)
            if t.index == "diskann" and stats.chunks_added:
                self._diskann_on_first_rows(conn, collection, chunks_t, dim)
        return stats

    def _diskann_on_first_rows(
        self, conn: psycopg.Connection, collection: str, chunks: sql.Identifier, dim: int
    ) -> None:
        """Build a DiskANN collection's index over its first rows, in the batch's transaction. Its
        memory-optimized layout learns the vectors' quantization from the rows it is built on: built on an
        empty table and filled by inserts it found 6 % of the true top 50 (built on the first 100 of 3000
        rows and filled by inserts after: 92 %, as good as built on all of them)."""
        name = index_name(collection, "diskann")
        if conn.execute("SELECT to_regclass(%s)", [name]).fetchone()[0] is None:
            conn.execute(index_ddl("diskann", collection, chunks, dim))

    def _copy_chunks(
        self,
        cur: psycopg.Cursor,
        table: sql.Identifier,
        chunks: Sequence[ChunkRow],
        embeddings: np.ndarray,
        wanted: set[str],
        stats: WriteStats,
    ) -> None:
        with cur.copy(
            sql.SQL(
                "COPY {} (id, doc_id, source, chunk_index, content, metadata, content_hash, embedding) "
                "FROM STDIN WITH (FORMAT BINARY)"
            ).format(table)
        ) as cp:
            cp.set_types(["text", "text", "text", "int4", "text", "jsonb", "text", "vector"])
            for c, e in zip(chunks, embeddings, strict=True):
                if c.doc_id not in wanted:
                    continue
                cp.write_row(
                    (
                        c.id,
                        c.doc_id,
                        c.source,
                        c.chunk_index,
                        c.content,
                        Jsonb(c.metadata),
                        c.content_hash,
                        np.asarray(e, dtype=np.float32),
                    )
                )
                stats.chunks_added += 1
