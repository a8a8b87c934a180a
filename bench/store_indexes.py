"""`rag bench store --index-types ...`: the vector index types side by side on the same rows.

One collection of clustered synthetic vectors (``bench.store.Mixture``, loaded by COPY through
``Store.write_batch``) in a dedicated embedded PostgreSQL, started for the run with ``shared_buffers`` large
enough to hold the biggest index plus the heap pages searches touch, and ``maintenance_work_mem`` large
enough to build every index in memory. For each index type (``rag.store.indexes``), in turn:

1. drop the previous vector index, build this one (timed, with progress from
   ``pg_stat_progress_create_index``), ``ANALYZE``; record the type in the registry, as a collection created
   with it would be;
2. size on disk: ``pg_relation_size`` of the index, and ``pg_table_size`` of the table (the same for all);
3. size in shared buffers: the server is restarted (empty buffers), ``--warmup`` held-out queries run through
   ``Store.search``, and the blocks read into shared buffers meanwhile are counted from
   ``pg_statio_user_indexes`` / ``pg_statio_user_tables``. With shared_buffers larger than index + table
   nothing is evicted, so that is exactly what the warm-up left resident. (The embedded server has no
   ``pg_buffercache`` extension, which would show the same by inspecting the buffers.)
4. p50/p99 latency and recall@k against exact top-k (numpy) through ``Store.search`` for each query-time
   knob: ``hnsw.ef_search`` (hnsw, halfvec), the re-rank factor (binary), the search list size (diskann).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import load_now, machine_info, pct, say
from bench.store import Mixture, _load

__all__ = ["index_types_summary", "run_index_types"]


def _auto_mem(rows: int, per_row: int, floor_mib: int) -> str:
    return f"{max(floor_mib, -(-rows * per_row // 2**20))}MB"


class _Server:
    """A dedicated embedded PostgreSQL with the benchmark's settings; restartable (empty shared buffers)."""

    def __init__(self, settings: dict[str, str]) -> None:
        import pgserver
        import psycopg

        self.base = Path(tempfile.mkdtemp(prefix="rag-bench-idx-"))
        self.base.chmod(0o755)  # as root, postgres runs as 'pgserver' and must traverse it
        self.srv = pgserver.get_server(self.base / "pgdata", cleanup_mode="delete")
        with psycopg.connect(self.srv.get_uri(), autocommit=True) as c:
            for k, v in settings.items():
                c.execute(f"ALTER SYSTEM SET {k} = '{v}'")
        self.restart()

    @property
    def url(self) -> str:
        return str(self.srv.get_uri())

    def restart(self) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.srv.pgdata, user=self.srv.system_user)
        self.srv.ensure_postgres_running()

    def close(self) -> None:
        self.srv.cleanup()
        shutil.rmtree(self.base, ignore_errors=True)


