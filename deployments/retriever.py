"""Retriever deployment: pgvector search with one async psycopg pool per replica (``rag.store.AsyncStore``).

The pool is opened at start-up. If the database is down then, the replica still starts (so ``/readyz`` can say
why it is not ready) and every call retries opening a fresh pool, failing fast with ``StoreUnavailable``.

Once a call found the database unreachable, the next calls first try one direct connection (a stopped server
refuses it at once) rather than each waiting the pool's whole timeout for a connection it cannot make; the
first that connects drops the pool's broken connections and lets traffic through again.

``search`` takes the stage-1 ``mode`` (dense, lexical, hybrid) and the query text with it; a caller that
passes neither gets dense search, as before modes existed. At start-up the replica logs one line per
attached collection searched dense only (no lexical index); ``info`` reports which lexical search the
server offers (BM25 or the built-in full-text search).

With ``database_read_urls`` set, searches go to those hot standbys (``rag.store.ReplicaSet``: least busy
first, each behind a breaker, the primary when none is healthy or when one fails mid-search); everything
else (readiness, ``info``'s server facts) asks the primary. Each standby's lag and state are exported as
``rag_db_replica_lag_seconds`` and ``rag_db_replica_up`` after every probe, and listed by ``info``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np
from ray import serve

from deployments import metrics
from rag.errors import StoreUnavailable
from rag.settings import StoreConfig, redact_url
from rag.store import AsyncStore, ReplicaSet, ReplicaStatus

__all__ = ["Retriever"]

log = logging.getLogger("ray.serve")

READY_PING_S = 1.5  # the ingress's ready_timeout_s defaults to 2 s

_GAUGES = {
    "rag_db_pool_size": "pool_size",
    "rag_db_pool_available": "pool_available",
    "rag_db_pool_max": "pool_max",
    "rag_db_requests_waiting": "requests_waiting",
}


@serve.deployment(name="Retriever", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5})
class Retriever:
    _down = False  # the last call found the database unreachable (see the module docstring)

    async def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._store: AsyncStore | None = None
        self._lock = asyncio.Lock()
        self._last_error: str | None = None
        self._replicas: ReplicaSet | None = None
        if config.read_urls():  # type: ignore[attr-defined]
            self._replicas = replica_set(config, on_probe=_record_replicas)
            await self._replicas.open()  # never raises: a standby that is down starts with its breaker open
        try:
            store = await self._get_store()
            for notice in await store.dense_only_notices():
                log.warning("%s", notice)
        except StoreUnavailable as e:
            log.warning("database not reachable at start-up (will retry per request): %s", e)
        # Pool gauges stay live while idle (the pool shrinks after max_idle), not only after a search.
        self._gauges = asyncio.get_running_loop().create_task(self._refresh_gauges())

    async def _refresh_gauges(self, every_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            self._record_pool()

    async def _get_store(self) -> AsyncStore:
        if self._store is not None:
            return self._store
        async with self._lock:
            if self._store is None:
                c: Any = self.config
                store = AsyncStore(c.database_url, **c.store_kwargs())
                try:
                    if self._last_error is not None:  # it was down: a refused connect fails at once
                        await store.check_reachable()
                    await store.open()  # a pool that failed to open is closed for good: make a new one
                except BaseException as e:  # incl. a caller's timeout: the half-open pool's tasks must go
                    with contextlib.suppress(Exception):
                        await store.close(timeout_s=0.1)
                    if isinstance(e, StoreUnavailable):
                        self._last_error = str(e)
                    raise
                self._store, self._last_error = store, None
                self._record_pool()
        return self._store

    async def search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int,
        filter: Any = None,
        *,
        query: str | None = None,
        mode: str = "dense",
    ) -> list[dict[str, Any]]:
        """The ``k`` best chunks of ``collection`` (under ``filter``) in ``mode``, best first, with
        ``dense_score``; ``query``: the text (lexical, hybrid). A ``SearchHits``: ``.strategy`` says which
        plan ran."""
        try:
            if self._replicas is not None:
                return await self._replicas.search(
                    self._store_up, collection, vector, k, filter=filter, query=query, mode=mode
                )
            store = await self._store_up()
            return await store.search(collection, vector, k, filter=filter, query=query, mode=mode)
        except StoreUnavailable as e:
            self._down = True
            raise _unreachable(e) from e
        finally:
            self._record_pool()

    async def _store_up(self) -> AsyncStore:
        """The store, once the database answers (see the module docstring)."""
        store = await self._get_store()
        if self._down:
            await store.check_reachable()
            self._down = False
        return store

    async def info(self) -> dict[str, Any]:
        """The configuration this replica holds and the database it talks to (GET /info; no secrets)."""
        c: Any = self.config
        out: dict[str, Any] = {
            "config": c.public(),
            "ef_search_rule": c.ef_search_rule(),
            "pool": self.pool_stats(),
        }
        if self._replicas is not None:
            out["read_replicas"] = self._replicas.info()
        try:
            store = await self._get_store()
            out["database"] = await store.server_info()
            out["lexical"] = await store.lexical_info()
            out["index_types"] = await store.index_types()  # per collection: hnsw, halfvec, binary, diskann
        except Exception as e:  # /info still answers while the database is down
            out["database"] = {"error": str(e)}
        return out

    async def ready(self) -> dict[str, Any]:
        """The database answers a ping within READY_PING_S (below the ingress's /readyz timeout, so
        /readyz says "database unreachable" rather than that the Retriever did not answer)."""
        t0 = time.perf_counter()

        async def ping() -> AsyncStore:
            store = await self._store_up()
            await store.ping()
            return store

        try:
            store = await asyncio.wait_for(ping(), READY_PING_S)
        except StoreUnavailable as e:
            self._down = True
            raise _unreachable(e) from e
        except TimeoutError as e:
            raise StoreUnavailable(
                f"database unreachable: PostgreSQL did not answer within {READY_PING_S:g}s "
                f"({redact_url(self.config.database_url or 'the embedded database')}); is it running?"
            ) from e
        self._record_pool()
        return {
            "database": "reachable",
            "ping_ms": round((time.perf_counter() - t0) * 1e3, 2),
            **store.stats(),
        }

    def pool_stats(self) -> dict[str, int]:
        return self._store.stats() if self._store is not None else {}

    def _record_pool(self) -> None:
        if self._store is None:
            return
        stats = self._store.stats()
        for metric, key in _GAUGES.items():
            if key in stats:
                metrics.get(metric).set(stats[key])

    def __del__(self) -> Any:
        """Serve calls this when the replica stops and awaits what it returns: the pool's close()."""
        gauges = getattr(self, "_gauges", None)
        if gauges is not None and not gauges.done():
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                gauges.cancel()
        store, self._store = getattr(self, "_store", None), None
        replicas, self._replicas = getattr(self, "_replicas", None), None
        if store is None and replicas is None:
            return None
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # garbage collection outside an event loop: the process is going away
            return None
        return _close(store, replicas)


