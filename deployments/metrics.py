"""Every metric the application exports, defined once.

Metrics are created with ``ray.serve.metrics`` and exported by Ray on its metrics export port with a
``ray_`` prefix (``rag_stage_latency_ms`` is scraped as ``ray_rag_stage_latency_ms_bucket`` etc.). Serve adds
the ``deployment``, ``replica`` and ``application`` tags itself. Ray's built-in ``ray_serve_*`` series
(request latency, queue lengths, replicas, ``ray_serve_actual_batch_size``) are reused, not duplicated.

Metric objects are created lazily, inside replicas (never at import time), and cached per process.
"""

from __future__ import annotations

from functools import cache
from typing import Any

__all__ = [
    "BATCH_PAIRS_BUCKETS",
    "BATCH_REQUESTS_BUCKETS",
    "CANDIDATES_BUCKETS",
    "LATENCY_MS_BUCKETS",
    "METRICS",
    "get",
]

# Resolves a 1-5 ms embed as well as a multi-second CPU rerank.
LATENCY_MS_BUCKETS = [1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750,
                      1000, 1500, 2000, 3000, 5000, 10000, 30000]
BATCH_PAIRS_BUCKETS = [1, 10, 50, 100, 200, 400, 800, 1600, 3200, 6400]
BATCH_REQUESTS_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
CANDIDATES_BUCKETS = [0, 1, 8, 16, 32, 64, 100, 200, 500, 1000]

# name -> (kind, description, tag keys, buckets). The single source for code, dashboards and docs.
METRICS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "rag_stage_latency_ms": (
        "histogram",
        "Latency of one pipeline stage in milliseconds, measured by the ingress around each stage call "
        "(stage: embed | retrieve | rerank | total).",
        ("stage",),
        LATENCY_MS_BUCKETS,
    ),
    "rag_rerank_phase_latency_ms": (
        "histogram",
        "Inside the Reranker replica, per batch: queue (request waited for its batch), tokenize, "
        "inference (forward passes), in milliseconds.",
        ("phase",),
        LATENCY_MS_BUCKETS,
    ),
    "rag_rerank_batch_pairs": (
        "histogram",
        "(query, document) pairs scored in one Reranker batch.",
        (),
        BATCH_PAIRS_BUCKETS,
    ),
    "rag_rerank_batch_requests": (
        "histogram",
        "Requests merged into one Reranker batch.",
        (),
        BATCH_REQUESTS_BUCKETS,
    ),
    "rag_candidates_per_request": (
        "histogram",
        "Candidates returned by stage 1 for one /search request.",
        (),
        CANDIDATES_BUCKETS,
    ),
    "rag_requests_total": (
        "counter",
        "Requests handled by the ingress (route, status code).",
        ("route", "status"),
        None,
    ),
    "rag_rerank_skipped_total": (
        "counter",
        "Searches answered in dense order without reranking (reason: budget | reranker_error | disabled).",
        ("reason",),
        None,
    ),
    "rag_errors_total": (
        "counter",
        "Errors by stage (embed | retrieve | rerank | ingress) and error_type (rag.errors type).",
        ("stage", "error_type"),
        None,
    ),
    "rag_db_pool_size": ("gauge", "Connections in the Retriever replica's pool (psycopg_pool pool_size).", (), None),
    "rag_db_pool_available": ("gauge", "Idle connections in the pool (pool_available).", (), None),
    "rag_db_pool_max": ("gauge", "Maximum connections of the pool (pool_max).", (), None),
    "rag_db_requests_waiting": ("gauge", "Requests waiting for a connection (requests_waiting).", (), None),
    "rag_model_info": (
        "gauge",
        "1 for each loaded model (role: embedder | reranker; model, backend, device, dtype, trained).",
        ("role", "model", "backend", "device", "dtype", "trained"),
        None,
    ),
}


@cache
def get(name: str) -> Any:
    """The ``ray.serve.metrics`` object for ``name`` (created on first use in this process)."""
    from ray.serve import metrics as m

    kind, desc, tags, buckets = METRICS[name]
    if kind == "histogram":
        return m.Histogram(name, description=desc, boundaries=buckets, tag_keys=tags)
    if kind == "counter":
        return m.Counter(name, description=desc, tag_keys=tags)
    return m.Gauge(name, description=desc, tag_keys=tags)
