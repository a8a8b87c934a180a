"""`rag bench soak`: minutes of steady mixed load on a running app; errors by status, latency per route, RSS.

Closed-loop clients (httpx + asyncio, loopback only) each pick a route by a fixed weighted mix, seeded:
``/search`` with and without reranking, the three rerank routes (``/v2/rerank``, ``/v1/rerank``, ``/rerank``)
over candidates taken from a dense ``/search``, ``/embed`` and ``/v1/embeddings``. Reported per route:
requests, statuses, p50/p99 latency; overall: 5xx that are not deliberate (a 503 with Retry-After is
deliberate: the service shedding load), and each Serve replica's resident memory at start and end, read
from ``/proc`` (the replicas run on this machine; process titles ``ray::ServeReplica:<app>:<deployment>``).

Queries: the summary line of ``queries`` stdlib docstrings (the demo corpus), so most rerank pairs are new to
the score cache rather than 6 queries answered from it. RSS: the baseline is taken after ``warmup`` seconds of
the same load (allocator arenas, tokenizer and score caches fill first), then sampled every ``sample_s``; the
timeline shows whether memory plateaus or keeps climbing.

Target (issue 12): no 5xx other than deliberate 503s, RSS growth < 10% per replica after warm-up.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import machine_info, pct, rss_bytes, say
from bench.serve import FALLBACK_QUERIES, _check_loopback

__all__ = ["MIX", "replica_rss", "run", "summary"]

# route -> weight; the bodies are built in _body.
MIX: dict[str, int] = {
    "search": 4,
    "search_dense": 2,
    "v2_rerank": 1,
    "v1_rerank": 1,
    "tei_rerank": 1,
    "embed": 1,
    "openai_embeddings": 1,
}
PATHS = {
    "search": "/search",
    "search_dense": "/search",
    "v2_rerank": "/v2/rerank",
    "v1_rerank": "/v1/rerank",
    "tei_rerank": "/rerank",
    "embed": "/embed",
    "openai_embeddings": "/v1/embeddings",
}
RSS_GROWTH_TARGET = 0.10


def replica_rss() -> dict[str, int]:
    """Resident bytes of each Serve replica process on this machine, keyed ``Deployment#pid``."""
    out: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not title.startswith("ray::ServeReplica:"):
                continue
            rss = rss_bytes(proc.name)
        except (OSError, ValueError):
            continue
        # "ray::ServeReplica:rag:Reranker", or "...Reranker.handle_request_with_rejection" while it works
        deployment = title.split(":")[-1].split()[0].split(".")[0]
        out[f"{deployment}#{proc.name}"] = rss
    return out


def _body(route: str, query: str, docs: list[str], top_k: int, fetch_k: int) -> dict[str, Any]:
    if route == "search":
        return {"query": query, "top_k": top_k, "fetch_k": fetch_k}
    if route == "search_dense":
        return {"query": query, "top_k": top_k, "fetch_k": fetch_k, "rerank": False}
    if route == "v2_rerank":
        return {"query": query, "documents": docs, "top_n": top_k}
    if route == "v1_rerank":
        return {"query": query, "documents": docs, "top_n": top_k, "return_documents": False}
    if route == "tei_rerank":
        return {"query": query, "texts": docs}
    if route == "embed":
        return {"inputs": [query, *docs[:3]]}
    return {"input": [query, *docs[:3]]}


def _deliberate(status: int, headers: Any) -> bool:
    return status == 503 and "retry-after" in headers


async def _load(
    url: str,
    headers: dict[str, str],
    queries: list[str],
    docs: dict[str, list[str]],
    concurrency: int,
    duration: float,
    top_k: int,
    fetch_k: int,
    seed: int,
    sample_s: float = 30.0,
) -> dict[str, Any]:
    import httpx

    routes, weights = list(MIX), list(MIX.values())
    t_start = time.perf_counter()
    timeline: list[dict[str, Any]] = []
    lat: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, Counter[str]] = defaultdict(Counter)
    undeliberate: list[str] = []
    end = time.perf_counter() + duration

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rnd = random.Random(seed * 1000 + i)
        while time.perf_counter() < end:
            route = rnd.choices(routes, weights)[0]
            q = rnd.choice(queries)
            body = _body(route, q, docs[q], top_k, fetch_k)
            t0 = time.perf_counter()
            try:
                r = await http.post(url + PATHS[route], json=body, headers=headers)
            except httpx.HTTPError as e:
                statuses[route][type(e).__name__] += 1
                undeliberate.append(f"{route}: {type(e).__name__}")
                continue
            lat[route].append((time.perf_counter() - t0) * 1e3)
            statuses[route][str(r.status_code)] += 1
            if r.status_code >= 500 and not _deliberate(r.status_code, r.headers):
                undeliberate.append(f"{route}: {r.status_code} {r.text[:200]}")

    async def sampler() -> None:
        while True:
            mb = {k: round(v / 2**20, 1) for k, v in replica_rss().items()}
            timeline.append({"t_s": round(time.perf_counter() - t_start), "rss_mb": mb})
            if time.perf_counter() + sample_s > end:
                return
            await asyncio.sleep(sample_s)

    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(sampler(), *(client(i, http) for i in range(concurrency)))
    per_route = {
        route: {
            "requests": sum(statuses[route].values()),
            "statuses": dict(statuses[route]),
            "p50_ms": round(pct(lat[route], 50), 1) if lat[route] else None,
            "p99_ms": round(pct(lat[route], 99), 1) if lat[route] else None,
        }
        for route in routes
    }
    return {"routes": per_route, "undeliberate_5xx": undeliberate, "rss_timeline": timeline}