def replica_set(config: StoreConfig, **kw: Any) -> ReplicaSet:
    """The read replicas of ``config`` (``database_read_urls``), with the primary pool's settings."""
    c: Any = config
    return ReplicaSet(
        c.read_urls(),
        max_lag_s=c.read_replica_max_lag_s,
        probe_every_s=c.read_replica_probe_s,
        store_kw=c.store_kwargs(),
        **kw,
    )


def _record_replicas(statuses: list[ReplicaStatus]) -> None:
    """Each standby's lag (the last one measured while it is down) and whether it takes searches."""
    for st in statuses:
        tags = {"server": st.server}
        if st.lag_s is not None:
            metrics.get("rag_db_replica_lag_seconds").set(st.lag_s, tags=tags)
        metrics.get("rag_db_replica_up").set(1 if st.state == "ok" else 0, tags=tags)


async def _close(store: AsyncStore | None, replicas: ReplicaSet | None) -> None:
    if replicas is not None:
        await replicas.close()
    if store is not None:
        await store.close()


def _unreachable(err: StoreUnavailable) -> StoreUnavailable:
    """``err`` as the ingress and /readyz show it: it starts with "database unreachable"."""
    msg = str(err)
    return err if msg.startswith("database unreachable") else StoreUnavailable(f"database unreachable: {msg}")
