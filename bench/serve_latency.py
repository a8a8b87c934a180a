"""Serve-layer figures on this machine: /search latency at concurrency 1, reranker batching at concurrency C.

    RAG_OFFLINE=1 .venv/bin/python -m bench.serve_latency [--config serve_config.cpu.yaml]
        [--collection default] [--n 30] [--concurrency 16] [--rounds 2] [--fetch-k 100] [--top-k 8] [--out F]

Starts its own local Ray and the app from the config (like `rag serve`: the embedded database of RAG_DATA_DIR
unless RAG_DATABASE_URL is set) on free ports, then

1. concurrency 1: ``--n`` sequential POST /search after 3 warm-ups -> client p50/p90 and the server's
   per-stage medians (timings_ms);
2. concurrency C: C clients, ``--rounds`` requests each -> the Reranker replica's own batch stats (largest
   batch in requests and in (query, document) pairs), read from the deployment through a DeploymentHandle.

Handle timeouts are raised to 600 s here so that large CPU batches are measured rather than degraded.
Prints one JSON object and shuts everything down. (`rag bench serve` load-tests an already running server.)
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

QUERIES = [
    "how do I parse a date string into a datetime",
    "read a file line by line",
    "thread safe queue between producer and consumer",
    "compress bytes with zlib",
    "sort a list of dictionaries by key",
    "join filesystem paths",
    "send an email over smtp",
    "generate a random integer in a range",
    "split a string on whitespace",
    "serialize an object to json",
    "run a subprocess and capture its output",
    "create a temporary directory",
    "parse command line arguments",
    "format a number with thousands separators",
    "compute a sha256 hash of a file",
    "open a url and read the response",
    "match a regular expression at the start of a string",
    "copy a file and its metadata",
    "measure elapsed time precisely",
    "read a csv file into rows",
    "encode bytes as base64",
    "wait for several asyncio tasks",
    "decimal arithmetic with exact rounding",
    "iterate over two lists in parallel",
    "convert a timestamp to utc",
    "read environment variables",
    "log a message with a timestamp",
    "deep copy a nested structure",
    "count occurrences of items",
    "check whether a path exists",
    "zip a directory into an archive",
    "unicode normalization of text",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--collection", default=None)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fetch-k", type=int, default=100)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="Also write the JSON to this file.")
    opt = ap.parse_args()

    import ray
    from ray import serve

    from deployments.launch import apply_settings, default_config, deploy, load_config
    from rag.db import database_url
    from rag.settings import Settings

    settings = Settings()
    if opt.collection:
        settings = settings.with_overrides(collection=opt.collection)
    config = opt.config or default_config()
    cfg = apply_settings(load_config(config), settings, database_url(settings))
    cfg["http_options"]["request_timeout_s"] = 600
    cfg["applications"][0]["args"].update(rerank_timeout_s=600, embed_timeout_s=600, retrieve_timeout_s=600)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(address="local", include_dashboard=False, _metrics_export_port=free_port(), log_to_driver=False)
    try:
        t0 = time.perf_counter()
        deploy(cfg, host="127.0.0.1", port=port)
        startup_s = time.perf_counter() - t0
        client = httpx.Client(timeout=900)
        body = {"fetch_k": opt.fetch_k, "top_k": opt.top_k}

        def search(q: str) -> tuple[float, dict]:
            t = time.perf_counter()
            r = client.post(url + "/search", json={"query": q, **body})
            r.raise_for_status()
            return (time.perf_counter() - t) * 1e3, r.json()

        for q in QUERIES[:3]:
            search(q)
        lat, stages = [], {"embed": [], "retrieve": [], "rerank": [], "total": []}
        info = None
        for i in range(opt.n):
            ms, out = search(QUERIES[(i + 3) % len(QUERIES)])
            lat.append(ms)
            info = out["reranker"]
            for k in stages:
                stages[k].append(out["timings_ms"][k])

        rr = serve.get_deployment_handle("Reranker", app_name=cfg["applications"][0]["name"])
        rr.stats.remote(reset=True).result(timeout_s=60)
        jobs = [QUERIES[i % len(QUERIES)] for i in range(opt.concurrency * opt.rounds)]
        t = time.perf_counter()
        with ThreadPoolExecutor(opt.concurrency) as ex:
            results = list(ex.map(search, jobs))
        wall = time.perf_counter() - t
        st = rr.stats.remote().result(timeout_s=60)
        conc = [ms for ms, _ in results]
        result = {
            "config": str(config),
            "collection": settings.collection,
            "fetch_k": opt.fetch_k,
            "top_k": opt.top_k,
            "startup_s": round(startup_s, 1),
            "reranker": info,
            "concurrency_1": {
                "requests": opt.n,
                "p50_ms": round(statistics.median(lat), 1),
                "p90_ms": round(pct(lat, 0.9), 1),
                "server_stage_median_ms": {k: round(statistics.median(v), 1) for k, v in stages.items()},
            },
            f"concurrency_{opt.concurrency}": {
                "requests": len(jobs),
                "reranked": sum(r["reranker"]["reranked"] for _, r in results),
                "p50_ms": round(statistics.median(conc), 1),
                "throughput_rps": round(len(jobs) / wall, 2),
                "reranker_batches": st["batches"],
                "largest_batch_requests": st["max_batch_requests"],
                "largest_batch_pairs": st["max_batch_pairs"],
                "recent_batches_requests_pairs": st["recent_batches"],
                "reranker_user_config": st["user_config"],
            },
        }
    finally:
        serve.shutdown()
        ray.shutdown()
    text = json.dumps(result, indent=2)
    if opt.out:
        opt.out.write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
