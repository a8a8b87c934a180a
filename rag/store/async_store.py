"""``AsyncStore``: search only, for Serve replicas (one ``AsyncConnectionPool`` per replica).

It runs the same search policy as ``Store`` (``rag.store.search.plan_search``) over an async connection,
on owned collections and attached tables alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from rag.store.filters import SearchFilter, parse_filter
from rag.store.schema import REGISTRY_COLUMNS, SERVER_INFO_SQL, server_info_from_row, unavailable
from rag.store.search import SearchHits, Target, check_k, check_vector, ef_search, plan_search
from rag.store.tables import BROKEN, missing, table_changed, target_from_row
from rag.validation import validate_collection_name

__all__ = ["AsyncStore"]


async def _configure_async(conn: psycopg.AsyncConnection) -> None:
    from pgvector.psycopg import register_vector_async

    await register_vector_async(conn)


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
        filtered_ef_factor: float = 2.0,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.ef_search_min = ef_search_min
        self.ef_search_factor = ef_search_factor
        self.filtered_ef_factor = filtered_ef_factor
        self._targets: dict[str, Target] = {}
        self._server: dict[str, Any] | None = None
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
            raise unavailable(self.url, e) from e

    async def close(self, timeout_s: float = 5.0) -> None:
        """Close the pool, waiting at most ``timeout_s`` for its workers (0.1: a pool that never opened)."""
        await self.pool.close(timeout=timeout_s)

    async def check_reachable(self, timeout_s: float = 1.0) -> None:
        """Connect once, outside the pool: a stopped server refuses at once, where a pool request waits its
        whole ``timeout_s`` for a connection the pool cannot make. Then drop the pool's broken connections
        (a restarted server closed them). Raises ``StoreUnavailable``."""
        try:
            conn = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(self.url, connect_timeout=max(1, int(timeout_s))), timeout_s
            )
        except (psycopg.OperationalError, TimeoutError) as e:
            raise unavailable(self.url, e) from e
        await conn.close()
        if not self.pool.closed:
            await self.pool.check()

    def stats(self) -> dict[str, int]:
        return dict(self.pool.get_stats())

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        try:
            async with self.pool.connection() as conn:
                yield conn
        except (PoolTimeout, psycopg.OperationalError) as e:
            raise unavailable(self.url, e) from e

    async def ping(self) -> None:
        async with self.connection() as conn:
            await conn.execute("SELECT 1")

    async def server_info(self) -> dict[str, Any]:
        """``{"postgresql": "18.6", "pgvector": "0.8.1", "iterative_scan": True}``."""
        if self._server is None:
            async with self.connection() as conn:
                cur = await conn.execute(SERVER_INFO_SQL)
                self._server = server_info_from_row(await cur.fetchone())  # type: ignore[arg-type]
        return dict(self._server)

    async def target(self, collection: str) -> Target:
        t = self._targets.get(collection)
        if t is not None:
            return t
        validate_collection_name(collection)
        async with self.connection() as conn:
            cur = await conn.execute(
                f"SELECT {REGISTRY_COLUMNS} FROM rag_collections WHERE name = %s", [collection]
            )
            row = await cur.fetchone()
        if row is None:
            raise missing(collection)
        self._targets[collection] = t = target_from_row(row)
        return t

    async def collection_dim(self, collection: str) -> int:
        return (await self.target(collection)).dim

    async def search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int,
        *,
        filter: SearchFilter | Mapping[str, Any] | None = None,
    ) -> SearchHits:
        """As ``Store.search``: ``k`` rows whenever ``k`` match, ``.strategy`` says which path ran."""
        check_k(k)
        filt = parse_filter(filter)
        t = await self.target(collection)
        v = check_vector(vector, t.dim, collection)
        if filt is not None:
            filt.to_sql(t.columns)
        iterative = bool((await self.server_info())["iterative_scan"])
        policy = plan_search(
            t,
            v,
            k,
            filt,
            exact=False,
            ef=ef_search(
                k,
                self.ef_search_min,
                self.ef_search_factor,
                self.filtered_ef_factor if filt is not None else 1.0,
            ),
            iterative=iterative,
        )
        try:
            async with self.connection() as conn, conn.transaction():
                rows: Any = None
                try:
                    while True:
                        step = policy.send(rows)
                        cur = await conn.execute(step.query, step.params or None)
                        rows = await cur.fetchall() if step.fetch else None
                except StopIteration as done:
                    return done.value
        except BROKEN as e:
            if t.kind != "attached":
                raise
            self._targets.pop(collection, None)
            raise table_changed(t, e) from e
