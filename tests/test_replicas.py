"""Read replicas (``rag.store.ReplicaSet``) against a real primary and a real streaming-replication standby.

The servers are the embedded wheel's PostgreSQL (``tests/replication.py``): searches go to the standby; a
standby killed with SIGKILL is skipped at once (no search fails: the one in flight is run again on the
primary) and comes back after a restart; a standby whose replay is paused falls behind past the bound, is
skipped, and comes back when replay resumes. The breaker figures are printed (``-s``; docs/BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
from replication import Server, primary_and_standby

from rag.settings import Settings
from rag.store import AsyncStore, ChunkRow, DocumentRow, ReplicaSet, Store
from rag.store.replicas import Replica, lag_seconds, server_name

COLL = "repl"
DIM = 8
PROBE_S = 0.2  # the probe interval these tests run with (the default is 1 s)
STORE_KW = {"max_size": 2, "timeout_s": 2.0}


def _rows(ids: list[str], vecs: np.ndarray) -> tuple[list[DocumentRow], list[ChunkRow], np.ndarray]:
    docs = [DocumentRow(i, "syn", f"h-{i}") for i in ids]
    chunks = [ChunkRow(i, i, "syn", 0, f"text {i}", f"h-{i}") for i in ids]
    return docs, chunks, vecs.astype(np.float32)


@pytest.fixture(scope="module")
def pair():
    with primary_and_standby() as (primary, standby):
        yield primary, standby


@pytest.fixture(scope="module")
def seeded(pair) -> Store:
    """A collection of 50 rows on the primary, replicated to the standby."""
    primary, standby = pair
    store = Store(primary.url, max_size=2, lexical_index="fts")
    store.ensure_collection(COLL, dim=DIM, embedding_model="synthetic")
    vecs = np.random.default_rng(0).normal(size=(50, DIM))
    store.write_batch(COLL, *_rows([f"d{i}" for i in range(50)], vecs))
    _until(lambda: standby.sql(f"SELECT count(*) FROM rag_chunks_{COLL}")[0][0] == 50, 30, "replicated")
    yield store
    store.close()


def _until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"not {what} after {timeout_s:g}s"
        time.sleep(0.05)


async def _auntil(cond: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Wait (async) until ``cond``; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"not {what} after {timeout_s:g}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def _open(urls: list[str], primary_url: str, max_lag_s: float = 30.0):
    rs = ReplicaSet(urls, max_lag_s=max_lag_s, probe_every_s=PROBE_S, store_kw=STORE_KW)
    prim = AsyncStore(primary_url, **STORE_KW)
    await prim.open()
    await rs.open()

    async def primary() -> AsyncStore:
        return prim

    return rs, prim, primary


async def _close(rs: ReplicaSet, prim: AsyncStore) -> None:
    await rs.close()
    await prim.close()


def _ids(hits: list[dict]) -> list[str]:
    return [h["id"] for h in hits]


# -- no servers needed ---------------------------------------------------------------------------------
def test_lag_is_zero_when_caught_up_even_if_the_last_replayed_commit_is_old():
    assert lag_seconds(True, True, 3600.0) == 0.0  # an idle primary: nothing to replay
    assert lag_seconds(True, False, 4.5) == 4.5  # WAL received, not replayed: the last commit's age
    assert lag_seconds(True, None, None) is None  # not streaming, nothing replayed: unknown (skipped)
    assert lag_seconds(False, None, None) == 0.0  # not a standby at all (promoted): used as is


def test_server_names_never_carry_a_password():
    assert server_name("postgresql://u:s3cret@db-ro.example:5433/rag") == "db-ro.example:5433/rag"
    assert "s3cret" not in server_name("host=h password=s3cret dbname=x")


def test_searches_go_to_the_least_busy_healthy_standby_in_turn():
    rs = ReplicaSet(["postgresql://a@h1/db", "postgresql://a@h2/db", "postgresql://a@h3/db"])
    from rag.breaker import Breaker

    rs.replicas = [Replica(u, u, AsyncStore(u), Breaker(u), state="ok") for u in rs.urls]
    a, b, c = rs.replicas
    assert {id(rs.pick()) for _ in range(6)} == {id(a), id(b), id(c)}  # round robin among equals
    a.inflight, b.inflight = 2, 1
    assert rs.pick() is c
    c.state = "lagging"
    assert rs.pick() is b
    a.state = b.state = "down"
    assert rs.pick() is None  # the caller's primary takes the search


def test_the_retriever_builds_its_replica_set_from_the_store_slice():
    from deployments.retriever import replica_set

    s = Settings(
        database_url="postgresql://u:pw@primary/db",
        database_read_urls=" postgresql://u:pw1@ro1:5433/db , postgresql://u:pw2@ro2/db",
        read_replica_max_lag_s=7.5,
        read_replica_probe_s=0.5,
        pool_max_size=3,
    )
    cfg = s.slice("store")
    rs = replica_set(cfg)
    assert rs.urls == ["postgresql://u:pw1@ro1:5433/db", "postgresql://u:pw2@ro2/db"]
    assert (rs.max_lag_s, rs.probe_every_s, rs.store_kw["max_size"]) == (7.5, 0.5, 3)
    public = cfg.public()["database_read_urls"]
    assert public == "postgresql://u:***@ro1:5433/db,postgresql://u:***@ro2/db"
    assert Settings(database_read_urls="").slice("store").read_urls() == []


# -- a real primary and standby ------------------------------------------------------------------------
def test_the_standby_replays_what_the_primary_writes(pair):
    primary, standby = pair
    assert standby.sql("SELECT pg_is_in_recovery()")[0][0] is True
    primary.sql("CREATE TABLE IF NOT EXISTS marker (x int)")
    primary.sql("INSERT INTO marker VALUES (42)")
    _until(lambda: _has_marker(standby), 10, "replicated")


def _has_marker(s: Server) -> bool:
    try:
        return s.sql("SELECT count(*) FROM marker WHERE x = 42")[0][0] == 1
    except Exception:  # the table itself not replayed yet
        return False


def test_searches_are_served_by_the_standby(pair, seeded):
    primary, standby = pair
    q = np.random.default_rng(0).normal(size=(50, DIM))[7].astype(np.float32)

    async def scenario() -> None:
        rs, prim, primary_fn = await _open([standby.url], primary.url)
        try:
            (r,) = rs.replicas
            assert r.state == "ok" and r.lag_s is not None and r.lag_s <= 30, rs.info()
            for _ in range(20):
                assert _ids(await rs.search(primary_fn, COLL, q, 5))[0] == "d7"
            assert (r.searches, rs.primary_searches) == (20, 0)
            info = rs.info()["replicas"][0]
            assert info["state"] == "ok" and info["server"] == f"127.0.0.1:{standby.port}/postgres"
        finally:
            await _close(rs, prim)

    before = _xacts(standby)
    asyncio.run(scenario())
    # The standby's own statistics count the read-only transactions it ran (flushed within a second or so).
    _until(lambda: _xacts(standby) - before >= 20, 10, "counted on the standby")


def _xacts(s: Server) -> int:
    return int(s.sql("SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'")[0][0])


def test_a_dead_standby_at_start_leaves_searches_to_the_primary(pair, seeded):
    from helpers import free_port

    primary, _ = pair
    dead = f"postgresql://postgres:hidden-pw@127.0.0.1:{free_port()}/postgres"

    async def scenario() -> None:
        rs, prim, primary_fn = await _open([dead], primary.url)
        try:
            q = np.ones(DIM, dtype=np.float32)
            assert len(await rs.search(primary_fn, COLL, q, 3)) == 3
            (st,) = rs.info()["replicas"]
            assert st["state"] == "down" and "unreachable" in st["error"], st
            assert rs.primary_searches == 1 and "hidden-pw" not in str(rs.info())
        finally:
            await _close(rs, prim)

    asyncio.run(scenario())


async def _load(
    search: Callable[[], Awaitable[list[dict]]], stop: asyncio.Event, failed: list[BaseException]
) -> int:
    """Searches back to back (4 at a time) until ``stop``; failures collected; returns the answered."""

    async def one_client() -> int:
        n = 0
        while not stop.is_set():
            try:
                assert len(await search()) == 5
                n += 1
            except Exception as e:
                failed.append(e)
            await asyncio.sleep(0.002)
        return n

    return sum(await asyncio.gather(*(one_client() for _ in range(4))))


def test_a_killed_standby_is_skipped_without_failing_a_search_and_comes_back(pair, seeded):
    primary, standby = pair
    q = np.ones(DIM, dtype=np.float32)

    async def scenario() -> dict[str, float]:
        rs, prim, primary_fn = await _open([standby.url], primary.url)
        (r,) = rs.replicas
        stop, failed = asyncio.Event(), []
        load = asyncio.create_task(_load(lambda: rs.search(primary_fn, COLL, q, 5), stop, failed))
        try:
            await _auntil(lambda: r.searches >= 50, 30, "searching the standby")
            standby.kill()
            to_open = await _auntil(lambda: r.breaker.is_open and r.state == "down", 10, "breaker open")
            served = rs.primary_searches
            await _auntil(lambda: rs.primary_searches >= served + 50, 30, "searching the primary")
            t1 = time.monotonic()
            await asyncio.to_thread(standby.start)
            started = time.monotonic() - t1
            on_standby = r.searches
            back = await _auntil(lambda: r.state == "ok" and r.searches > on_standby + 10, 60, "back")
            stop.set()
            answered = await load
        finally:
            stop.set()
            await asyncio.gather(load, return_exceptions=True)
            await _close(rs, prim)
        assert not failed, f"{len(failed)} searches failed, first: {failed[0]!r}"
        return {
            "kill_to_open_s": to_open,
            "pg_ctl_start_s": started,
            "started_to_back_s": back,
            "searches": answered,
            "retried_on_primary": rs.retried,
            "failed": len(failed),
        }

    figures = asyncio.run(scenario())
    print(f"\nreplica breaker (SIGKILL standby, 4 clients searching back to back): {figures}")
    assert figures["kill_to_open_s"] < 5 * PROBE_S + 1  # a search or the next probe notices


def test_a_lagging_standby_is_skipped_until_it_catches_up(pair, seeded):
    primary, standby = pair
    vec = np.full((1, DIM), 9.0)  # far from every seeded row: the nearest neighbour of itself only
    q = vec[0].astype(np.float32)

    async def scenario() -> dict[str, float]:
        rs, prim, primary_fn = await _open([standby.url], primary.url, max_lag_s=3600)
        (r,) = rs.replicas
        try:
            await _auntil(lambda: r.state == "ok", 30, "standby ok")
            standby.sql("SELECT pg_wal_replay_pause()")
            seeded.write_batch(COLL, *_rows(["fresh"], vec))
            seeded.ensure_collection("repl_new", dim=DIM, embedding_model="synthetic")
            seeded.write_batch("repl_new", *_rows(["n0"], vec))
            # Within the bound: served by the standby, which has not replayed the new row (the marker).
            n = r.searches
            assert "fresh" not in _ids(await rs.search(primary_fn, COLL, q, 3))
            assert r.searches == n + 1
            # A collection the standby does not know yet is looked up on the primary.
            assert _ids(await rs.search(primary_fn, "repl_new", q, 1)) == ["n0"]
            assert rs.primary_searches == 1
            rs.max_lag_s = 1.0
            to_skip = await _auntil(lambda: r.state == "lagging", 10, "lagging")
            assert r.breaker.is_open and "behind" in str(r.breaker.error)
            assert _ids(await rs.search(primary_fn, COLL, q, 1)) == ["fresh"]  # the primary answered
            assert rs.primary_searches == 2
            t0 = time.monotonic()
            standby.sql("SELECT pg_wal_replay_resume()")
            back = await _auntil(lambda: r.state == "ok", 10, "caught up")
            n = r.searches
            assert _ids(await rs.search(primary_fn, COLL, q, 1)) == ["fresh"]  # replayed now
            assert r.searches == n + 1
            return {
                "pause_to_skipped_s": to_skip,
                "resume_to_back_s": back,
                "resume_s": time.monotonic() - t0,
            }
        finally:
            await _close(rs, prim)

    figures = asyncio.run(scenario())
    print(f"\nreplica lag breaker (replay paused, bound 1 s): {figures}")
