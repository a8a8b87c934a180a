"""``Store``: the synchronous store over a psycopg pool: owned collections, attached tables, search.

Its reads are ``rag.store.core`` programs run by ``drive``; ``AsyncStore`` runs the same programs with
``await``. What is here is the I/O: the pool, connections, the driver, and the writes (ingest, attach).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from rag.settings import DEFAULT_BINARY_RERANK_FACTOR, DEFAULT_INDEX_TYPE
from rag.store.attached import AttachedTables
from rag.store.collections import OwnedCollections
from rag.store.core import Program, StoreCore, T
from rag.store.filters import SearchFilter
from rag.store.hybrid import Fusion
from rag.store.indexes import check_index_type
from rag.store.schema import REGISTRY_COLUMNS, migrate, unavailable
from rag.store.search import SearchHits, Step, Target
from rag.store.tables import BROKEN, table_changed, target_from_row

__all__ = ["Store", "drive"]


def drive(conn: psycopg.Connection, program: Program[T], step: Step) -> T:
    """Run ``program`` from its first ``step`` on ``conn``: each statement's rows are sent back in, each
    error is thrown in (a program may answer it); returns the program's value."""
    while True:
        try:
            try:
                cur = conn.execute(step.query, step.params or None)
                rows = cur.fetchall() if step.fetch else None
            except Exception as e:
                step = program.throw(e)
            else:
                step = program.send(rows)
        except StopIteration as done:
            return done.value


class Store(StoreCore, OwnedCollections, AttachedTables):
    """Synchronous store over a psycopg connection pool (``configure=register_vector``).

    The constructor applies the schema migrations (``migrate``) and opens the pool; ``index_type`` (the
    vector index, ``rag.store.indexes``), ``lexical_index`` and ``text_search_config`` are what new owned
    collections (and, for the lexical ones, migrated ones) get."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        timeout_s: float = 5.0,
        ef_search_min: int = 40,
        ef_search_factor: float = 1.5,
        filtered_ef_factor: float = 2.0,
        hnsw_m: int = 16,
        hnsw_ef_construction: int = 64,
        index_type: str = DEFAULT_INDEX_TYPE,
        binary_rerank_factor: float = DEFAULT_BINARY_RERANK_FACTOR,
        lexical_index: str = "auto",
        text_search_config: str = "english",
        fusion: Fusion | None = None,
    ) -> None:
        from pgvector.psycopg import register_vector

        super().__init__(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout_s=timeout_s,
            ef_search_min=ef_search_min,
            ef_search_factor=ef_search_factor,
            filtered_ef_factor=filtered_ef_factor,
            fusion=fusion,
            binary_rerank_factor=binary_rerank_factor,
        )
        self.index_type = check_index_type(index_type)
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construction = hnsw_ef_construction
        self.lexical_index = lexical_index
        self.text_search_config = text_search_config
        migrate(url, timeout_s=timeout_s, lexical_index=lexical_index, text_search_config=text_search_config)
        self.pool = ConnectionPool(configure=register_vector, **self.pool_kwargs("rag-store"))
        try:
            self.pool.open(wait=True, timeout=timeout_s)
        except PoolTimeout as e:
            raise unavailable(url, e) from e

    # -- plumbing ---------------------------------------------------------------------------------
    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        try:
            with self.pool.connection() as conn:
                yield conn
        except (PoolTimeout, psycopg.OperationalError) as e:
            raise unavailable(self.url, e) from e

    def run(self, program: Program[T]) -> T:
        """Run a program in one transaction (none at all when it needs no statement)."""
        try:
            step = next(program)
        except StopIteration as done:
            return done.value
        with self.connection() as conn, conn.transaction():
            return drive(conn, program, step)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        """psycopg_pool's ``get_stats()``: ready-made gauges (pool_size, pool_available, ...)."""
        return dict(self.pool.get_stats())

    # -- reads (rag.store.core) -----------------------------------------------------------------------
    def server_info(self) -> dict[str, Any]:
        """``{"postgresql": "18.6", "pgvector": "0.8.1", "iterative_scan": True}``."""
        return self.run(self.server_program())

    def lexical_info(self) -> dict[str, Any]:
        """``{"lexical": "bm25" | "fts", "pg_textsearch": "1.0.0" | None}``: what the server offers."""
        return self.run(self.lexical_program())

    def dense_only_notices(self) -> list[str]:
        """One line per attached collection searched dense only (no lexical index): say them at start-up."""
        return self.run(self.notices_program())

    def target(self, collection: str) -> Target:
        """Where ``collection`` lives (owned or attached); CollectionError if it does not exist."""
        return self.run(self.target_program(collection))

    def index_types(self) -> dict[str, str]:
        """Every collection's vector index type by name (``hnsw``, ``halfvec``, ``binary``, ``diskann``)."""
        return self.run(self.index_types_program())

    def collection_dim(self, collection: str) -> int:
        """The collection's vector dimension (for an attached table, its embedding column's);
        CollectionError if it does not exist."""
        return self.target(collection).dim

    def search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int,
        *,
        filter: SearchFilter | Mapping[str, Any] | None = None,
        exact: bool = False,
        query: str | None = None,
        mode: str = "dense",
    ) -> SearchHits:
        """The ``k`` best rows (fewer only when fewer match ``filter``), best first, with ``dense_score``
        (cosine: ``1 - distance``); ``mode`` dense, lexical or hybrid (``query``: the text); ``.strategy``
        says which path ran."""
        return self.run(
            self.search_program(collection, vector, k, filter=filter, exact=exact, query=query, mode=mode)
        )

    def collections(self) -> list[dict[str, Any]]:
        """Every collection, owned and attached (``kind``), with its size and lexical index."""
        with self.connection() as conn:
            rows = conn.execute(f"SELECT {REGISTRY_COLUMNS} FROM rag_collections ORDER BY name").fetchall()
            return [self._describe(conn, row) for row in rows]

    def _describe(self, conn: psycopg.Connection, row: tuple[Any, ...]) -> dict[str, Any]:
        t = target_from_row(row)
        try:
            with conn.transaction():  # a savepoint: an attached table may have gone
                n_chunks = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t.table)).fetchone()[0]
        except BROKEN as e:
            if t.kind != "attached":
                raise
            n_chunks = None
            entry_error = str(table_changed(t, e))
        else:
            entry_error = None
        entry: dict[str, Any] = {
            "name": t.name,
            "kind": t.kind,
            "dim": t.dim,
            "embedding_model": row[3],
            "chunks": n_chunks,
            "created_at": row[5].isoformat(),
            "lexical": t.lexical.method if t.lexical else None,
            "index_type": t.index,
        }
        if t.kind == "owned":
            docs = sql.Identifier(f"rag_docs_{t.name}")
            entry["documents"] = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(docs)).fetchone()[0]
        else:
            entry.update(documents=n_chunks, table=t.label, distance=t.distance, columns=t.info["columns"])
            if entry_error:
                entry["error"] = entry_error
        return entry
