"""`rag bench serve`: closed-loop load on a running Serve app's POST /search, at several concurrencies.

For each concurrency C: C async clients (httpx) send /search back to back for ``warmup`` seconds (not
recorded), then for ``duration`` seconds. Recorded for the requests that completed in the window (whenever
they started): latency p50/p95/p99, requests/s, errors by kind, per-stage server timings (``timings_ms``);
and the reranker batch sizes seen, from Ray's Prometheus endpoint (``ray_rag_rerank_batch_pairs``,
``ray_rag_rerank_batch_requests`` and ``ray_serve_actual_batch_size`` histograms, differenced before and
after the level). Served pairs/s = reranked candidates per second, measured from the first completion burst
to the last; compared with the in-process reranker's pairs/s (measured here first while the server is
idle, or taken from a ``rag bench rerank --out`` file).

Only loopback targets are allowed: this is a benchmark of the local app, not a load tool for other hosts.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from bench.common import load_now, machine_info, pct, say
from rag.errors import ConfigError

__all__ = ["parse_prometheus", "run", "summary"]

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
BATCH_METRICS = ("ray_rag_rerank_batch_pairs", "ray_rag_rerank_batch_requests", "ray_serve_actual_batch_size")
FALLBACK_QUERIES = [
    "how do I parse a date string into a datetime",
    "read a file line by line",
    "thread safe queue between producer and consumer",
    "compress bytes with zlib",
    "run a subprocess and capture its output",
    "serialize an object to json",
]
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise ConfigError(f"rag bench serve only targets this machine (127.0.0.1/localhost), not {host!r}")


def parse_prometheus(text: str, names: tuple[str, ...] = BATCH_METRICS) -> dict[str, dict[str, float]]:
    """Histograms ``names`` summed over label sets: {name: {"count", "sum", "le=<b>": cumulative count}}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        metric, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        for name in names:
            if not metric.startswith(name):
                continue
            if name == "ray_serve_actual_batch_size" and labels and 'deployment="Reranker"' not in labels:
                continue
            d = out.setdefault(name, {})
            suffix = metric[len(name) :]
            if suffix == "_count":
                d["count"] = d.get("count", 0.0) + value
            elif suffix == "_sum":
                d["sum"] = d.get("sum", 0.0) + value
            elif suffix == "_bucket":
                le = re.search(r'le="([^"]+)"', labels)
                if le:
                    key = f"le={le.group(1)}"
                    d[key] = d.get(key, 0.0) + value
    return out


def _scrape(metrics_url: str) -> dict[str, dict[str, float]] | None:
    import httpx

    try:
        r = httpx.get(metrics_url, timeout=5)
        r.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_prometheus(r.text)


def _batch_delta(before: dict | None, after: dict | None) -> dict[str, Any]:
    if before is None or after is None:
        return {"available": False}
    out: dict[str, Any] = {"available": True}
    for name in BATCH_METRICS:
        a, b = before.get(name, {}), after.get(name, {})
        n = b.get("count", 0.0) - a.get("count", 0.0)
        if n <= 0:
            continue
        buckets = {k[3:]: round(b[k] - a.get(k, 0.0)) for k in b if k.startswith("le=")}
        ordered = sorted(buckets.items(), key=lambda kv: float(kv[0]))
        median_le = next((le for le, c in ordered if c >= n / 2), None)
        max_le = next((le for le, c in ordered if c >= n), None)
        out[name] = {
            "batches": round(n),
            "median_bucket_le": median_le,  # exact: counts are exact in Ray's export
            "max_bucket_le": max_le,
            "mean_approx": round((b.get("sum", 0.0) - a.get("sum", 0.0)) / n, 2),  # Ray rebuilds _sum
            "cumulative_buckets": dict(ordered),
        }
    return out


