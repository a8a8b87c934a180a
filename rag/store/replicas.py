"""Read replicas: searches spread over hot standbys, each behind a breaker, with the primary as fallback.

``ReplicaSet`` holds one ``AsyncStore`` (pool) per standby URL (``database_read_urls``) and its health. Each
search goes to the healthy standby with the fewest searches in flight (round robin among equals); with no
healthy standby it goes to the primary. Nothing else ever reads a standby: ingest, attach, detach, the
registry, migrations, ``/info``'s server facts and readiness use the primary (``database_url``).

Health. A probe connects to every standby every ``probe_every_s`` (one short connection, outside the pool,
so a busy pool never makes a standby look dead) and reads its replay lag (``LAG_SQL``). A standby that
refuses, times out or lags past ``max_lag_s`` has its breaker (``rag.breaker.Breaker``) opened and takes no
searches; the first probe that finds it reachable and caught up closes it (after dropping the pool
connections a restart broke). A search that fails on a standby because the server went away opens its
breaker at once and is run again on the primary within the same call, so a dying standby costs its
in-flight searches one retry, not an error.

Lag, measured on the standby: 0 while it has replayed all the WAL it received
(``pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()``: an idle primary writes nothing, so the time of
the last replayed commit grows old without the standby being behind); otherwise
``now() - pg_last_xact_replay_timestamp()``, the age of the last commit it replayed, an upper bound on how
late its answers are. Unknown (not streaming and nothing replayed yet): treated as lagging.

Consistency (what a search on a standby may miss). Chunks ingested within the last ``max_lag_s`` seconds
may be absent. A collection the standby does not know yet (just created on the primary) is looked up on the
primary: a standby's "collection does not exist" is never the answer, so a collection is searchable as
soon as its creation committed, and a client that ingested and then searched gets results. A server that
is no standby (``pg_is_in_recovery()`` false, e.g. promoted) is used as is, with lag 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import psycopg
from psycopg.conninfo import conninfo_to_dict

from rag.breaker import Breaker
from rag.errors import CollectionError, StoreUnavailable
from rag.store.async_store import AsyncStore
from rag.store.schema import first_line
from rag.store.search import SearchHits

__all__ = ["LAG_SQL", "ReplicaSet", "ReplicaStatus", "lag_seconds", "server_name"]

log = logging.getLogger("rag.store")

State = Literal["ok", "lagging", "down"]

LAG_SQL = (
    "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn(),"
    " extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"
)


def lag_seconds(in_recovery: bool, caught_up: bool | None, since_replay_s: float | None) -> float | None:
    """A standby's lag from ``LAG_SQL``'s row (see the module docstring); None: unknown."""
    if not in_recovery or caught_up:
        return 0.0
    return None if since_replay_s is None else max(0.0, float(since_replay_s))


def server_name(url: str) -> str:
    """``host:port/dbname`` of a URL: how logs, ``/info`` and metrics name a server (never a password)."""
    try:
        d = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable url>"
    return f"{d.get('host') or 'localhost'}:{d.get('port') or 5432}/{d.get('dbname') or ''}"


@dataclass(frozen=True)
class ReplicaStatus:
    """One standby as ``/info`` and the metrics show it."""

    server: str
    state: State
    lag_s: float | None
    searches: int
    error: str | None

    def public(self) -> dict[str, Any]:
        lag = None if self.lag_s is None else round(self.lag_s, 3)
        return {"server": self.server, "state": self.state, "lag_s": lag, "searches": self.searches,
                "error": self.error}  # fmt: skip


@dataclass(eq=False)
class Replica:
    url: str
    name: str  # server_name(url)
    store: AsyncStore
    breaker: Breaker
    state: State = "down"  # until the first probe says otherwise
    lag_s: float | None = None
    searches: int = 0
    inflight: int = 0
    stale_pool: bool = True  # new, or it went down: check the pool's connections once it answers again

    def status(self) -> ReplicaStatus:
        err = None if self.breaker.error is None else str(self.breaker.error)
        return ReplicaStatus(self.name, self.state, self.lag_s, self.searches, err)


Primary = Callable[[], Awaitable[AsyncStore]]


@dataclass(eq=False)
class ReplicaSet:
    """The standbys of one primary (see the module docstring); ``open()`` it, then ``search``."""

    urls: list[str]
    max_lag_s: float = 30.0
    probe_every_s: float = 1.0
    store_kw: dict[str, Any] = field(default_factory=dict)
    on_probe: Callable[[list[ReplicaStatus]], None] | None = None  # after each probe round (metrics)
    primary_searches: int = 0  # searches the primary answered (no healthy standby, or a retry)
    retried: int = 0  # of those, searches that failed on a standby first
    replicas: list[Replica] = field(default_factory=list, init=False)
    _turn: int = field(default=0, init=False)
    _task: asyncio.Task | None = field(default=None, init=False, repr=False)

    async def open(self) -> None:
        """Create the pools (without waiting: a standby may be down), probe once, then keep probing."""
        for url in self.urls:
            store = AsyncStore(url, **self.store_kw)
            await store.open(wait=False)
            name = server_name(url)
            self.replicas.append(Replica(url, name, store, Breaker(f"read replica {name}")))
        await self.probe_all()
        self._task = asyncio.get_running_loop().create_task(self._probe_forever())

    async def close(self, timeout_s: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(r.store.close(timeout_s) for r in self.replicas), return_exceptions=True)

    def statuses(self) -> list[ReplicaStatus]:
        return [r.status() for r in self.replicas]

    def info(self) -> dict[str, Any]:
        """For ``/info``: each standby's state and lag, and the searches the primary took."""
        return {
            "replicas": [s.public() for s in self.statuses()],
            "max_lag_s": self.max_lag_s,
            "primary_searches": self.primary_searches,
            "retried_on_primary": self.retried,
        }

    # -- health ------------------------------------------------------------------------------------
    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.probe_every_s)
            try:
                await self.probe_all()
            except Exception:  # a probe must never end the loop (a bug here would freeze every state)
                log.exception("read replica probe failed")

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(r) for r in self.replicas))
        if self.on_probe is not None:
            self.on_probe(self.statuses())

    async def probe(self, r: Replica) -> None:
        """Read ``r``'s lag with one short connection; open or close its breaker by what it says."""
        timeout_s = float(r.store.timeout_s)
        try:
            row = await asyncio.wait_for(_read_lag(r.url, timeout_s), timeout_s)
        except (psycopg.Error, OSError, TimeoutError) as e:
            self._down(
                r, StoreUnavailable(f"read replica {r.name} unreachable: {first_line(e) or type(e).__name__}")
            )
            return
        if r.stale_pool:  # a restarted server closed the pool's connections: drop them before any search
            with contextlib.suppress(Exception):
                await asyncio.wait_for(r.store.pool.check(), timeout_s)
            r.stale_pool = False
        r.lag_s = lag = lag_seconds(*row)
        if lag is None or lag > self.max_lag_s:
            r.state = "lagging"
            behind = "an unknown time" if lag is None else f"{lag:.1f}s"
            r.breaker.open(
                StoreUnavailable(f"read replica {r.name} is {behind} behind (bound {self.max_lag_s:g}s)")
            )
            return
        r.state = "ok"
        r.breaker.close()

    def _down(self, r: Replica, err: BaseException) -> None:
        r.state, r.stale_pool = "down", True
        r.breaker.open(err)

    # -- searches ----------------------------------------------------------------------------------
    def pick(self) -> Replica | None:
        """The healthy standby with the fewest searches in flight (round robin among equals), or None."""
        healthy = [r for r in self.replicas if r.state == "ok"]
        if not healthy:
            return None
        self._turn = (self._turn + 1) % len(healthy)
        order = healthy[self._turn :] + healthy[: self._turn]
        return min(order, key=lambda r: r.inflight)

    async def search(
        self, primary: Primary, collection: str, vector: np.ndarray, k: int, **kw: Any
    ) -> SearchHits:
        """``AsyncStore.search`` on a healthy standby, else (or when it fails) on ``await primary()``.

        Bad input (a validation error) is raised as is: the primary would refuse it the same way."""
        r = self.pick()
        if r is not None:
            r.inflight += 1
            try:
                hits = await r.store.search(collection, vector, k, **kw)
                r.searches += 1
                return hits
            except StoreUnavailable as e:
                self._down(r, e)  # the standby went away: skip it from now on; the primary answers
                self.retried += 1
            except CollectionError:  # not replicated yet, or changed: the primary's registry decides
                pass
            except psycopg.Error as e:  # e.g. canceled by a conflict with recovery: once more, on the primary
                log.warning("read replica %s: search failed (%s), retried on the primary", r.name, e)
                self.retried += 1
            finally:
                r.inflight -= 1
        self.primary_searches += 1
        return await (await primary()).search(collection, vector, k, **kw)


async def _read_lag(url: str, timeout_s: float) -> tuple[bool, bool | None, float | None]:
    conn = await psycopg.AsyncConnection.connect(url, connect_timeout=max(1, int(timeout_s)), autocommit=True)
    try:
        cur = await conn.execute(LAG_SQL)
        row = await cur.fetchone()
    finally:
        await conn.close()
    assert row is not None
    return bool(row[0]), row[1], row[2]
