"""`rag bench store`: pgvector HNSW at 200k+ vectors: build time, latency and recall per ``ef_search``.

Data: clustered synthetic unit vectors, not uniform noise (in uniform noise every point is about equally far
from every other, and recall says nothing). Cluster centres lie near a 64-dimension subspace, cluster sizes
are uneven (gamma weights) and spreads vary, roughly like sentence embeddings. Queries are fresh draws from
the same mixture; their exact top-k comes from numpy.

Loading goes through ``rag.store.Store.write_batch`` (COPY, binary). The collection's HNSW index is dropped
before loading and built afterwards in one ``CREATE INDEX`` (a bulk build is much faster than inserting into a
live graph), with ``maintenance_work_mem`` and ``max_parallel_maintenance_workers`` set for that session.
Search goes through ``Store.search`` (the application's own query path, rows returned as dicts).

``--filters`` (``run_filters``): the same vectors, each row with a source and metadata that put it in filters
matching 50 % (``{"source": "even"}``), 5 % (``{"metadata": {"tag": "t5"}}``) and 0.1 %
(``{"source": {"prefix": "rare/"}}``) of rows, assigned by row number (independent of the vectors). For each:
recall@k against the exact filtered top-k (numpy over the matching rows), p50/p99 latency, rows returned and
which strategy ran (``SearchHits.strategy``); then again as on a server without iterative scans.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np

from bench.common import load_now, machine_info, pct, say

__all__ = ["clustered_vectors", "filters_summary", "run", "run_filters", "summary"]


class Mixture:
    """A fixed Gaussian mixture on the unit sphere; ``sample`` draws from it."""

    def __init__(self, dim: int, clusters: int, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        basis = rng.standard_normal((64, dim)) / np.sqrt(64)
        c = rng.standard_normal((clusters, 64)) @ basis + 0.35 * rng.standard_normal(
            (clusters, dim)
        ) / np.sqrt(dim)
        self.centres = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
        w = rng.gamma(1.0, size=clusters)
        self.weights = w / w.sum()
        self.spread = rng.uniform(0.45, 0.9, size=clusters).astype(np.float32)
        self.dim = dim

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.draw(n, rng)[0]

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` unit vectors and the cluster each was drawn from."""
        which = rng.choice(len(self.weights), size=n, p=self.weights)
        z = rng.standard_normal((n, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        x = self.centres[which] + self.spread[which, None] * z
        return x / np.linalg.norm(x, axis=1, keepdims=True), which


def clustered_vectors(n: int, dim: int = 384, clusters: int = 2000, seed: int = 7) -> np.ndarray:
    return Mixture(dim, clusters, seed).sample(n, np.random.default_rng(seed + 1))


def run(
    settings: Any,
    *,
    n: int = 200_000,
    dim: int = 384,
    clusters: int = 2000,
    n_queries: int = 200,
    k: int = 100,
    ef_values: list[int] | None = None,
    maintenance_work_mem: str = "1GB",
    parallel_workers: int = 1,
    batch: int = 20_000,
    keep: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    from psycopg import sql

    from rag.db import database_url
    from rag.store import Store

    ef_values = sorted(ef_values or [100, 120, 160, 200, 300, 400, 600, 800])
    machine = machine_info()
    load_start = load_now()
    url = database_url(settings)
    store = Store(url, max_size=2, hnsw_m=settings.hnsw_m, hnsw_ef_construction=settings.hnsw_ef_construction)
    name = "bench_" + uuid.uuid4().hex[:10]
    say(
        f"store benchmark: {n} clustered {dim}-d vectors into temporary collection {name!r}; "
        f"load {load_start}",
        quiet=quiet,
    )
    mix = Mixture(dim, clusters)
    rng = np.random.default_rng(11)
    result: dict[str, Any] = {
        "benchmark": "store",
        "machine": machine,
        "load_start": load_start,
        "vectors": n,
        "dim": dim,
        "clusters": clusters,
        "k": k,
        "hnsw": {"m": settings.hnsw_m, "ef_construction": settings.hnsw_ef_construction},
        "maintenance_work_mem": maintenance_work_mem,
        "parallel_workers": parallel_workers,
    }
    try:
        index, chunks_t = f"rag_chunks_{name}_hnsw", sql.Identifier(f"rag_chunks_{name}")
        data, result["load_seconds"] = _load(
            store, name, n, dim, mix, rng, batch, lambda i: ("synthetic", {}), quiet
        )
        say(
            f"building the HNSW index (m={settings.hnsw_m}, ef_construction={settings.hnsw_ef_construction}, "
            f"maintenance_work_mem={maintenance_work_mem}, {parallel_workers} parallel workers) ...",
            quiet=quiet,
        )
        result["build_seconds"] = _build_hnsw(
            store, index, chunks_t, settings, maintenance_work_mem, parallel_workers
        )
        with store.connection() as conn:
            size = conn.execute("SELECT pg_relation_size(%s::regclass)", [index]).fetchone()[0]
            shared = conn.execute("SHOW shared_buffers").fetchone()[0]
        result["index_mib"] = round(size / 2**20, 1)
        result["shared_buffers"] = shared
        say(
            f"  built in {result['build_seconds']} s ({result['index_mib']} MiB; shared_buffers {shared})",
            quiet=quiet,
        )

        queries = mix.sample(n_queries, np.random.default_rng(99))
        truth = np.argsort(-(queries @ data.T), axis=1, kind="stable")[:, :k]
        truth_sets = [set(map(str, t)) for t in truth]
        # exact search in PostgreSQL (sequential scan), for scale
        ex = []
        for q in queries[:10]:
            t = time.perf_counter()
            store.search(name, q, k, exact=True)
            ex.append((time.perf_counter() - t) * 1e3)
        result["exact_scan_p50_ms"] = round(pct(ex, 50), 1)
        sweep = []
        for ef in ef_values:
            store.ef_search_min, store.ef_search_factor = ef, 1.0  # ef_search = max(ef, k)
            for q in queries[:20]:  # warm the index pages
                store.search(name, q, k)
            lat, rec = [], []
            for q, ts in zip(queries, truth_sets, strict=True):
                t = time.perf_counter()
                hits = store.search(name, q, k)
                lat.append((time.perf_counter() - t) * 1e3)
                rec.append(len(ts & {h["id"] for h in hits}) / k)
            row = {
                "ef_search": max(ef, k),
                "recall": round(float(np.mean(rec)), 4),
                "p50_ms": round(pct(lat, 50), 2),
                "p99_ms": round(pct(lat, 99), 2),
            }
            sweep.append(row)
            say(
                f"  ef_search {row['ef_search']}: recall@{k} {row['recall']}, "
                f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms",
                quiet=quiet,
            )
        result["sweep"] = sweep
        ok = [r for r in sweep if r["recall"] >= 0.95]
        result["ef_search_for_0.95"] = ok[0]["ef_search"] if ok else None
        result["at_that_ef"] = ok[0] if ok else None
    finally:
        if not keep:
            store.drop_collection(name)
        store.close()
    result["load_end"] = load_now()
    return result


def _load(
    store: Any,
    name: str,
    n: int,
    dim: int,
    mix: Mixture,
    rng: Any,
    batch: int,
    label: Any,
    quiet: bool,
    content: Any = None,
) -> tuple[np.ndarray, float]:
    """A fresh collection of ``n`` vectors from ``mix`` (row i's (source, metadata) = ``label(i)``, its text
    ``content(i, cluster)`` or empty), loaded without its HNSW and lexical indexes (built afterwards, timed
    apart); the vectors and the load seconds."""
    from psycopg import sql

    from rag.store import ChunkRow, DocumentRow

    store.ensure_collection(name, dim=dim, embedding_model="synthetic-clustered")
    lex = store.target(name).lexical
    with store.connection() as conn:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(f"rag_chunks_{name}_hnsw")))
        if lex is not None:  # rebuilt by store.build_lexical where a benchmark searches lexically
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(lex.index)))
            if lex.method == "fts":
                conn.execute(
                    sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(
                        sql.Identifier(f"rag_chunks_{name}"), sql.Identifier(lex.column)
                    )
                )
        conn.commit()
    data = np.empty((n, dim), dtype=np.float32)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        m = min(batch, n - start)
        x, which = mix.draw(m, rng)
        data[start : start + m] = x
        lab = [label(i) for i in range(start, start + m)]
        docs = [DocumentRow(f"d{i}", lab[i - start][0], "h") for i in range(start, start + m)]
        text = [content(i, int(which[i - start])) if content else "" for i in range(start, start + m)]
        rows = [
            ChunkRow(str(i), f"d{i}", lab[i - start][0], 0, text[i - start], "h", lab[i - start][1])
            for i in range(start, start + m)
        ]
        store.write_batch(name, docs, rows, x)
        say(f"  loaded {start + m}/{n} ({time.perf_counter() - t0:.0f} s)", quiet=quiet)
    return data, round(time.perf_counter() - t0, 1)