async def _level(
    url: str, body: dict, queries: list[str], c: int, warmup: float, duration: float, timeout: float
) -> dict[str, Any]:
    import httpx

    lat: list[float] = []
    stages: dict[str, list[float]] = {}
    errors: Counter[str] = Counter()
    pairs = 0
    done: list[tuple[float, int]] = []  # (completion time, reranked pairs)
    info: dict[str, Any] = {}
    counter = 0
    t_start = time.perf_counter()
    t_rec = t_start + warmup
    t_end = t_rec + duration

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal pairs, counter, info
        while time.perf_counter() < t_end:
            q = queries[counter % len(queries)]
            counter += 1
            t0 = time.perf_counter()
            try:
                r = await client.post("/search", json={**body, "query": q})
                status = r.status_code
                data = r.json() if status == 200 else None
            except httpx.HTTPError as e:
                status, data = None, None
                err = type(e).__name__
            t1 = time.perf_counter()
            if t1 < t_rec or t1 > t_end:
                continue  # completed during the warm-up, or after the window
            if status != 200:
                errors[str(status) if status is not None else err] += 1
                continue
            lat.append((t1 - t0) * 1e3)
            for k, v in (data.get("timings_ms") or {}).items():
                stages.setdefault(k, []).append(float(v))
            rr = data.get("reranker") or {}
            if rr.get("reranked"):
                pairs += int(data.get("candidates", 0))
                done.append((t1, int(data.get("candidates", 0))))
            else:
                errors[f"not_reranked:{rr.get('reason')}"] += 1
            if not info:
                info = rr

    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(c)))
    n = len(lat)
    return {
        "concurrency": c,
        "duration_s": duration,
        "requests": n,
        "requests_per_s": round(n / duration, 2),
        "p50_ms": round(pct(lat, 50), 1),
        "p95_ms": round(pct(lat, 95), 1),
        "p99_ms": round(pct(lat, 99), 1),
        "errors": dict(errors),
        "served_pairs_per_s": _steady_rate(done) or round(pairs / duration, 1),
        "served_pairs_per_s_window": round(pairs / duration, 1),
        "server_stage_p50_ms": {k: round(pct(v, 50), 1) for k, v in stages.items()},
        "reranker": info,
    }


def _steady_rate(done: list[tuple[float, int]], gap: float = 1.0) -> float | None:
    """Pairs/s between the first and the last completion, not counting the first burst.

    At high concurrency requests complete in bursts (one Serve batch at a time), so pairs / window is off
    by up to one batch; the rate from the first burst to the last is not.
    """
    if len(done) < 2:
        return None
    done = sorted(done)
    t_a, t_b = done[0][0], done[-1][0]
    later = [p for t, p in done if t > t_a + gap]
    if not later or t_b - t_a <= gap:
        return None
    return round(sum(later) / (t_b - t_a), 1)


def _served_candidates(
    settings: Any, queries: list[str], collection: str | None, fetch_k: int, quiet: bool
) -> list[list[str]] | None:
    """The candidates the running app reranks for ``queries``: stage 1 on the same database and collection."""
    import warnings

    from rag.pipeline import Pipeline

    coll = collection or settings.collection
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = Pipeline(settings.with_overrides(collection=coll, reranker="none"))
        try:
            out = [[h["content"] for h in p.retrieve(q, fetch_k, collection=coll)] for q in queries]
        finally:
            p.close()
    except Exception as e:  # no database here, or another collection: fall back to Cranfield's candidates
        say(
            f"served candidates unavailable ({type(e).__name__}: {e}); using Cranfield dense candidates",
            quiet=quiet,
        )
        return None
    return out if all(out) else None


