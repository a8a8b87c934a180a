"""``Store``: the synchronous store over a psycopg pool: owned collections, attached tables, dense search."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from rag.store.collections import OwnedCollections
from rag.store.filters import SearchFilter, parse_filter
from rag.store.schema import REGISTRY_COLUMNS, SERVER_INFO_SQL, migrate, server_info_from_row, unavailable
from rag.store.search import SearchHits, Target, check_k, check_vector, ef_search, plan_search
from rag.store.tables import BROKEN, AttachedTables, missing, table_changed, target_from_row
from rag.validation import validate_collection_name

__all__ = ["Store"]


class Store(OwnedCollections, AttachedTables):
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
        filtered_ef_factor: float = 2.0,
        hnsw_m: int = 16,
        hnsw_ef_construction: int = 64,
    ) -> None:
        from pgvector.psycopg import register_vector

        self.url = url
        self.ef_search_min = ef_search_min
        self.ef_search_factor = ef_search_factor
        self.filtered_ef_factor = filtered_ef_factor
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construction = hnsw_ef_construction
        self._targets: dict[str, Target] = {}
        self._server: dict[str, Any] | None = None
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
            raise unavailable(url, e) from e

    # -- plumbing ---------------------------------------------------------------------------------
    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        try:
            with self.pool.connection() as conn:
                yield conn
        except (PoolTimeout, psycopg.OperationalError) as e:
            raise unavailable(self.url, e) from e

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        """psycopg_pool's ``get_stats()``: ready-made gauges (pool_size, pool_available, ...)."""
        return dict(self.pool.get_stats())

    def server_info(self) -> dict[str, Any]:
        """``{"postgresql": "18.6", "pgvector": "0.8.1", "iterative_scan": True}``."""
        if self._server is None:
            with self.connection() as conn:
                self._server = server_info_from_row(conn.execute(SERVER_INFO_SQL).fetchone())
        return dict(self._server)

    # -- collections -------------------------------------------------------------------------------
    def target(self, collection: str) -> Target:
        """Where ``collection`` lives (owned or attached); CollectionError if it does not exist."""
        t = self._targets.get(collection)
        if t is not None:
            return t
        validate_collection_name(collection)
        with self.connection() as conn:
            row = conn.execute(
                f"SELECT {REGISTRY_COLUMNS} FROM rag_collections WHERE name = %s", [collection]
            ).fetchone()
        if row is None:
            raise missing(collection)
        self._targets[collection] = t = target_from_row(row)
        return t

    def collection_dim(self, collection: str) -> int:
        """The collection's vector dimension (for an attached table, its embedding column's);
        CollectionError if it does not exist."""
        return self.target(collection).dim

    def collections(self) -> list[dict[str, Any]]:
        """Every collection, owned and attached (``kind``), with its size."""
        with self.connection() as conn:
            rows = conn.execute(f"SELECT {REGISTRY_COLUMNS} FROM rag_collections ORDER BY name").fetchall()
            out = []
            for row in rows:
                t = target_from_row(row)
                try:
                    with conn.transaction():  # a savepoint: an attached table may have gone
                        n_chunks = conn.execute(
                            sql.SQL("SELECT count(*) FROM {}").format(t.table)
                        ).fetchone()[0]
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
                }
                if t.kind == "owned":
                    docs = sql.Identifier(f"rag_docs_{t.name}")
                    entry["documents"] = conn.execute(
                        sql.SQL("SELECT count(*) FROM {}").format(docs)
                    ).fetchone()[0]
                else:
                    entry.update(
                        documents=n_chunks, table=t.label, distance=t.distance, columns=t.info["columns"]
                    )
                    if entry_error:
                        entry["error"] = entry_error
                out.append(entry)
            return out

    # -- search ----------------------------------------------------------------------------------
    def _iterative(self) -> bool:
        return bool(self.server_info()["iterative_scan"])

    def search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int,
        *,
        filter: SearchFilter | Mapping[str, Any] | None = None,
        exact: bool = False,
    ) -> SearchHits:
        """The ``k`` nearest rows (fewer only when fewer match ``filter``), best first, with
        ``dense_score`` (cosine: ``1 - distance``); ``.strategy`` says which path ran."""
        check_k(k)
        filt = parse_filter(filter)
        t = self.target(collection)
        v = check_vector(vector, t.dim, collection)
        if filt is not None:
            filt.to_sql(t.columns)  # a metadata filter on a table without metadata fails here, not in SQL
        policy = plan_search(
            t,
            v,
            k,
            filt,
            exact=exact,
            ef=ef_search(
                k,
                self.ef_search_min,
                self.ef_search_factor,
                self.filtered_ef_factor if filt is not None else 1.0,
            ),
            iterative=self._iterative(),
        )
        try:
            with self.connection() as conn, conn.transaction():
                rows: Any = None
                try:
                    while True:
                        step = policy.send(rows)
                        cur = conn.execute(step.query, step.params or None)
                        rows = cur.fetchall() if step.fetch else None
                except StopIteration as done:
                    return done.value
        except BROKEN as e:
            if t.kind != "attached":
                raise
            self._targets.pop(collection, None)
            raise table_changed(t, e) from e
