"""`rag bench fairness`: how long small /search requests wait while one large rerank runs (issue 20).

The scenario of issue 20 against a running app (loopback only): ``clients`` closed-loop clients search
(``fetch_k`` candidates each, distinct queries so the score cache does not answer them) for ``before``
seconds; then one ``/v2/rerank`` of ``documents`` documents of ``chars`` characters is sent and the same
clients keep searching until it returns. Reported for both phases:

- searches per second (completed searches / phase length);
- the rerank stage of each search as the ingress measured it (``timings_ms.rerank``: the wait for the
  Reranker plus the search's own compute), p50 and max;
- the wait: that stage time minus the p50 of the quiet phase (the search's own compute), p50 and max;
- whether every search was still reranked, and what happened to the large request (status, seconds).

The large request's documents are distinct slices of the stdlib demo corpus text, so no window repeats.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

from bench.common import load_now, machine_info, pct, say
from bench.serve import _check_loopback
from bench.soak import demo_queries

__all__ = ["run", "summary"]


def _corpus_text() -> str:
    from rag.ingest import iter_demo

    return " ".join(" ".join(d.content for d in iter_demo(limit=2000)).split())


def large_documents(n: int, chars: int) -> list[str]:
    """``n`` distinct documents of ``chars`` characters of English-like text (demo corpus slices)."""
    text = _corpus_text()
    step = max(1, (len(text) - chars) // max(1, n))
    long = text if step * n + chars <= len(text) else text * (1 + (step * n + chars) // len(text))
    return [f"{i}: " + long[i * step : i * step + chars] for i in range(n)]


class _Clients:
    """``n`` threads searching back to back; each search's (end time, rerank ms, reranked, seconds)."""

    def __init__(self, url: str, queries: list[str], n: int, fetch_k: int, headers: dict[str, str]) -> None:
        self.url, self.queries, self.fetch_k, self.headers = url, queries, fetch_k, headers
        self.stop = threading.Event()
        self.done: list[tuple[float, float, bool, float]] = []
        self.errors: list[str] = []
        self._next = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _query(self) -> str:
        with self._lock:
            q = self.queries[self._next % len(self.queries)]
            self._next += 1
        return q

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=300) as http:
            while not self.stop.is_set():
                body = {"query": self._query(), "fetch_k": self.fetch_k, "top_k": 5}
                t0 = time.monotonic()
                r = http.post(self.url + "/search", json=body, headers=self.headers)
                t1 = time.monotonic()
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                out = r.json()
                with self._lock:
                    self.done.append((t1, out["timings_ms"]["rerank"], out["reranker"]["reranked"], t1 - t0))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=600)

    def between(self, a: float, b: float) -> list[tuple[float, float, bool, float]]:
        with self._lock:
            return [d for d in self.done if a <= d[0] < b]


def _phase(rows: list[tuple[float, float, bool, float]], seconds: float, own_ms: float | None) -> dict:
    rerank = [r[1] for r in rows]
    out: dict[str, Any] = {
        "seconds": round(seconds, 1),
        "searches": len(rows),
        "searches_per_s": round(len(rows) / seconds, 2) if seconds > 0 else None,
        "all_reranked": all(r[2] for r in rows),
        "rerank_ms_p50": round(pct(rerank, 50), 1) if rerank else None,
        "rerank_ms_max": round(max(rerank), 1) if rerank else None,
        "latency_s_p50": round(pct([r[3] for r in rows], 50), 2) if rows else None,
        "latency_s_max": round(max(r[3] for r in rows), 2) if rows else None,
    }
    if own_ms is not None and rerank:
        waits = [max(0.0, x - own_ms) for x in rerank]
        out["wait_ms_p50"], out["wait_ms_max"] = round(pct(waits, 50), 1), round(max(waits), 1)
    return out


def run(
    *,
    url: str,
    documents: int,
    chars: int,
    clients: int,
    fetch_k: int,
    before: float,
    api_key: str | None,
) -> dict[str, Any]:
    import httpx

    _check_loopback(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    queries = demo_queries(400)
    docs = large_documents(documents, chars)
    say(f"fairness: warm-up searches on {url}")
    with httpx.Client(timeout=300) as http:
        for q in queries[-4:]:
            http.post(url + "/search", json={"query": q, "fetch_k": fetch_k}, headers=headers)
    load = load_now()
    pool = _Clients(url, queries[:-4], clients, fetch_k, headers)
    say(f"fairness: {clients} clients searching (fetch_k {fetch_k}) for {before:.0f}s")
    pool.start()
    t0 = time.monotonic()
    time.sleep(before)
    t1 = time.monotonic()
    say(f"fairness: one /v2/rerank of {documents} x {chars} characters while they search")
    with httpx.Client(timeout=600) as http:
        r = http.post(
            url + "/v2/rerank",
            json={"model": "rerank", "query": "how do I parse a date", "documents": docs},
            headers=headers,
        )
    t2 = time.monotonic()
    pool.join()
    quiet = _phase(pool.between(t0, t1), t1 - t0, None)
    own = quiet["rerank_ms_p50"]
    big: dict[str, Any] = {"status": r.status_code, "seconds": round(t2 - t1, 1)}
    if r.status_code == 200:
        big["pairs"] = int(r.headers.get("x-rerank-pairs", 0))
    else:
        big["error"] = r.text[:300]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_at_start": load,
        "url": url,
        "scenario": {"documents": documents, "chars": chars, "clients": clients, "fetch_k": fetch_k},
        "before": quiet,
        "during": _phase(pool.between(t1, t2), t2 - t1, own),
        "large_request": big,
        "errors": pool.errors[:5],
    }


def summary(r: dict[str, Any]) -> str:
    b, d, big = r["before"], r["during"], r["large_request"]
    return (
        f"{r['machine']['cpu_model']} ({r['machine']['cpus']} CPUs), load {r['load_at_start']}\n"
        f"before: {b['searches_per_s']} searches/s, rerank stage p50 {b['rerank_ms_p50']} ms, "
        f"max {b['rerank_ms_max']} ms\n"
        f"during: {d['searches_per_s']} searches/s over {d['seconds']} s, rerank stage p50 "
        f"{d['rerank_ms_p50']} ms, max {d['rerank_ms_max']} ms; wait p50 {d.get('wait_ms_p50')} ms, "
        f"max {d.get('wait_ms_max')} ms; all reranked: {d['all_reranked']}\n"
        f"large request: {big}"
    )