def _score_cache_on(url: str) -> bool:
    """Whether the app's Reranker caches scores (GET /info); False when /info does not say."""
    import httpx

    try:
        info = httpx.get(url.rstrip("/") + "/info", timeout=10).json()
        return bool(info["stages"]["reranker"]["score_cache"]["enabled"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False


def _inprocess(
    settings: Any,
    dataset: Any,
    rerank_json: Path | None,
    quiet: bool,
    collection: str | None = None,
    fetch_k: int = 100,
) -> dict[str, Any] | None:
    if rerank_json is not None:
        r = json.loads(Path(rerank_json).read_text())
        return {
            "source": str(rerank_json),
            "pairs_per_s": r["ours"]["pairs_per_s"],
            "p50_ms": r["ours"]["p50_ms"],
        }
    import warnings

    from bench.common import dense_candidates, load_cranfield
    from rag.embed import Embedder
    from rag.rerank import make_reranker

    try:
        ds = load_cranfield(dataset)
    except ConfigError as e:
        say(f"in-process reference skipped: {e}", quiet=quiet)
        return None
    say("measuring the in-process reranker (server idle) ...", quiet=quiet)
    qs = sorted({int(i) for i in np.linspace(0, len(ds.queries) - 1, 20)})  # as `rag bench rerank`
    served = _served_candidates(settings, [ds.queries[qi] for qi in qs], collection, fetch_k, quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if served is not None:
            sets = [[(ds.queries[qi], d) for d in docs] for qi, docs in zip(qs, served, strict=True)]
            source = "the served collection's own candidates (stage 1 in-process)"
        else:
            emb = Embedder(settings.embedding_model, dtype="float32", offline=settings.offline)
            top, _ = dense_candidates(ds, emb, fetch_k, cache_dir=settings.data_dir / "bench", quiet=quiet)
            sets = [[(ds.queries[qi], ds.docs[j]) for j in top[qi]] for qi in qs]
            source = "Cranfield dense candidates (numpy exact search)"
        rr = make_reranker(settings)
    rr.score(sets[0])
    lat, pairs = [], 0
    for ps in sets:
        t = time.perf_counter()
        rr.score(ps)
        lat.append((time.perf_counter() - t) * 1e3)
        pairs += len(ps)
    del rr
    return {
        "queries": [ds.queries[qi] for qi in qs],
        "source": f"measured in-process, server idle: {len(sets)} Cranfield queries, {source}",
        "pairs_per_s": round(pairs / (sum(lat) / 1e3), 1),
        "p50_ms": round(pct(lat, 50), 1),
    }


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lv = result["levels"]
    cs = [x["concurrency"] for x in lv]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
        a1.plot(cs, [x[key] for x in lv], style, label=key.replace("_ms", ""))
    a1.set(xscale="log", xlabel="concurrency", ylabel="latency (ms)", title="/search latency")
    a1.set_xticks(cs, [str(c) for c in cs])
    a1.legend()
    a2.plot(cs, [x["requests_per_s"] for x in lv], "o-", color="C0", label="requests/s")
    a2.set(xscale="log", xlabel="concurrency", ylabel="requests/s", title="throughput")
    a2.set_xticks(cs, [str(c) for c in cs])
    b = a2.twinx()
    b.plot(cs, [x["served_pairs_per_s"] for x in lv], "s--", color="C1", label="served pairs/s")
    ip = (result.get("inprocess") or {}).get("pairs_per_s")
    if ip:
        b.axhline(ip, color="C2", ls=":", label="in-process pairs/s")
    b.set_ylabel("pairs/s")
    a2.legend(loc="upper left")
    b.legend(loc="lower right")
    m = result["machine"]
    fig.suptitle(f"rag bench serve: {m['cpu_model']}, {m['cpus_usable']} CPUs, {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    settings: Any,
    *,
    url: str = "http://127.0.0.1:8000",
    metrics_url: str = "http://127.0.0.1:8080/metrics",
    levels: list[int] | None = None,
    duration: float = 60.0,
    warmup: float = 5.0,
    collection: str | None = None,
    fetch_k: int = 100,
    top_k: int = 8,
    dataset: Any = None,
    inprocess: bool = True,
    rerank_json: Path | None = None,
    out_dir: Path = Path("results"),
    metrics_wait: float = 12.0,
    timeout: float = 120.0,
    quiet: bool = False,
) -> dict[str, Any]:
    import httpx

    _check_loopback(url)
    _check_loopback(metrics_url)
    levels = levels or [1, 4, 16]
    if not 0 < duration <= 600:
        raise ConfigError("--duration must be between 0 and 600 seconds")
    try:
        httpx.get(url.rstrip("/") + "/healthz", timeout=5).raise_for_status()
    except httpx.HTTPError as e:
        raise ConfigError(f"no Serve app answers at {url} ({e}): start it first (`rag serve`)") from e
    machine = machine_info()
    load_start = load_now()
    ref = (
        _inprocess(settings, dataset, rerank_json, quiet, collection, fetch_k)
        if (inprocess or rerank_json)
        else None
    )
    try:
        from bench.common import load_cranfield

        queries = load_cranfield(dataset).queries
    except ConfigError:
        queries = FALLBACK_QUERIES
    if ref and ref.get("queries"):
        queries = ref["queries"]  # the load cycles over the very queries the in-process reference timed
    body: dict[str, Any] = {"fetch_k": fetch_k, "top_k": top_k}
    if collection:
        body["collection"] = collection
    probe = httpx.post(url.rstrip("/") + "/search", json={**body, "query": queries[0]}, timeout=timeout)
    if probe.status_code != 200:
        raise ConfigError(f"/search answered {probe.status_code}: {probe.text[:300]}")
    cache_on = _score_cache_on(url)
    if cache_on:
        say(
            "WARNING: the app's rerank score cache is on and the load repeats its queries, so after the "
            "first round /search reads cached scores: latencies are not the reranker's and the c=1 "
            "comparison with the in-process reranker is left out. Restart the app with "
            "RAG_RERANK_CACHE=false to measure it.",
            quiet=quiet,
        )
    out: list[dict[str, Any]] = []
    for c in levels:
        say(f"concurrency {c}: {warmup:.0f} s warm-up + {duration:.0f} s ...", quiet=quiet)
        before = _scrape(metrics_url)
        lv = asyncio.run(_level(url.rstrip("/"), body, queries, c, warmup, duration, timeout))
        time.sleep(metrics_wait)  # Ray exports metrics every few seconds
        lv["batches"] = _batch_delta(before, _scrape(metrics_url))
        lv["load_after"] = load_now()
        out.append(lv)
        say(
            f"  {lv['requests']} requests, {lv['requests_per_s']}/s, p50 {lv['p50_ms']} ms, "
            f"p95 {lv['p95_ms']} ms, p99 {lv['p99_ms']} ms, errors {lv['errors']}, "
            f"served pairs/s {lv['served_pairs_per_s']}",
            quiet=quiet,
        )
    result: dict[str, Any] = {
        "benchmark": "serve",
        "machine": machine,
        "load_start": load_start,
        "url": url,
        "fetch_k": fetch_k,
        "top_k": top_k,
        "levels": out,
        "inprocess": ref,
        "score_cache_on": cache_on,
    }
    top_level = max(out, key=lambda x: x["concurrency"])
    c1 = next((x for x in out if x["concurrency"] == 1), None)
    if ref:
        result["served_vs_inprocess_pairs"] = round(top_level["served_pairs_per_s"] / ref["pairs_per_s"], 3)
        if c1 and not cache_on:
            result["c1_p50_minus_rerank_p50_ms"] = round(c1["p50_ms"] - ref["p50_ms"], 1)
    if c1 and c1["server_stage_p50_ms"].get("rerank"):
        # what serving adds around the reranker call: stage 1, the ingress and HTTP
        result["c1_p50_minus_served_rerank_stage_p50_ms"] = round(
            c1["p50_ms"] - c1["server_stage_p50_ms"]["rerank"], 1
        )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    result["json_path"] = str(out_dir / f"bench-serve-{stamp}.json")
    result["png_path"] = str(out_dir / f"bench-serve-{stamp}.png")
    _plot(result, Path(result["png_path"]))
    Path(result["json_path"]).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def summary(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"/search load test at {r['url']} (fetch_k {r['fetch_k']}, top_k {r['top_k']})",
        f"machine: {m['cpu_model']}, {m['cpus_usable']} CPUs, {m['date']}; load at start {r['load_start']}",
        f"{'conc':>5}{'req/s':>8}{'p50':>9}{'p95':>9}{'p99':>9}{'pairs/s':>9}"
        f"{'batch pairs<= p50/max':>22}  errors",
    ]
    for x in r["levels"]:
        bx = x["batches"].get("ray_rag_rerank_batch_pairs", {})
        bp = f"{bx.get('median_bucket_le', '-')}/{bx.get('max_bucket_le', '-')}"
        lines.append(
            f"{x['concurrency']:>5}{x['requests_per_s']:>8}{x['p50_ms']:>9}{x['p95_ms']:>9}{x['p99_ms']:>9}"
            f"{x['served_pairs_per_s']:>9}{bp:>22}  {x['errors'] or '-'}"
        )
    if r.get("inprocess"):
        ip = r["inprocess"]
        lines.append(
            f"in-process reranker: {ip['pairs_per_s']} pairs/s, p50 {ip['p50_ms']} ms ({ip['source']}); "
            f"served/in-process pairs/s at the top concurrency: {r.get('served_vs_inprocess_pairs')}; "
            f"c=1 p50 - rerank p50: {r.get('c1_p50_minus_rerank_p50_ms')} ms"
        )
    if r.get("c1_p50_minus_served_rerank_stage_p50_ms") is not None:
        lines.append(
            "c=1 p50 - the ingress's rerank-stage p50 (stage 1 + ingress + HTTP): "
            f"{r['c1_p50_minus_served_rerank_stage_p50_ms']} ms"
        )
    if r.get("score_cache_on"):
        lines.append("score cache ON: repeated queries read cached scores (restart: RAG_RERANK_CACHE=false)")
    lines.append(f"saved {r['json_path']} and {r['png_path']}")
    return "\n".join(lines)
