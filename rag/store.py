"""pgvector store: schema and migrations, ingest (COPY), dense search. All SQL lives in this module.

Each collection gets its own pair of tables, ``rag_docs_<name>`` and ``rag_chunks_<name>``, with its own
HNSW index (``vector_cosine_ops``) and its own vector dimension, recorded in ``rag_collections``. A
collection per table keeps filtered-search problems away: HNSW scans only the collection's own rows, so
``LIMIT k`` really returns ``k`` rows.

pgvector's ``hnsw.ef_search`` defaults to 40, which silently caps ``LIMIT 100`` at 40 rows; every search
sets it per transaction to ``max(hnsw_ef_search_min, k * hnsw_ef_search_factor)`` (at most 1000).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from rag.errors import (
    CollectionError,
    DimensionMismatch,
    InvalidInput,
    StoreUnavailable,
    redact_url,
    validate_collection_name,
)

__all__ = ["SCHEMA_VERSION", "AsyncStore", "ChunkRow", "DocumentRow", "Store", "WriteStats"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE IF NOT EXISTS rag_collections (
        name                 text PRIMARY KEY,
        dim                  integer NOT NULL,
        embedding_model      text NOT NULL,
        hnsw_m               integer NOT NULL,
        hnsw_ef_construction integer NOT NULL,
        created_at           timestamptz NOT NULL DEFAULT now()
    );
    """,
}

_SEARCH_COLS = "id, doc_id, source, chunk_index, content, metadata"


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


