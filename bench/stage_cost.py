"""`rag bench cost`: what one search costs in CPU time at each stage, the figures docs/scaling.md sizes from.

Wall time on a shared 2-CPU machine says more about the neighbours than about us; CPU seconds per search do
not depend much on what else runs (cache and memory-bandwidth contention aside), and they convert straight
into capacity: searches per second per core = 1 / CPU seconds per search. For each stage, on Cranfield's
queries against a collection of this machine's database (ingested on first use, as `rag eval` does):

- **embed**: the Embedder's work for one query embedded alone (as ``/search`` does), in this process
  (``time.process_time``: every thread of the process);
- **retrieve, client side**: ``Store.search`` in this process: building the SQL, psycopg, rows to dicts (the
  Retriever replica's share);
- **retrieve, PostgreSQL**: the CPU time of the server's processes (its postmaster and their children,
  ``/proc/<pid>/stat`` utime + stime) between the first and the last search, divided by the searches; the
  server's idle background work is included, so this errs high;
- **rerank**: the rerank backend scoring the ``fetch_k`` candidates of a query (``RerankEngine.rerank_sync``,
  as a Reranker replica runs it, score cache off), as CPU seconds per pair.

Each is also given as wall-clock p50 for reference. A stage that uses several threads (the reranker's
``rerank_threads``) shows CPU time above its wall time; pairs per second per core is what a CPU replica
with ``c`` cores gives, times ``c``, as long as the runtime scales over its threads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench.common import load_now, machine_info, pct, say

__all__ = ["postgres_cpu_s", "postmaster_pid", "run", "summary"]


def postmaster_pid(store: Any) -> int:
    """The pid of the server ``store`` talks to (its data folder's ``postmaster.pid``; same machine only)."""
    with store.connection() as conn:
        data_dir = conn.execute("SHOW data_directory").fetchone()[0]
    return int(Path(data_dir, "postmaster.pid").read_text().split()[0])


def postgres_cpu_s(postmaster: int) -> float:
    """CPU seconds (user + system) of the server: its postmaster and every process it started (backends,
    background workers) that is alive now (a search's backend lives in the pool for the whole run)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
        if int(pid) == postmaster or int(fields[1]) == postmaster:  # field 4: ppid
            total += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return total / tick


def _cpu_and_wall(fn: Any, items: list[Any]) -> tuple[float, list[float], list[Any]]:
    """Call ``fn`` on each item: this process's CPU seconds in all, the wall ms of each call, the results."""
    out, walls = [], []
    cpu0 = time.process_time()
    for it in items:
        t0 = time.perf_counter()
        out.append(fn(it))
        walls.append((time.perf_counter() - t0) * 1e3)
    return time.process_time() - cpu0, walls, out


def run(
    pipeline: Any,
    queries: list[str],
    *,
    collection: str,
    fetch_k: int = 100,
    mode: str = "dense",
    rerank_queries: int = 5,
) -> dict[str, Any]:
    """Measure each stage over ``queries`` (the reranker over the first ``rerank_queries`` of them)."""
    s = pipeline.settings
    result: dict[str, Any] = {
        "machine": machine_info(),
        "load_start": load_now(),
        "collection": collection,
        "chunks": pipeline.store.count(collection),
        "queries": len(queries),
        "fetch_k": fetch_k,
        "mode": mode,
        "embedder": {
            "model": s.embedding_model,
            "runtime": s.embedding_runtime,
            "threads": s.embedding_threads,
        },
        "reranker": {"model": s.rerank_model, "runtime": s.rerank_runtime, "threads": s.rerank_threads},
    }
    say(f"warming up the embedder, the store and the reranker on {collection} ...")
    emb, store = pipeline.embedder, pipeline.store
    for q in queries[:5]:
        store.search(collection, emb.embed_query(q), fetch_k, query=q, mode=mode)

    say(f"embed: {len(queries)} queries, one at a time ...")
    cpu, walls, vectors = _cpu_and_wall(emb.embed_query, queries)
    result["embed"] = {"cpu_ms": 1e3 * cpu / len(queries), "wall_p50_ms": pct(walls, 50)}

    say(f"retrieve: {len(queries)} searches at k={fetch_k} ({mode}) ...")
    pm = postmaster_pid(store)
    pg0 = postgres_cpu_s(pm)
    cpu, walls, hits = _cpu_and_wall(
        lambda qv: store.search(collection, qv[1], fetch_k, query=qv[0], mode=mode),
        list(zip(queries, vectors, strict=True)),
    )
    pg = postgres_cpu_s(pm) - pg0
    result["retrieve"] = {
        "client_cpu_ms": 1e3 * cpu / len(queries),
        "postgres_cpu_ms": 1e3 * pg / len(queries),
        "wall_p50_ms": pct(walls, 50),
    }

    n = min(rerank_queries, len(queries))
    if n:
        result["rerank"] = _rerank(pipeline, queries[:n], [[h["content"] for h in hits[i]] for i in range(n)])
    result["load_end"] = load_now()
    return result


def _rerank(pipeline: Any, queries: list[str], docs: list[list[str]]) -> dict[str, Any]:
    """The rerank engine (as a Reranker replica runs it) over each query's candidates."""
    from rag.rerank_engine import RerankOptions

    s, engine = pipeline.settings, pipeline.engine
    threads = s.rerank_threads or "all"
    say(f"rerank: {len(queries)} queries x their candidates ({s.rerank_runtime}, {threads} threads) ...")
    pairs = sum(len(d) for d in docs)
    cpu, walls, _ = _cpu_and_wall(
        lambda i: engine.rerank_sync(queries[i], docs[i], RerankOptions(kind="candidates")),
        list(range(len(queries))),
    )
    return {
        "pairs": pairs,
        "cpu_ms_per_pair": 1e3 * cpu / pairs,
        "wall_p50_ms": pct(walls, 50),
        "wall_pairs_per_s": pairs / (sum(walls) / 1e3),
    }


def summary(r: dict[str, Any]) -> str:
    e, rt, rr = r["embed"], r["retrieve"], r.get("rerank")
    per_core = lambda ms: 1e3 / ms if ms > 0 else float("inf")  # noqa: E731
    m = r["machine"]
    lines = [
        f"{m['cpu_model']}, {m['cpus']} CPUs; load {r['load_start']} -> {r['load_end']}",
        f"collection {r['collection']} ({r['chunks']:,} chunks), {r['queries']} queries, k={r['fetch_k']}, "
        f"mode {r['mode']}",
        "",
        "| stage | CPU per search | searches/s per core | wall p50 |",
        "|---|---|---|---|",
        f"| embed (one query) | {e['cpu_ms']:.2f} ms | {per_core(e['cpu_ms']):,.0f} | "
        f"{e['wall_p50_ms']:.2f} ms |",
        f"| retrieve: Retriever side | {rt['client_cpu_ms']:.2f} ms | {per_core(rt['client_cpu_ms']):,.0f} | "
        f"{rt['wall_p50_ms']:.2f} ms |",
        f"| retrieve: PostgreSQL | {rt['postgres_cpu_ms']:.2f} ms | "
        f"{per_core(rt['postgres_cpu_ms']):,.0f} | |",
    ]
    if rr:
        per_search = rr["cpu_ms_per_pair"] * r["fetch_k"]
        lines += [
            f"| rerank {r['fetch_k']} pairs | {per_search:.0f} ms | {per_core(per_search):.2f} | "
            f"{rr['wall_p50_ms']:.0f} ms |",
            "",
            f"rerank: {per_core(rr['cpu_ms_per_pair']):.1f} pairs/s per core of CPU time; "
            f"{rr['wall_pairs_per_s']:.1f} pairs/s wall with {r['reranker']['threads'] or 'all'} threads "
            f"({rr['pairs']} pairs)",
        ]
    return "\n".join(lines)
