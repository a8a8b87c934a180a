"""`rag bench store --modes`: dense, lexical and hybrid search at 200k chunks, with and without a filter.

Data: the clustered synthetic vectors of ``bench.store`` (``Mixture``), each row with a synthetic text whose
words follow the same clusters: 60 words, 30 % from its cluster's 40 topic words, the rest from a Zipf law
(s = 1) over a 30,000-word vocabulary of made-up words, its 50 commonest left out as stop words would be.
Queries: held-out vectors from the mixture with six words each, three from their cluster's topic and three
from the Zipf law, like a short natural-language question once stop words are gone. Every twentieth row's
``metadata.tag`` is ``t5``: the filtered runs use ``{"metadata": {"tag": "t5"}}`` (5 % of rows, as
``--filters`` does).

Loading goes through ``Store.write_batch`` with the HNSW and lexical indexes dropped; each index is built
afterwards and timed: HNSW, then pg_textsearch's BM25 (where the server has it), then the built-in full-text
search (the generated ``tsvector`` column, a table rewrite, and its GIN index). Sizes are the relations'
(``pg_relation_size``; for FTS also the column's bytes). Searches go through ``Store.search`` (the service's
own path): dense, then lexical and hybrid with BM25, then lexical and hybrid with FTS, each unfiltered and
filtered, after a warm-up of the same queries; p50 and p99 over ``queries`` queries, rows returned and the
strategies that ran. The machine may be shared: compare modes as ratios within one run.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np

from bench.common import load_now, machine_info, pct, say
from bench.store import Mixture, _build_hnsw, _load

__all__ = ["modes_summary", "run_modes"]

FILTER = {"metadata": {"tag": "t5"}}  # every 20th row: 5 %
WORDS_PER_ROW = 60
TOPIC_SHARE = 0.3
SYLLABLES = ["ka", "lo", "mi", "ren", "tus", "bor", "fe", "nal", "qui", "dro", "sen", "vap", "gil", "tor"]


class Vocabulary:
    """Made-up words, a Zipf law over them (its head left out, like stop words) and topics per cluster."""

    def __init__(self, clusters: int, size: int = 30_000, skip: int = 50, topic: int = 40, seed: int = 5):
        rng = np.random.default_rng(seed)
        words: set[str] = set()
        while len(words) < size:
            words.add("".join(rng.choice(SYLLABLES, size=rng.integers(2, 5))))
        self.words = np.array(sorted(words))
        rng.shuffle(self.words)
        ranks = np.arange(1, size + 1, dtype=np.float64)
        p = 1.0 / ranks
        p[:skip] = 0.0
        self.cdf = np.cumsum(p / p.sum())
        self.topics = rng.choice(size, size=(clusters, topic))
        self.rng = np.random.default_rng(seed + 1)

    def text(self, cluster: int, n: int, topic_share: float) -> str:
        k = round(n * topic_share)
        topical = self.rng.choice(self.topics[cluster], size=k)
        common = np.minimum(np.searchsorted(self.cdf, self.rng.random(n - k)), len(self.words) - 1)
        idx = np.concatenate([topical, common])
        self.rng.shuffle(idx)
        return " ".join(self.words[idx])


def _labels(i: int) -> tuple[str, dict[str, Any]]:
    return "synthetic", {"tag": "t5" if i % 20 == 1 else "other"}


def _size(conn: Any, rel: str) -> float:
    return round(conn.execute("SELECT pg_relation_size(%s::regclass)", [rel]).fetchone()[0] / 2**20, 1)


def _build_lexical(store: Any, name: str, method: str, work_mem: str) -> dict[str, Any]:
    """Build ``method``'s index (timed), record it as the collection's; its build seconds and sizes."""
    from psycopg import sql

    with store.connection() as conn:
        conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(work_mem)))
        conn.commit()
    t = time.perf_counter()
    lex = store.build_lexical(name, method)
    seconds = round(time.perf_counter() - t, 1)
    out: dict[str, Any] = {"method": method, "build_seconds": seconds, "index": lex.index}
    with store.connection() as conn:
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(f"rag_chunks_{name}")))
        out["index_mib"] = _size(conn, str(lex.index))
        if method == "fts":
            col = conn.execute(
                sql.SQL("SELECT sum(pg_column_size({})) FROM {}").format(
                    sql.Identifier(lex.column), sql.Identifier(f"rag_chunks_{name}")
                )
            ).fetchone()[0]
            out["column_mib"] = round(int(col or 0) / 2**20, 1)
        conn.commit()
    return out


def _measure(
    store: Any, name: str, queries: list[tuple[np.ndarray, str]], k: int, mode: str, filt: Any, warm: int
) -> dict[str, Any]:
    from rag.store import parse_filter

    f = parse_filter(filt) if filt else None
    for v, text in queries[:warm]:
        store.search(name, v, k, filter=f, query=text, mode=mode)
    lat, rows, strategies = [], [], {}
    for v, text in queries:
        t = time.perf_counter()
        hits = store.search(name, v, k, filter=f, query=text, mode=mode)
        lat.append((time.perf_counter() - t) * 1e3)
        rows.append(len(hits))
        strategies[hits.strategy] = strategies.get(hits.strategy, 0) + 1
    return {
        "p50_ms": round(pct(lat, 50), 2),
        "p99_ms": round(pct(lat, 99), 2),
        "rows_min": int(min(rows)),
        "rows_mean": round(float(np.mean(rows)), 1),
        "strategies": strategies,
    }


def run_modes(
    settings: Any,
    *,
    n: int = 200_000,
    dim: int = 384,
    clusters: int = 2000,
    n_queries: int = 200,
    k: int = 100,
    maintenance_work_mem: str = "1GB",
    parallel_workers: int = 1,
    batch: int = 20_000,
    keep: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Each mode's latency at ``n`` chunks, unfiltered and filtered (5 %); lexical index builds and sizes."""
    from psycopg import sql

    from rag.db import database_url
    from rag.store import Store

    machine, load_start = machine_info(), load_now()
    cfg: Any = settings.slice("store")
    store = Store(
        database_url(settings),
        max_size=2,
        hnsw_m=settings.hnsw_m,
        hnsw_ef_construction=settings.hnsw_ef_construction,
        fusion=cfg.fusion(),
    )
    store.ef_search_min, store.ef_search_factor = settings.hnsw_ef_search_min, settings.hnsw_ef_search_factor
    name = "benchm_" + uuid.uuid4().hex[:10]
    say(f"store modes benchmark: {n} chunks into {name!r}; load {load_start}", quiet=quiet)
    mix, vocab = Mixture(dim, clusters), Vocabulary(clusters)
    offer = store.lexical_info()
    result: dict[str, Any] = {
        "benchmark": "store-modes",
        "machine": machine,
        "server": {**store.server_info(), **offer},
        "load_start": load_start,
        "chunks": n,
        "dim": dim,
        "k": k,
        "queries": n_queries,
        "filter": FILTER,
        "fusion": vars(store.fusion),
        "depth": store.fusion.depth(k),
    }
    try:
        _, result["load_seconds"] = _load(
            store,
            name,
            n,
            dim,
            mix,
            np.random.default_rng(11),
            batch,
            _labels,
            quiet,
            content=lambda i, c: vocab.text(c, WORDS_PER_ROW, TOPIC_SHARE),
        )
        result["hnsw_build_seconds"] = _build_hnsw(
            store,
            f"rag_chunks_{name}_hnsw",
            sql.Identifier(f"rag_chunks_{name}"),
            settings,
            maintenance_work_mem,
            parallel_workers,
        )
        say(f"  loaded in {result['load_seconds']} s, HNSW in {result['hnsw_build_seconds']} s", quiet=quiet)
        qv, qc = mix.draw(n_queries, np.random.default_rng(99))
        queries = [(v, vocab.text(int(c), 6, 0.5)) for v, c in zip(qv, qc, strict=True)]
        warm = min(20, n_queries)
        rows: list[dict[str, Any]] = []

        def measure(mode: str, lexical: str | None) -> None:
            for label, filt in (("none", None), ("5%", FILTER)):
                r = {"mode": mode, "lexical": lexical, "filter": label}
                r.update(_measure(store, name, queries, k, mode, filt, warm))
                rows.append(r)
                say(
                    f"  {mode:<8} {lexical or '':<5} filter {label:<5} p50 {r['p50_ms']} ms, "
                    f"p99 {r['p99_ms']} ms, rows {r['rows_min']}, {r['strategies']}",
                    quiet=quiet,
                )

        measure("dense", None)
        result["lexical_indexes"] = []
        for method in ("bm25", "fts") if offer["lexical"] == "bm25" else ("fts",):
            built = _build_lexical(store, name, method, maintenance_work_mem)
            result["lexical_indexes"].append(built)
            say(
                f"  {method} index built in {built['build_seconds']} s, {built['index_mib']} MiB", quiet=quiet
            )
            measure("lexical", method)
            measure("hybrid", method)
        result["results"] = rows
    finally:
        if not keep:
            store.drop_collection(name)
        store.close()
    result["load_end"] = load_now()
    return result