def _build_hnsw(store: Any, index: str, chunks_t: Any, settings: Any, work_mem: str, workers: int) -> float:
    """CREATE INDEX ... USING hnsw with this session's build memory and workers, then ANALYZE; seconds."""
    from psycopg import sql

    with store.connection() as conn:
        conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(work_mem)))
        conn.execute(sql.SQL("SET max_parallel_maintenance_workers = {}").format(sql.Literal(workers)))
        t = time.perf_counter()
        conn.execute(
            sql.SQL(
                "CREATE INDEX {} ON {} USING hnsw (embedding vector_cosine_ops) "
                "WITH (m = {}, ef_construction = {})"
            ).format(
                sql.Identifier(index),
                chunks_t,
                sql.Literal(settings.hnsw_m),
                sql.Literal(settings.hnsw_ef_construction),
            )
        )
        conn.commit()
        seconds = round(time.perf_counter() - t, 1)
        conn.execute(sql.SQL("ANALYZE {}").format(chunks_t))
        conn.commit()
    return seconds


def summary(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"pgvector HNSW, {r['vectors']} clustered {r['dim']}-d vectors ({r['clusters']} clusters), "
        f"k={r['k']}",
        f"machine: {m['cpu_model']}, {m['cpus_usable']} CPUs, {m['date']}; load at start {r['load_start']}",
        f"load (COPY) {r['load_seconds']} s; HNSW build {r['build_seconds']} s (m={r['hnsw']['m']}, "
        f"ef_construction={r['hnsw']['ef_construction']}, maintenance_work_mem={r['maintenance_work_mem']}, "
        f"{r['parallel_workers']} workers); index {r['index_mib']} MiB; "
        f"exact scan p50 {r['exact_scan_p50_ms']} ms",
        f"{'ef_search':>10}{'recall':>9}{'p50 ms':>9}{'p99 ms':>9}",
    ]
    for s in r["sweep"]:
        lines.append(f"{s['ef_search']:>10}{s['recall']:>9}{s['p50_ms']:>9}{s['p99_ms']:>9}")
    best = r["at_that_ef"]
    lines.append(
        f"smallest ef_search with recall >= 0.95: {r['ef_search_for_0.95']}"
        + (f" (p50 {best['p50_ms']} ms, p99 {best['p99_ms']} ms)" if best else "")
        + f"; load at end {r['load_end']}"
    )
    return "\n".join(lines)


