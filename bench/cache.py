"""`rag bench cache`: the rerank score cache on repeated /search traffic, cache off and on, in one run.

Starts its own local Ray + Serve app (serve_config.cpu.yaml, or --config) on this machine's database and a
collection of the stdlib demo corpus (ingested first when it is missing), then sends the same sequence of
``requests`` /search requests twice, one at a time: with ``rerank_cache`` off, then (the Reranker
redeployed) on, starting cold. The sequence draws from ``distinct`` queries with Zipf(``zipf_s``)
frequencies (rank i has probability proportional to 1 / i^s), seeded. Queries are the first words of
demo docstrings. Recorded per mode: latency p50/p95/mean (client side), the server's rerank milliseconds,
and the pair hit rate read from the Reranker's ``/info`` (``score_cache``) before and after. The rankings
of the two modes are compared too (identical ids per request, the fidelity of the cache in service).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import load_now, machine_info, pct, say

__all__ = ["run", "summary", "zipf_sequence"]

COLLECTION = "bench_cache"


def zipf_sequence(n: int, distinct: int, s: float, seed: int = 0) -> list[int]:
    """``n`` ranks in [0, distinct) drawn with probability proportional to 1 / (rank + 1)^s."""
    p = 1.0 / np.arange(1, distinct + 1, dtype=np.float64) ** s
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(distinct, size=n, p=p / p.sum())]


def _queries(distinct: int) -> list[str]:
    """``distinct`` queries: the first words of demo docstrings spread over the whole corpus."""
    from rag.ingest import iter_demo

    pool, seen = [], set()
    for d in iter_demo(limit=3000):
        words = [w for w in d.content.split()[1:9] if w.isascii()]  # without the qualified name
        q = " ".join(words).strip(" .,:;")
        if len(words) >= 4 and q.lower() not in seen:
            seen.add(q.lower())
            pool.append(q)
    if len(pool) < distinct:
        raise RuntimeError(f"the demo corpus gave only {len(pool)} distinct queries")
    step = len(pool) / distinct
    return [pool[int(i * step)] for i in range(distinct)]


def _ensure_collection(settings: Any, url: str, collection: str, docs: int) -> int:
    from rag.embed import make_embedder
    from rag.ingest import Document, ingest, iter_demo
    from rag.store import Store

    store = Store(url, max_size=2)
    try:
        n = store.count(collection)
        if n:
            return n
        say(f"ingesting {docs} demo documents into {collection!r} ...")
        emb = make_embedder(settings)
        items = [Document(d.doc_id, d.content, d.source, d.metadata) for d in iter_demo(limit=docs)]
        ingest(items, embedder=emb, store=store, collection=collection, chunk_tokens=settings.chunk_tokens)
        return store.count(collection)
    finally:
        store.close()


def _pass(url: str, queries: list[str], seq: list[int], fetch_k: int, top_k: int) -> dict[str, Any]:
    import httpx

    lat, rerank_ms, ids, reranked = [], [], [], 0
    with httpx.Client(timeout=300) as c:
        for i in seq:
            t0 = time.perf_counter()
            r = c.post(url + "/search", json={"query": queries[i], "fetch_k": fetch_k, "top_k": top_k})
            lat.append((time.perf_counter() - t0) * 1e3)
            r.raise_for_status()
            body = r.json()
            reranked += bool(body["reranker"]["reranked"])
            rerank_ms.append(float(body["timings_ms"].get("rerank", 0.0)))
            ids.append([h["id"] for h in body["results"]])
    return {
        "latency_ms": {
            "p50": round(pct(lat, 50), 1),
            "p95": round(pct(lat, 95), 1),
            "mean": round(float(np.mean(lat)), 1),
        },
        "server_rerank_ms": {"p50": round(pct(rerank_ms, 50), 1), "p95": round(pct(rerank_ms, 95), 1)},
        "reranked": reranked,
        "ids": ids,
    }


def _cache_info(url: str) -> dict[str, Any]:
    import httpx

    info = httpx.get(url + "/info", timeout=60).json()
    return info["stages"]["reranker"].get("score_cache", {})


def run(
    settings: Any,
    *,
    config: Path | None,
    requests: int,
    distinct: int,
    zipf_s: float,
    seed: int,
    fetch_k: int,
    top_k: int,
    collection: str,
    demo_docs: int,
) -> dict[str, Any]:
    import ray

    from deployments.launch import CPU_CONFIG, apply_settings, deploy, load_config
    from rag.db import database_url

    url_db = database_url(settings, start=True)
    chunks = _ensure_collection(settings, url_db, collection, demo_docs)
    queries = _queries(distinct)
    seq = zipf_sequence(requests, distinct, zipf_s, seed)
    base = load_config(config or CPU_CONFIG)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {
        "benchmark": "rerank score cache on repeated /search traffic",
        "machine": machine_info(),
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "collection": collection,
        "chunks": chunks,
        "requests": requests,
        "distinct_queries": distinct,
        "distinct_drawn": len(set(seq)),
        "zipf_s": zipf_s,
        "seed": seed,
        "fetch_k": fetch_k,
        "top_k": top_k,
        "modes": {},
    }
    ray.init(address="local", include_dashboard=False, namespace="rag-bench-cache", log_to_driver=False)
    try:
        for mode, on in (("off", False), ("on", True)):
            s = settings.with_overrides(rerank_cache=on, collection=collection)
            cfg = apply_settings(base, s, url_db)
            cfg["applications"][0]["args"]["rerank_cache"] = on
            say(f"deploying with rerank_cache={on} ...")
            deploy(cfg, host="127.0.0.1", port=port, timeout_s=900)
            _wait_ready(url)
            before = _cache_info(url)
            say(f"cache {mode}: {requests} /search requests, one at a time ...")
            load = load_now()
            res = _pass(url, queries, seq, fetch_k, top_k)
            after = _cache_info(url)
            hits = int(after.get("hits", 0)) - int(before.get("hits", 0))
            misses = int(after.get("misses", 0)) - int(before.get("misses", 0))
            res["pair_hit_rate"] = round(hits / (hits + misses), 4) if hits + misses else None
            res["cache"] = {
                k: after.get(k) for k in ("enabled", "max_entries", "max_bytes", "entries", "bytes")
            }
            res["load_before"] = load
            result["modes"][mode] = res
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    off, on = result["modes"]["off"].pop("ids"), result["modes"]["on"].pop("ids")
    result["same_rankings"] = sum(a == b for a, b in zip(off, on, strict=True))
    result["repeat_requests"] = requests - len(set(seq))
    return result


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=30).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")


def summary(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"rerank score cache: {r['requests']} /search requests over {r['distinct_queries']} queries, "
        f"Zipf({r['zipf_s']}) (seed {r['seed']}; {r['distinct_drawn']} distinct drawn), "
        f"fetch_k {r['fetch_k']}, "
        f"collection {r['collection']} ({r['chunks']} chunks)",
        f"machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs, {m['date']}",
        "",
        "| cache | p50 ms | p95 ms | mean ms | server rerank p50 / p95 ms | pair hit rate |",
        "|---|---|---|---|---|---|",
    ]
    for mode, x in r["modes"].items():
        hr = x["pair_hit_rate"]
        lines.append(
            f"| {mode} | {x['latency_ms']['p50']} | {x['latency_ms']['p95']} | {x['latency_ms']['mean']} | "
            f"{x['server_rerank_ms']['p50']} / {x['server_rerank_ms']['p95']} | "
            f"{'-' if hr is None else f'{hr:.1%}'} |"
        )
    lines.append("")
    lines.append(
        f"same top_k ids in both modes: {r['same_rankings']}/{r['requests']} requests; "
        f"{r['repeat_requests']} of the requests repeat an earlier query"
    )
    return "\n".join(lines)