def _progress(url: str, stop: threading.Event, t0: float, quiet: bool) -> None:
    """Every 30 s, what ``CREATE INDEX`` reports (phase, tuples, blocks)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        while not stop.wait(30):
            row = c.execute(
                "SELECT phase, tuples_done, tuples_total, blocks_done, blocks_total "
                "FROM pg_stat_progress_create_index"
            ).fetchone()
            if row:
                say(
                    f"    {time.perf_counter() - t0:.0f} s: {row[0]}; tuples {row[1]}/{row[2]}, "
                    f"blocks {row[3]}/{row[4]}",
                    quiet=quiet,
                )


def _build(store: Any, url: str, name: str, kind: str, dim: int, m: int, efc: int, quiet: bool) -> float:
    from psycopg import sql

    from rag.store.indexes import INDEX_TYPES, index_ddl, index_name

    table = sql.Identifier(f"rag_chunks_{name}")
    with store.connection() as conn:
        for other in INDEX_TYPES:
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(index_name(name, other))))
        if kind == "diskann":
            conn.execute("CREATE EXTENSION IF NOT EXISTS vectorscale")
        conn.commit()
        stop = threading.Event()
        t0 = time.perf_counter()
        watcher = threading.Thread(target=_progress, args=(url, stop, t0, quiet), daemon=True)
        watcher.start()
        try:
            conn.execute(index_ddl(kind, name, table, dim, m=m, ef_construction=efc))
            conn.commit()
        finally:
            stop.set()
        seconds = round(time.perf_counter() - t0, 1)
        conn.execute(sql.SQL("ANALYZE {}").format(table))
        conn.execute("UPDATE rag_collections SET index_type = %s WHERE name = %s", [kind, name])
        conn.commit()
    return seconds


def _blocks(url: str, name: str, index: str) -> tuple[int, int]:
    """Blocks read into shared buffers so far: the index's, and the table's (heap + TOAST)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        idx = c.execute(
            "SELECT coalesce(sum(idx_blks_read), 0) FROM pg_statio_user_indexes WHERE indexrelname = %s",
            [index],
        ).fetchone()[0]
        heap = c.execute(
            "SELECT coalesce(heap_blks_read, 0) + coalesce(toast_blks_read, 0) FROM pg_statio_user_tables "
            "WHERE relname = %s",
            [f"rag_chunks_{name}"],
        ).fetchone()[0]
    return int(idx), int(heap)


def _measure(store: Any, name: str, queries: np.ndarray, truth: list[set[str]], k: int) -> dict[str, Any]:
    for q in queries[:20]:
        store.search(name, q, k)
    lat, rec, strategies = [], [], {}
    for q, want in zip(queries, truth, strict=True):
        t = time.perf_counter()
        hits = store.search(name, q, k)
        lat.append((time.perf_counter() - t) * 1e3)
        rec.append(len(want & {h["id"] for h in hits}) / k)
        strategies[hits.strategy] = strategies.get(hits.strategy, 0) + 1
    return {
        "recall": round(float(np.mean(rec)), 4),
        "p50_ms": round(pct(lat, 50), 2),
        "p99_ms": round(pct(lat, 99), 2),
        "strategies": strategies,
    }