FILTERS: dict[str, tuple[dict[str, Any], int, int]] = {
    # label -> (filter, N, r): rows whose number i has i % N == r match
    "50%": ({"source": "even"}, 2, 0),
    "5%": ({"metadata": {"tag": "t5"}}, 20, 1),
    "0.1%": ({"source": {"prefix": "rare/"}}, 1000, 3),
}


def _labels(i: int) -> tuple[str, dict[str, Any]]:
    source = f"rare/{i}" if i % 1000 == 3 else ("even" if i % 2 == 0 else "odd")
    return source, {"tag": "t5" if i % 20 == 1 else "other", "i": i}


def run_filters(
    settings: Any,
    *,
    n: int = 200_000,
    dim: int = 384,
    clusters: int = 2000,
    n_queries: int = 100,
    k: int = 100,
    maintenance_work_mem: str = "1GB",
    parallel_workers: int = 1,
    batch: int = 20_000,
    keep: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Filtered search at three selectivities: recall@k vs exact filtered search, latency, rows, strategy."""
    from psycopg import sql

    from rag.db import database_url
    from rag.store import Store, parse_filter

    machine = machine_info()
    load_start = load_now()
    url = database_url(settings)
    store = Store(url, max_size=2, hnsw_m=settings.hnsw_m, hnsw_ef_construction=settings.hnsw_ef_construction)
    store.ef_search_min, store.ef_search_factor = settings.hnsw_ef_search_min, settings.hnsw_ef_search_factor
    name = "benchf_" + uuid.uuid4().hex[:10]
    say(f"filtered store benchmark: {n} {dim}-d vectors into {name!r}; load {load_start}", quiet=quiet)
    mix = Mixture(dim, clusters)
    rng = np.random.default_rng(11)
    result: dict[str, Any] = {
        "benchmark": "store-filters",
        "machine": machine,
        "server": store.server_info(),
        "load_start": load_start,
        "vectors": n,
        "dim": dim,
        "k": k,
        "queries": n_queries,
        "hnsw": {"m": settings.hnsw_m, "ef_construction": settings.hnsw_ef_construction},
        "ef_search_rule": f"max({store.ef_search_min}, k, k x {store.ef_search_factor}) x "
        f"{store.filtered_ef_factor} when filtered (at most 1000)",
    }
    try:
        index, chunks_t = f"rag_chunks_{name}_hnsw", sql.Identifier(f"rag_chunks_{name}")
        data, result["load_seconds"] = _load(store, name, n, dim, mix, rng, batch, _labels, quiet)
        result["build_seconds"] = _build_hnsw(
            store, index, chunks_t, settings, maintenance_work_mem, parallel_workers
        )
        say(f"  HNSW built in {result['build_seconds']} s", quiet=quiet)
        queries = mix.sample(n_queries, np.random.default_rng(99))
        idx = np.arange(n)
        cases: list[tuple[str, dict[str, Any] | None, np.ndarray]] = [("none", None, idx)]
        cases += [(label, f, idx[idx % every == r]) for label, (f, every, r) in FILTERS.items()]
        rows_out = []
        for iterative in (True, False):
            if not iterative:
                store._server = {**store.server_info(), "iterative_scan": False}
            for label, raw, members in cases:
                f = parse_filter(raw) if raw else None
                sub = data[members]
                truth = members[np.argsort(-(queries @ sub.T), axis=1, kind="stable")[:, :k]]
                for q in queries[:10]:  # warm the pages this filter touches
                    store.search(name, q, k, filter=f)
                lat, rec, got, strategies = [], [], [], {}
                for q, tr in zip(queries, truth, strict=True):
                    t = time.perf_counter()
                    hits = store.search(name, q, k, filter=f)
                    lat.append((time.perf_counter() - t) * 1e3)
                    want = set(map(str, tr))
                    rec.append(len(want & {h["id"] for h in hits}) / len(want))
                    got.append(len(hits))
                    strategies[hits.strategy] = strategies.get(hits.strategy, 0) + 1
                row = {
                    "iterative_scan": iterative,
                    "filter": label,
                    "filter_json": raw,
                    "matching_rows": len(members),
                    "recall": round(float(np.mean(rec)), 4),
                    "p50_ms": round(pct(lat, 50), 2),
                    "p99_ms": round(pct(lat, 99), 2),
                    "rows_min": int(min(got)),
                    "rows_mean": round(float(np.mean(got)), 1),
                    "strategies": strategies,
                }
                rows_out.append(row)
                say(
                    f"  iterative={iterative} filter {label}: recall@{k} {row['recall']}, "
                    f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                    f"rows {row['rows_min']}..{max(got)}, {strategies}",
                    quiet=quiet,
                )
        result["results"] = rows_out
    finally:
        if not keep:
            store.drop_collection(name)
        store.close()
    result["load_end"] = load_now()
    return result


def filters_summary(r: dict[str, Any]) -> str:
    m, srv = r["machine"], r["server"]
    lines = [
        f"filtered pgvector search, {r['vectors']} clustered {r['dim']}-d vectors, k={r['k']}, "
        f"{r['queries']} queries; PostgreSQL {srv['postgresql']}, pgvector {srv['pgvector']}",
        f"machine: {m['cpu_model']}, {m['cpus_usable']} CPUs, {m['date']}; load at start {r['load_start']}",
        f"load {r['load_seconds']} s, HNSW build {r['build_seconds']} s; ef_search {r['ef_search_rule']}",
        f"{'iterative':>10}{'filter':>7}{'matching':>10}{'recall':>8}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'rows':>10}  strategy",
    ]
    for x in r["results"]:
        rows = f"{x['rows_min']}/{x['rows_mean']:g}"
        strat = ", ".join(f"{s} {c}" for s, c in sorted(x["strategies"].items()))
        lines.append(
            f"{'yes' if x['iterative_scan'] else 'no':>10}{x['filter']:>7}{x['matching_rows']:>10}"
            f"{x['recall']:>8}{x['p50_ms']:>8}{x['p99_ms']:>8}{rows:>10}  {strat}"
        )
    lines.append(f"rows = min/mean returned; load at end {r['load_end']}")
    return "\n".join(lines)