def _candidates(url: str, headers: dict[str, str], queries: list[str], n: int) -> dict[str, list[str]]:
    """Dense candidates per query (one /search each, rerank off): the rerank routes' documents."""
    import httpx

    out = {}
    with httpx.Client(timeout=60) as http:
        for q in queries:
            r = http.post(
                url + "/search", json={"query": q, "top_k": n, "fetch_k": n, "rerank": False}, headers=headers
            )
            r.raise_for_status()
            out[q] = [h["content"] for h in r.json()["results"]] or [q]
    return out


def demo_queries(n: int) -> list[str]:
    """The summary line of ``n`` stdlib docstrings (demo corpus; after the name line): distinct queries."""
    from rag.ingest import iter_demo

    out: list[str] = []
    for d in iter_demo(limit=4 * n):
        paras = d.content.strip().split("\n\n")
        line = paras[1].strip().splitlines()[0].strip() if len(paras) > 1 else ""
        if 20 <= len(line) <= 200 and line not in out:
            out.append(line)
        if len(out) == n:
            break
    return out or FALLBACK_QUERIES


def run(
    *,
    url: str,
    duration: float,
    warmup: float,
    queries: int,
    concurrency: int,
    documents: int,
    top_k: int,
    fetch_k: int,
    api_key: str | None,
    seed: int,
) -> dict[str, Any]:
    _check_loopback(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    qs = demo_queries(queries)
    say(f"soak: candidates for {len(qs)} queries from {url}")
    docs = _candidates(url, headers, qs, documents)
    if warmup > 0:
        say(f"soak: {warmup:.0f}s warm-up (not recorded)")
        asyncio.run(_load(url, headers, qs, docs, concurrency, warmup, top_k, fetch_k, seed + 1))
    rss_start = replica_rss()
    say(f"soak: {concurrency} clients for {duration:.0f}s, mix {MIX}; {len(rss_start)} replicas seen")
    t0 = time.perf_counter()
    load = asyncio.run(_load(url, headers, qs, docs, concurrency, duration, top_k, fetch_k, seed))
    wall = time.perf_counter() - t0
    rss_end = replica_rss()
    rss = {
        k: {
            "start_mb": round(v / 2**20, 1),
            "end_mb": round(rss_end[k] / 2**20, 1) if k in rss_end else None,
            "growth": round(rss_end[k] / v - 1, 4) if k in rss_end else None,
        }
        for k, v in sorted(rss_start.items())
    }
    growths = [r["growth"] for r in rss.values() if r["growth"] is not None]
    requests = sum(r["requests"] for r in load["routes"].values())
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "url": url,
        "duration_s": round(wall, 1),
        "warmup_s": warmup,
        "queries": len(qs),
        "concurrency": concurrency,
        "documents": documents,
        "mix": MIX,
        "requests": requests,
        **load,
        "rss": rss,
        "replicas_restarted": sorted(set(rss_start) - set(rss_end)),
        "max_rss_growth": max(growths) if growths else None,
        "pass": not load["undeliberate_5xx"]
        and bool(growths)
        and max(growths) < RSS_GROWTH_TARGET
        and set(rss_start) <= set(rss_end),
    }


def summary(r: dict[str, Any]) -> str:
    lines = [
        f"soak on {r['machine'].get('cpu_model')}: {r['requests']} requests in {r['duration_s']}s, "
        f"{r['concurrency']} clients, {r['queries']} distinct queries, {r['documents']} documents per rerank "
        f"call, after {r['warmup_s']:.0f}s of warm-up",
        f"{'route':<18} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8}  statuses",
    ]
    for route, s in r["routes"].items():
        lines.append(
            f"{route:<18} {s['requests']:>8} {s['p50_ms'] or '-':>8} {s['p99_ms'] or '-':>8}  {s['statuses']}"
        )
    lines.append(f"5xx that were not a deliberate 503 + Retry-After: {len(r['undeliberate_5xx'])}")
    lines.extend(f"  {x}" for x in r["undeliberate_5xx"][:10])
    for k, v in r["rss"].items():
        lines.append(
            f"RSS {k:<24} {v['start_mb']:>8} MB -> {v['end_mb']} MB ({v['growth']:+.1%})"
            if v["growth"] is not None
            else f"RSS {k:<24} {v['start_mb']:>8} MB -> gone (restarted)"
        )
    lines.append(
        f"target (no undeliberate 5xx, RSS growth < {RSS_GROWTH_TARGET:.0%}): "
        f"{'PASS' if r['pass'] else 'FAIL'}"
    )
    return "\n".join(lines)