def _tables(collection: str) -> tuple[sql.Identifier, sql.Identifier]:
    validate_collection_name(collection)
    return sql.Identifier(f"rag_docs_{collection}"), sql.Identifier(f"rag_chunks_{collection}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def _unavailable(url: str, err: BaseException) -> StoreUnavailable:
    return StoreUnavailable(
        f"cannot reach PostgreSQL at {redact_url(url)}: {_first_line(err)}. "
        "Start the embedded database with `rag db start` (used when RAG_DATABASE_URL is unset), "
        "or fix RAG_DATABASE_URL."
    )


def _search_sql(collection: str) -> sql.Composed:
    _, chunks = _tables(collection)
    return sql.SQL(
        "SELECT " + _SEARCH_COLS + ", 1 - (embedding <=> %(q)s) AS dense_score "
        "FROM {} ORDER BY embedding <=> %(q)s LIMIT %(k)s"
    ).format(chunks)


def _ef_search(k: int, floor: int, factor: float) -> str:
    """hnsw.ef_search for a query of ``k``: at least k (else pgvector returns fewer rows), times a margin."""
    return str(min(MAX_EF_SEARCH, max(floor, k, int(k * factor))))


def _rows_to_dicts(rows: Sequence[tuple]) -> list[dict[str, Any]]:
    return [
        {
            "id": r[0],
            "doc_id": r[1],
            "source": r[2],
            "chunk_index": r[3],
            "content": r[4],
            "metadata": r[5] or {},
            "dense_score": float(r[6]),
        }
        for r in rows
    ]


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1 or k > MAX_EF_SEARCH:
        raise InvalidInput(f"k must be an integer between 1 and {MAX_EF_SEARCH}, got {k!r}")


def _check_vector(vec: np.ndarray, dim: int, collection: str) -> np.ndarray:
    v = np.asarray(vec, dtype=np.float32).reshape(-1)
    if v.shape[0] != dim:
        raise DimensionMismatch(
            f"collection {collection!r} stores {dim}-dimension vectors but got a {v.shape[0]}-dimension "
            "query vector: query with the embedding model the collection was built with, or ingest into "
            "another --collection"
        )
    return v


class Store:
    """Synchronous store over a psycopg connection pool (``configure=register_vector``)."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        timeout_s: float = 5.0,
        ef_search_min: int = 40,
        ef_search_factor: float = 1.5,
        hnsw_m: int = 16,
        hnsw_ef_construction: int = 64,
    ) -> None:
        from pgvector.psycopg import register_vector

        self.url = url
        self.ef_search_min = ef_search_min
        self.ef_search_factor = ef_search_factor
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construction = hnsw_ef_construction
        self._dims: dict[str, int] = {}
        migrate(url, timeout_s=timeout_s)
        self.pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            configure=register_vector,
            kwargs={"connect_timeout": max(1, int(timeout_s))},
            open=False,
            name="rag-store",
        )
        try:
            self.pool.open(wait=True, timeout=timeout_s)
        except PoolTimeout as e:
            raise _unavailable(url, e) from e

    # -- plumbing ---------------------------------------------------------------------------------
    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        try:
            with self.pool.connection() as conn:
                yield conn
        except (PoolTimeout, psycopg.OperationalError) as e:
            raise _unavailable(self.url, e) from e

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        """psycopg_pool's ``get_stats()``: ready-made gauges (pool_size, pool_available, ...)."""
        return dict(self.pool.get_stats())

    # -- collections -------------------------------------------------------------------------------
    def collections(self) -> list[dict[str, Any]]:
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT name, dim, embedding_model, created_at FROM rag_collections ORDER BY name"
            ).fetchall()
            out = []
            for name, dim, model, created in rows:
                docs, chunks = _tables(name)
                n_docs = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(docs)).fetchone()[0]
                n_chunks = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(chunks)).fetchone()[0]
                out.append(
                    {
                        "name": name,
                        "dim": dim,
                        "embedding_model": model,
                        "documents": n_docs,
                        "chunks": n_chunks,
                        "created_at": created.isoformat(),
                    }
                )
            return out

    def collection_dim(self, collection: str) -> int:
        """The collection's vector dimension; CollectionError if it does not exist."""
        if collection in self._dims:
            return self._dims[collection]
        validate_collection_name(collection)
        with self.connection() as conn:
            row = conn.execute("SELECT dim FROM rag_collections WHERE name = %s", [collection]).fetchone()
        if row is None:
            raise CollectionError(
                f"collection {collection!r} does not exist: ingest into it first "
                f"(`rag ingest --collection {collection} PATH` or `rag ingest --demo`)"
            )
        self._dims[collection] = int(row[0])
        return self._dims[collection]

    def ensure_collection(self, collection: str, *, dim: int, embedding_model: str) -> None:
        """Create the collection's tables and index if needed; check its dimension if it exists."""
        docs, chunks = _tables(collection)
        with self.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('rag_collections'))")
            row = conn.execute(
                "SELECT dim, embedding_model FROM rag_collections WHERE name = %s", [collection]
            ).fetchone()
            if row is not None:
                if int(row[0]) != dim:
                    raise DimensionMismatch(
                        f"collection {collection!r} was built with {row[1]!r} "
                        f"({row[0]}-dimension vectors) but "
                        f"the embedding model produces {dim}: use the same model, another --collection, or "
                        f"drop it first (`rag db drop-collection {collection}`)"
                    )
                self._dims[collection] = dim
                return
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
            conn.execute(
                sql.SQL("CREATE INDEX {} ON {} (doc_id)").format(
                    sql.Identifier(f"rag_chunks_{collection}_doc"), chunks
                )
            )
            conn.execute(
                sql.SQL(
                    "CREATE INDEX {} ON {} USING hnsw (embedding vector_cosine_ops) "
                    "WITH (m = {}, ef_construction = {})"
                ).format(
                    sql.Identifier(f"rag_chunks_{collection}_hnsw"),
                    chunks,
                    sql.Literal(self.hnsw_m),
                    sql.Literal(self.hnsw_ef_construction),
                )
            )
            conn.execute(
                "INSERT INTO rag_collections (name, dim, embedding_model, hnsw_m, hnsw_ef_construction) "
                "VALUES (%s, %s, %s, %s, %s)",
                [collection, dim, embedding_model, self.hnsw_m, self.hnsw_ef_construction],
            )
        self._dims[collection] = dim

    def drop_collection(self, collection: str) -> bool:
        docs, chunks = _tables(collection)
        with self.connection() as conn, conn.transaction():
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(chunks))
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(docs))
            cur = conn.execute("DELETE FROM rag_collections WHERE name = %s", [collection])
        self._dims.pop(collection, None)
        return cur.rowcount > 0

    def count(self, collection: str) -> int:
        """Number of chunks in the collection (0 when it does not exist)."""
        try:
            self.collection_dim(collection)
        except CollectionError:
            return 0
        _, chunks = _tables(collection)
        with self.connection() as conn:
            return int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(chunks)).fetchone()[0])

    # -- ingest ----------------------------------------------------------------------------------
    def existing_hashes(self, collection: str, doc_ids: Sequence[str]) -> dict[str, str]:
        docs, _ = _tables(collection)
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
        dim = self.collection_dim(collection)
        if len(chunks) != len(embeddings):
            raise InvalidInput(f"{len(chunks)} chunks but {len(embeddings)} embeddings")
        if len(chunks) and embeddings.shape[1] != dim:
            raise DimensionMismatch(
                f"collection {collection!r} stores {dim}-dimension vectors, the embeddings have "
                f"{embeddings.shape[1]}: ingest with the collection's embedding model or another --collection"
            )
        docs_t, chunks_t = _tables(collection)
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
        return stats

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

    # -- search ----------------------------------------------------------------------------------
    def search(self, collection: str, vector: np.ndarray, k: int, *, exact: bool = False) -> list[dict]:
        """The ``k`` nearest chunks by cosine distance, best first, with ``dense_score = 1 - distance``."""
        _check_k(k)
        v = _check_vector(vector, self.collection_dim(collection), collection)
        with self.connection() as conn, conn.transaction():
            ef = _ef_search(k, self.ef_search_min, self.ef_search_factor)
            conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", [ef])
            if exact:
                conn.execute("SET LOCAL enable_indexscan = off")
            rows = conn.execute(_search_sql(collection), {"q": v, "k": k}).fetchall()
        return _rows_to_dicts(rows)