def modes_summary(r: dict[str, Any]) -> str:
    m, srv = r["machine"], r["server"]
    dense = {x["filter"]: x["p50_ms"] for x in r["results"] if x["mode"] == "dense"}
    lines = [
        f"search modes at {r['chunks']} chunks ({r['dim']}-d, synthetic text), k={r['k']}, {r['queries']} "
        f"queries, hybrid depth {r['depth']} per side; PostgreSQL {srv['postgresql']}, pgvector "
        f"{srv['pgvector']}, pg_textsearch {srv['pg_textsearch'] or 'absent'}",
        f"machine: {m['cpu_model']}, {m['cpus_usable']} CPUs, {m['date']}; load at start {r['load_start']}",
        f"load {r['load_seconds']} s; HNSW build {r['hnsw_build_seconds']} s",
    ]
    for ix in r["lexical_indexes"]:
        extra = f" + tsvector column {ix['column_mib']} MiB" if "column_mib" in ix else ""
        lines.append(f"{ix['method']} index: build {ix['build_seconds']} s, {ix['index_mib']} MiB{extra}")
    lines.append(
        f"{'mode':<9}{'lexical':<8}{'filter':<7}{'p50 ms':>8}{'p99 ms':>8}{'x dense':>8}{'rows':>6}  strategy"
    )
    for x in r["results"]:
        ratio = x["p50_ms"] / dense[x["filter"]] if dense.get(x["filter"]) else float("nan")
        strat = ", ".join(f"{s} {c}" for s, c in sorted(x["strategies"].items()))
        lines.append(
            f"{x['mode']:<9}{x['lexical'] or '-':<8}{x['filter']:<7}{x['p50_ms']:>8}{x['p99_ms']:>8}"
            f"{ratio:>8.1f}{x['rows_min']:>6}  {strat}"
        )
    lines.append(
        f"rows = fewest returned; x dense = p50 / dense p50 (same filter); load at end {r['load_end']}"
    )
    return "\n".join(lines)
