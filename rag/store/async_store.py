"""``AsyncStore``: search only, for Serve replicas (one ``AsyncConnectionPool`` per replica).

It runs ``Store``'s programs (``rag.store.core``) over an async connection: ``adrive`` is ``drive`` with
``await``, on owned collections and attached tables alike, in every mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from rag.store.core import Program, StoreCore, T
from rag.store.filters import SearchFilter
from rag.store.schema import unavailable
from rag.store.search import SearchHits, Step, Target

__all__ = ["AsyncStore", "adrive"]


async def adrive(conn: psycopg.AsyncConnection, program: Program[T], step: Step) -> T:
    """``rag.store.store.drive`` over an async connection."""
    while True:
        try:
            try:
                cur = await conn.execute(step.query, step.params or None)
                rows = await cur.fetchall() if step.fetch else None
            except Exception as e:
                step = program.throw(e)
            else:
                step = program.send(rows)
        except StopIteration as done:
            return done.value


async def _configure_async(conn: psycopg.AsyncConnection) -> None:
    from pgvector.psycopg import register_vector_async

    await register_vector_async(conn)


class AsyncStore(StoreCore):
    """Search-only async store for Serve replicas: one ``AsyncConnectionPool`` per replica; ``open()`` it."""

    def __init__(self, url: str, **kw: Any) -> None:
        """``kw``: ``StoreCore``'s (pool sizes, timeout, ef_search rule, fusion)."""
        super().__init__(url, **kw)
        self.pool = AsyncConnectionPool(configure=_configure_async, **self.pool_kwargs("rag-async"))

    async def open(self, *, wait: bool = True) -> None:
        """Open the pool: ``wait`` for its first connections (StoreUnavailable after ``timeout_s``), or
        not (a read replica's pool: its connections come in the background, once the server answers)."""
        try:
            await self.pool.open(wait=wait, timeout=self.timeout_s)
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

    async def run(self, program: Program[T]) -> T:
        """Run a program in one transaction (none at all when it needs no statement)."""
        try:
            step = next(program)
        except StopIteration as done:
            return done.value
        async with self.connection() as conn, conn.transaction():
            return await adrive(conn, program, step)

    # -- reads (rag.store.core) -----------------------------------------------------------------------
    async def ping(self) -> None:
        await self.run(self.ping_program())

    async def server_info(self) -> dict[str, Any]:
        """``{"postgresql": "18.6", "pgvector": "0.8.1", "iterative_scan": True}``."""
        return await self.run(self.server_program())

    async def index_types(self) -> dict[str, str]:
        """Every collection's vector index type by name (``rag.store.indexes``)."""
        return await self.run(self.index_types_program())

    async def lexical_info(self) -> dict[str, Any]:
        """``{"lexical": "bm25" | "fts", "pg_textsearch": "1.0.0" | None}``: what the server offers."""
        return await self.run(self.lexical_program())

    async def dense_only_notices(self) -> list[str]:
        """One line per attached collection searched dense only (no lexical index)."""
        return await self.run(self.notices_program())

    async def target(self, collection: str) -> Target:
        return await self.run(self.target_program(collection))

    async def collection_dim(self, collection: str) -> int:
        return (await self.target(collection)).dim

    async def search(
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
        """As ``Store.search``: ``k`` rows whenever ``k`` match, ``.strategy`` says which path ran."""
        return await self.run(
            self.search_program(collection, vector, k, filter=filter, exact=exact, query=query, mode=mode)
        )