class AsyncStore:
    """Search-only async store for Serve replicas: one ``AsyncConnectionPool`` per replica."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        timeout_s: float = 5.0,
        ef_search_min: int = 40,
        ef_search_factor: float = 1.5,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.ef_search_min = ef_search_min
        self.ef_search_factor = ef_search_factor
        self._dims: dict[str, int] = {}
        self.pool = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            open=False,
            configure=_configure_async,
            kwargs={"connect_timeout": max(1, int(timeout_s))},
            name="rag-async",
        )

    async def open(self) -> None:
        try:
            await self.pool.open(wait=True, timeout=self.timeout_s)
        except PoolTimeout as e:
            raise _unavailable(self.url, e) from e

    async def close(self) -> None:
        await self.pool.close()

    def stats(self) -> dict[str, int]:
        return dict(self.pool.get_stats())

    @asynccontextmanager
    async def connection(self):  # type: ignore[no-untyped-def]
        try:
            async with self.pool.connection() as conn:
                yield conn
        except (PoolTimeout, psycopg.OperationalError) as e:
            raise _unavailable(self.url, e) from e

    async def ping(self) -> None:
        async with self.connection() as conn:
            await conn.execute("SELECT 1")

    async def collection_dim(self, collection: str) -> int:
        if collection not in self._dims:
            validate_collection_name(collection)
            async with self.connection() as conn:
                cur = await conn.execute("SELECT dim FROM rag_collections WHERE name = %s", [collection])
                row = await cur.fetchone()
            if row is None:
                raise CollectionError(
                    f"collection {collection!r} does not exist: ingest into it first "
                    f"(`rag ingest --collection {collection} PATH` or `rag ingest --demo`)"
                )
            self._dims[collection] = int(row[0])
        return self._dims[collection]

    async def search(self, collection: str, vector: np.ndarray, k: int) -> list[dict]:
        _check_k(k)
        v = _check_vector(vector, await self.collection_dim(collection), collection)
        async with self.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT set_config('hnsw.ef_search', %s, true)",
                [_ef_search(k, self.ef_search_min, self.ef_search_factor)],
            )
            cur = await conn.execute(_search_sql(collection), {"q": v, "k": k})
            rows = await cur.fetchall()
        return _rows_to_dicts(rows)


async def _configure_async(conn: psycopg.AsyncConnection) -> None:
    from pgvector.psycopg import register_vector_async

    await register_vector_async(conn)


def migrate(url: str, *, timeout_s: float = 5.0) -> int:
    """Create the pgvector extension and apply pending schema migrations. Returns the schema version."""
    try:
        conn = psycopg.connect(url, connect_timeout=max(1, int(timeout_s)), autocommit=True)
    except psycopg.OperationalError as e:
        raise _unavailable(url, e) from e
    with conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except (psycopg.errors.FeatureNotSupported, psycopg.errors.UndefinedFile) as e:  # no pgvector files
            raise StoreUnavailable(
                f"the vector extension is not installed on {redact_url(url)}: install pgvector on that "
                "server, or unset RAG_DATABASE_URL to use the embedded PostgreSQL (which has it)"
            ) from e
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('rag_schema'))")
            conn.execute("CREATE TABLE IF NOT EXISTS rag_schema (version integer NOT NULL)")
            row = conn.execute("SELECT max(version) FROM rag_schema").fetchone()
            current = row[0] or 0
            if current > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"the database schema is version {current}, newer than this code's {SCHEMA_VERSION}: "
                    "upgrade rag-serve"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                conn.execute(_MIGRATIONS[version])
                conn.execute("INSERT INTO rag_schema (version) VALUES (%s)", [version])
            return SCHEMA_VERSION