def run_index_types(
    settings: Any,
    *,
    index_types: list[str],
    n: int = 200_000,
    dim: int = 384,
    clusters: int = 2000,
    n_queries: int = 200,
    warmup: int = 500,
    k: int = 100,
    ef_values: list[int] | None = None,
    rerank_factors: list[float] | None = None,
    shared_buffers: str | None = None,
    maintenance_work_mem: str | None = None,
    parallel_workers: int = 1,
    batch: int = 20_000,
    quiet: bool = False,
    out: Path | None = None,
) -> dict[str, Any]:
    """See the module docstring; ``out``: the JSON so far is written there after each index type."""
    from bench.common import write_json
    from rag.store import Store
    from rag.store.indexes import check_index_type

    for kind in index_types:
        check_index_type(kind)
    ef_values = ef_values or [150, 300, 600]
    rerank_factors = rerank_factors or [4.0, 8.0, 16.0]
    server_settings = {
        # index + table + headroom per row (384-d float32 HNSW is about 2 KB a row, the heap about 1.7 KB)
        "shared_buffers": shared_buffers or _auto_mem(n, 5 * 1024, 1024),
        "maintenance_work_mem": maintenance_work_mem or _auto_mem(n, 3 * 1024, 1024),
        "max_parallel_maintenance_workers": str(parallel_workers),
    }
    result: dict[str, Any] = {
        "benchmark": "store-index-types",
        "machine": machine_info(),
        "load_start": load_now(),
        "vectors": n,
        "dim": dim,
        "clusters": clusters,
        "k": k,
        "queries": n_queries,
        "warmup_queries": warmup,
        "hnsw": {"m": settings.hnsw_m, "ef_construction": settings.hnsw_ef_construction},
        "ef_search_rule": f"max({settings.hnsw_ef_search_min}, n, n x {settings.hnsw_ef_search_factor}) "
        "for n candidates, at most 1000",
        "types": {},
    }
    say(
        f"index types {index_types}: {n} clustered {dim}-d vectors; server settings {server_settings}",
        quiet=quiet,
    )
    server = _Server(server_settings)
    name = "bench_idx"

    def open_store() -> Any:
        return Store(
            server.url,
            max_size=2,
            hnsw_m=settings.hnsw_m,
            hnsw_ef_construction=settings.hnsw_ef_construction,
            ef_search_min=settings.hnsw_ef_search_min,
            ef_search_factor=settings.hnsw_ef_search_factor,
            binary_rerank_factor=settings.binary_rerank_factor,
        )

    try:
        store = open_store()
        with store.connection() as c:
            result["server"] = {
                **store.server_info(),
                **{s: c.execute(f"SHOW {s}").fetchone()[0] for s in [*server_settings, "work_mem"]},
            }
        mix = Mixture(dim, clusters)
        data, result["load_seconds"] = _load(
            store, name, n, dim, mix, np.random.default_rng(11), batch, lambda i: ("synthetic", {}), quiet
        )
        with store.connection() as c:
            result["table_bytes"] = c.execute(
                "SELECT pg_table_size(%s::regclass)", [f"rag_chunks_{name}"]
            ).fetchone()[0]
        say(
            f"  loaded in {result['load_seconds']} s; table {result['table_bytes'] / 2**20:.0f} MiB",
            quiet=quiet,
        )
        queries = mix.sample(n_queries, np.random.default_rng(99))
        warm = mix.sample(warmup, np.random.default_rng(123))
        say("  exact top-k (numpy) ...", quiet=quiet)
        truth = []
        for start in range(0, n_queries, 50):
            s = queries[start : start + 50] @ data.T
            top = np.argpartition(-s, k, axis=1)[:, :k]
            truth += [set(map(str, row)) for row in top]
        del data
        store.close()
        for kind in index_types:
            result["types"][kind] = _one_type(
                kind,
                server,
                open_store,
                name,
                dim,
                settings,
                queries,
                truth,
                warm,
                k,
                ef_values,
                rerank_factors,
                quiet,
            )
            write_json(result, out)
    finally:
        server.close()
    result["load_end"] = load_now()
    return result


def _one_type(
    kind: str,
    server: _Server,
    open_store: Any,
    name: str,
    dim: int,
    settings: Any,
    queries: np.ndarray,
    truth: list[set[str]],
    warm: np.ndarray,
    k: int,
    ef_values: list[int],
    rerank_factors: list[float],
    quiet: bool,
) -> dict[str, Any]:
    from rag.errors import ConfigError
    from rag.store.indexes import index_name

    store = open_store()
    out: dict[str, Any] = {}
    if kind == "diskann" and not store.server_info()["vectorscale"]:
        store.close()
        say("  diskann: skipped, this server has no pgvectorscale", quiet=quiet)
        return {"skipped": "no pgvectorscale (vectorscale extension) on this server"}
    say(f"  {kind}: building ...", quiet=quiet)
    try:
        out["build_seconds"] = _build(
            store, server.url, name, kind, dim, settings.hnsw_m, settings.hnsw_ef_construction, quiet
        )
    except ConfigError as e:
        store.close()
        return {"skipped": str(e)}
    index = index_name(name, kind)
    with store.connection() as c:
        out["index_bytes"] = c.execute("SELECT pg_relation_size(%s::regclass)", [index]).fetchone()[0]
    store.close()
    say(f"  {kind}: built in {out['build_seconds']} s, {out['index_bytes'] / 2**20:.1f} MiB", quiet=quiet)
    server.restart()  # empty shared buffers
    before = _blocks(server.url, name, index)
    store = open_store()
    t0 = time.perf_counter()
    for q in warm:
        store.search(name, q, k)
    out["warmup_seconds"] = round(time.perf_counter() - t0, 1)
    store.close()  # its backends exit, which flushes their I/O statistics
    after = _blocks(server.url, name, index)
    out["buffers_index_bytes"] = (after[0] - before[0]) * 8192
    out["buffers_table_bytes"] = (after[1] - before[1]) * 8192
    say(
        f"  {kind}: after {len(warm)} warm-up queries, shared buffers hold "
        f"{out['buffers_index_bytes'] / 2**20:.1f} MiB of the index and "
        f"{out['buffers_table_bytes'] / 2**20:.1f} MiB of the table",
        quiet=quiet,
    )
    store = open_store()
    sweep = []
    knobs: list[tuple[str, float]] = (
        [("rerank_factor", f) for f in rerank_factors] if kind == "binary" else [("ef", e) for e in ef_values]
    )
    for knob, value in knobs:
        if knob == "rerank_factor":
            store.binary_rerank_factor = value
        else:
            store.ef_search_min, store.ef_search_factor = int(value), 1.0  # ef = max(value, k)
        row = {knob: value, **_measure(store, name, queries, truth, k)}
        sweep.append(row)
        say(
            f"  {kind} {knob}={value:g}: recall@{k} {row['recall']}, p50 {row['p50_ms']} ms, "
            f"p99 {row['p99_ms']} ms",
            quiet=quiet,
        )
    store.close()
    out["sweep"] = sweep
    return out


def index_types_summary(r: dict[str, Any]) -> str:
    m, srv = r["machine"], r["server"]
    n = r["vectors"]
    lines = [
        f"vector index types, {n} clustered {r['dim']}-d vectors ({r['clusters']} clusters), k={r['k']}, "
        f"{r['queries']} queries, {r['warmup_queries']} warm-up queries",
        f"machine: {m['cpu_model']}, {m['cpus_usable']} CPUs, {m['date']}; load at start {r['load_start']}",
        f"PostgreSQL {srv['postgresql']}, pgvector {srv['pgvector']}, pgvectorscale {srv['vectorscale']}; "
        f"shared_buffers {srv['shared_buffers']}, maintenance_work_mem {srv['maintenance_work_mem']}, "
        f"max_parallel_maintenance_workers {srv['max_parallel_maintenance_workers']}, "
        f"work_mem {srv['work_mem']}",
        f"COPY load {r['load_seconds']} s; table {r['table_bytes'] / 2**20:.0f} MiB "
        f"({r['table_bytes'] / n:.0f} B/row); HNSW m={r['hnsw']['m']}, ef_construction="
        f"{r['hnsw']['ef_construction']}; ef_search {r['ef_search_rule']}",
        "",
        "| index | build s | index MiB | B/row | in buffers MiB (index + table) | knob | recall@100 | p50 ms "
        "| p99 ms | searches/s (1000/p50) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, t in r["types"].items():
        if "skipped" in t:
            lines.append(f"| {kind} | skipped: {t['skipped']} |||||||||")
            continue
        mib = t["index_bytes"] / 2**20
        buf = f"{t['buffers_index_bytes'] / 2**20:.1f} + {t['buffers_table_bytes'] / 2**20:.1f}"
        for i, s in enumerate(t["sweep"]):
            knob = (
                f"rerank x{s['rerank_factor']:g}"
                if "rerank_factor" in s
                else f"{'search list' if kind == 'diskann' else 'ef_search'} {max(int(s['ef']), r['k'])}"
            )
            head = (
                f"| {kind} | {t['build_seconds']} | {mib:.1f} | {t['index_bytes'] / n:.0f} | {buf} "
                if i == 0
                else "| | | | | "
            )
            lines.append(
                f"{head}| {knob} | {s['recall']} | {s['p50_ms']} | {s['p99_ms']} | {1000 / s['p50_ms']:.0f} |"
            )
    lines.append(f"load at end {r['load_end']}")
    return "\n".join(lines)
