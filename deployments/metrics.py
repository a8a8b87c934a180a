"""Every metric the application exports, defined once.

Metrics are created with ``ray.serve.metrics`` and exported by Ray on its metrics export port with a
``ray_`` prefix (``rag_stage_latency_ms`` is scraped as ``ray_rag_stage_latency_ms_bucket`` etc.). Serve adds
the ``deployment``, ``replica`` and ``application`` tags itself. Ray's built-in ``ray_serve_*`` series
(request latency, queue lengths, replicas, ``ray_serve_actual_batch_size``) are reused, not duplicated.

Metric objects are created lazily, inside replicas (never at import time), and cached per process.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

from rag.errors import RagError

if TYPE_CHECKING:
    from rag.rerank_stats import BatchReport

__all__ = [
    "BATCH_PAIRS_BUCKETS",
    "BATCH_REQUESTS_BUCKETS",
    "CANDIDATES_BUCKETS",
    "GAUGE_REFRESH_S",
    "LATENCY_MS_BUCKETS",
    "METRICS",
    "RAY_SERVE_METRICS",
    "SKIP_REASONS_COUNTED",
    "HeldGauge",
    "export_model_zeros",
    "export_zeros",
    "exported_series",
    "from_stage",
    "get",
    "model_info",
    "model_load",
    "model_unloaded",
    "model_zero_series",
    "record_rerank_batch",
    "stage_error",
    "zero_series",
]

# The reasons a search skipped stage 2 that rag_rerank_skipped_total counts (not_requested and no_candidates
# are the caller's or the data's doing, not a degradation).
SKIP_REASONS_COUNTED = ("budget", "overloaded", "reranker_error", "disabled")

# Resolves a 1-5 ms embed as well as a multi-second CPU rerank.
LATENCY_MS_BUCKETS = [1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750,
                      1000, 1500, 2000, 3000, 5000, 10000, 30000]  # fmt: skip
BATCH_PAIRS_BUCKETS = [1, 10, 50, 100, 200, 400, 800, 1600, 3200, 6400]
BATCH_REQUESTS_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
# Ray rejects a 0 boundary (it must be positive): le=0.5 is the bucket of requests with no candidates.
CANDIDATES_BUCKETS = [0.5, 1, 8, 16, 32, 64, 100, 200, 500, 1000]

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
        "inference (forward passes), in milliseconds (model: the served model's name).",
        ("phase", "model"),
        LATENCY_MS_BUCKETS,
    ),
    "rag_rerank_batch_pairs": (
        "histogram",
        "(query, document) pairs scored in one Reranker batch (model: the served model's name).",
        ("model",),
        BATCH_PAIRS_BUCKETS,
    ),
    "rag_rerank_batch_requests": (
        "histogram",
        "Requests merged into one Reranker batch (a batch holds one model's requests).",
        ("model",),
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
        "Searches answered in dense order without reranking "
        "(reason: budget | overloaded | reranker_error | disabled).",
        ("reason",),
        None,
    ),
    "rag_auth_failures_total": (
        "counter",
        "Requests refused with 401 (no or an unknown API key), by route.",
        ("route",),
        None,
    ),
    "rag_errors_total": (
        "counter",
        "Errors by stage (embed | retrieve | rerank | ingress) and error_type (rag.errors type).",
        ("stage", "error_type"),
        None,
    ),
    "rag_rerank_cache_hits_total": (
        "counter",
        "(query, document) pairs the Reranker replica answered from its score cache, per model.",
        ("model",),
        None,
    ),
    "rag_rerank_cache_misses_total": (
        "counter",
        "(query, document) pairs looked up in the score cache and not found (computed by the model).",
        ("model",),
        None,
    ),
    "rag_rerank_cache_entries": (
        "gauge",
        "Entries in the Reranker replica's score cache of each model.",
        ("model",),
        None,
    ),
    "rag_rerank_cache_bytes": (
        "gauge",
        "Estimated bytes held by the Reranker replica's score cache of each model (each bounded by "
        "rerank_cache_bytes).",
        ("model",),
        None,
    ),
    "rag_rerank_model_loads_total": (
        "counter",
        "Loads of a served rerank model by a Reranker replica (outcome: ok | error); a load after an "
        "eviction counts again.",
        ("model", "outcome"),
        None,
    ),
    "rag_rerank_model_loaded": (
        "gauge",
        "1 while the Reranker replica holds the model loaded, 0 once evicted (least recently used) or "
        "before its first load.",
        ("model",),
        None,
    ),
    "rag_rerank_model_load_seconds": (
        "gauge",
        "How long the replica's last load of the model took (seconds).",
        ("model",),
        None,
    ),
    "rag_db_pool_size": (
        "gauge",
        "Connections in the Retriever replica's pool (psycopg_pool pool_size).",
        (),
        None,
    ),
    "rag_db_pool_available": ("gauge", "Idle connections in the pool (pool_available).", (), None),
    "rag_db_pool_max": ("gauge", "Maximum connections of the pool (pool_max).", (), None),
    "rag_db_requests_waiting": ("gauge", "Requests waiting for a connection (requests_waiting).", (), None),
    "rag_db_replica_lag_seconds": (
        "gauge",
        "Replay lag of each read replica (server: host:port/db of a database_read_urls entry), as the "
        "Retriever replica's probe measured it: 0 while it has replayed all it received; the last value "
        "while it is down.",
        ("server",),
        None,
    ),
    "rag_db_replica_up": (
        "gauge",
        "1 while the read replica takes searches, 0 while its breaker is open (down, or lagging past "
        "read_replica_max_lag_s: its searches go to the primary).",
        ("server",),
        None,
    ),
    "rag_model_info": (
        "gauge",
        "1 for each loaded model (role: embedder | reranker; model, backend, device, dtype, trained).",
        ("role", "model", "backend", "device", "dtype", "trained"),
        None,
    ),
}


# Ray Serve's built-in series that the dashboards and alerts reuse (Ray 2.60 names, checked against a running
# app). name -> (kind, meaning, labels). Ray adds the ``ray_`` prefix on export, like for ours; counters get
# ``_total``. Replica-level series also carry ``replica``; handle-level ones ``handle`` and ``actor_id``.
_HTTP = ("application", "route", "method", "status_code")
_DEP = ("application", "deployment")
_REPLICA = ("application", "deployment", "replica")
_BATCH = ("application", "deployment", "replica", "function_name")
_HANDLE = ("application", "deployment", "handle", "actor_id")
RAY_SERVE_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "serve_num_http_requests": ("counter", "HTTP requests answered by the Serve proxy.", _HTTP),
    "serve_http_request_latency_ms": (
        "histogram",
        "End-to-end HTTP latency measured at the Serve proxy (ms).",
        _HTTP,
    ),
    "serve_deployment_processing_latency_ms": (
        "histogram",
        "Time a replica spent in the deployment's handler (ms).",
        (*_REPLICA, "route"),
    ),
    "serve_deployment_queued_queries": (
        "gauge",
        "Requests waiting in a handle for a replica (router queue).",
        _HANDLE,
    ),
    "serve_num_ongoing_requests_at_replicas": (
        "gauge",
        "Requests a handle has sent to replicas and not yet seen finish.",
        _HANDLE,
    ),
    "serve_batch_queue_length": ("gauge", "Requests waiting in a replica's @serve.batch queue.", _BATCH),
    "serve_actual_batch_size": (
        "histogram",
        "Items in each @serve.batch call (requests, or batch_size_fn's count).",
        _BATCH,
    ),
    "serve_batch_utilization_percent": (
        "histogram",
        "Batch size as a percentage of max_batch_size (actual / max * 100).",
        _BATCH,
    ),
    "serve_deployment_replica_healthy": (
        "gauge",
        "1 per healthy replica, 0 once it fails or stops (sum = ready replicas).",
        _REPLICA,
    ),
    "serve_autoscaling_target_replicas": (
        "gauge",
        "Replicas the controller is steering the deployment to (every deployment).",
        _DEP,
    ),
    "serve_autoscaling_desired_replicas": (
        "gauge",
        "Autoscaling policy's raw decision, before min/max bounds (autoscaling only).",
        _DEP,
    ),
    "serve_autoscaling_target_ongoing_requests": (
        "gauge",
        "Configured target_ongoing_requests per replica (autoscaling deployments only).",
        _DEP,
    ),
}


def exported_series(name: str) -> list[str]:
    """The series names Prometheus scrapes for ``name`` (ours or a built-in), with Ray's ``ray_`` prefix."""
    kind = METRICS[name][0] if name in METRICS else RAY_SERVE_METRICS[name][0]
    base = "ray_" + name
    if kind == "histogram":
        return [base + "_bucket", base + "_sum", base + "_count"]
    if kind == "counter":  # the exporter appends _total unless the name already ends with it
        return [base if base.endswith("_total") else base + "_total"]
    return [base]


# Ray 2.60's metrics agent drops a gauge series that its process has not set for two export intervals (about
# 20 s), so a gauge set once (rag_model_info) or only under traffic (pool stats) would vanish from Prometheus
# while the replica is idle. Our gauges therefore keep re-setting their last values every GAUGE_REFRESH_S.
GAUGE_REFRESH_S = 5.0


class HeldGauge:
    """A ``ray.serve.metrics.Gauge`` whose last value per tag set is re-exported until the process ends."""

    _all: ClassVar[list[HeldGauge]] = []
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _thread: ClassVar[threading.Thread | None] = None

    def __init__(self, gauge: Any) -> None:
        self.gauge = gauge
        self._last: dict[tuple[tuple[str, str], ...], float] = {}

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        key = tuple(sorted((tags or {}).items()))
        with HeldGauge._lock:
            self._last[key] = value
            if self not in HeldGauge._all:
                HeldGauge._all.append(self)
            if HeldGauge._thread is None:
                HeldGauge._thread = threading.Thread(
                    target=HeldGauge._refresh_forever, name="rag-gauges", daemon=True
                )
                HeldGauge._thread.start()
        self.gauge.set(value, tags=dict(key))

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.gauge, attr)

    @classmethod
    def _refresh_forever(cls) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            with cls._lock:
                held = [(g.gauge, list(g._last.items())) for g in cls._all]
            for gauge, values in held:
                for key, value in values:
                    with contextlib.suppress(Exception):  # a refresh must never take the replica down
                        gauge.set(value, tags=dict(key))


@cache
def get(name: str) -> Any:
    """The ``ray.serve.metrics`` object for ``name`` (created on first use in this process); gauges are
    ``HeldGauge`` wrappers (same ``set``), so their last values stay exported while idle."""
    from ray.serve import metrics as m

    kind, desc, tags, buckets = METRICS[name]
    if kind == "histogram":
        return m.Histogram(name, description=desc, boundaries=buckets, tag_keys=tags)
    if kind == "counter":
        return m.Counter(name, description=desc, tag_keys=tags)
    return HeldGauge(m.Gauge(name, description=desc, tag_keys=tags))


def model_zero_series(models: list[str]) -> dict[str, list[dict[str, str]]]:
    """The per-model counters a Reranker replica creates at 0 for each served model at start-up (the score
    cache's hits and misses, the loads), so per-model panels read 0, not "No data", before any traffic."""
    one = [{"model": m} for m in models]
    loads = [{"model": m, "outcome": o} for m in models for o in ("ok", "error")]
    return {
        "rag_rerank_cache_hits_total": one,
        "rag_rerank_cache_misses_total": one,
        "rag_rerank_model_loads_total": loads,
    }


def export_model_zeros(models: list[str]) -> None:
    """Create every ``model_zero_series(models)`` counter at 0 in this process (each Reranker replica), and
    ``rag_rerank_model_loaded`` at 0 for each model."""
    from deployments._ray_compat import counter_add_zero

    for name, label_sets in model_zero_series(models).items():
        counter = get(name)
        for tags in label_sets:
            if not counter_add_zero(counter, dict(tags)):
                break
    for m in models:
        get("rag_rerank_model_loaded").set(0, tags={"model": m})


def zero_series() -> dict[str, list[dict[str, str]]]:
    """The label sets of the error and skip counters that exist (at 0) from start-up, so that dashboards and
    alerts read 0, not "No data", before the first error: every reason a search may skip the rerank, and per
    stage the errors its calls can end with (the rag.errors types' own error_type)."""
    from rag.errors import (
        ConfigError,
        ModelError,
        ModelUnavailable,
        Overloaded,
        RerankerError,
        StageTimeout,
        StageUnavailable,
        StoreUnavailable,
    )

    retryable = [Overloaded, StageTimeout, StageUnavailable]
    per_stage: dict[str, list[type]] = {
        "embed": [*retryable, ModelError],
        "retrieve": [*retryable, StoreUnavailable],
        "rerank": [*retryable, RerankerError, ModelUnavailable],
        "ingress": [ConfigError],
    }
    errors = [{"stage": s, "error_type": c.error_type} for s, types in per_stage.items() for c in types]
    errors.append({"stage": "ingress", "error_type": "internal_error"})  # a bug (ingress.py's 500 row)
    return {
        "rag_errors_total": errors,
        "rag_rerank_skipped_total": [{"reason": r} for r in SKIP_REASONS_COUNTED],
    }


def export_zeros() -> None:
    """Create every ``zero_series()`` series at 0 in this process (the Ingress calls it at start-up).

    Ray's ``Counter.inc`` refuses 0, so this goes through ``deployments._ray_compat.counter_add_zero``;
    where a Ray release has moved what that uses, the series appear at their first count (cosmetic)."""
    from deployments._ray_compat import counter_add_zero

    for name, label_sets in zero_series().items():
        counter = get(name)
        for tags in label_sets:
            if not counter_add_zero(counter, dict(tags)):
                return


def model_info(role: str, info: dict[str, Any], *, backend: str | None = None) -> None:
    """``rag_model_info`` = 1 for the model a replica loaded (``info``: its ``info()``)."""
    tags = {
        "role": role,
        "model": str(info.get("model")),
        "backend": str(backend or info.get("backend")),
        "device": str(info.get("device")),
        "dtype": str(info.get("dtype")),
        "trained": str(info.get("trained")).lower(),
    }
    get("rag_model_info").set(1, tags=tags)


def record_rerank_batch(report: BatchReport, *, model: str) -> None:
    """One Reranker batch of ``model`` (``rag.rerank_engine``'s observer): sizes, phases, each item's queue
    wait, the score cache."""
    t = report.timings
    m = {"model": model}
    get("rag_rerank_batch_pairs").observe(report.pairs, tags=m)
    get("rag_rerank_batch_requests").observe(report.items, tags=m)
    phase = get("rag_rerank_phase_latency_ms")
    for q_ms in report.queue_ms:
        phase.observe(q_ms, tags={"phase": "queue", **m})
    if report.pairs > t.cache_hits:  # something went through the model
        phase.observe(t.tokenize_ms, tags={"phase": "tokenize", **m})
    phase.observe(t.inference_ms, tags={"phase": "inference", **m})
    cache = report.cache
    if cache is not None:
        if t.cache_hits:
            get("rag_rerank_cache_hits_total").inc(t.cache_hits, tags=m)
        if t.cache_misses:
            get("rag_rerank_cache_misses_total").inc(t.cache_misses, tags=m)
        get("rag_rerank_cache_entries").set(len(cache), tags=m)
        get("rag_rerank_cache_bytes").set(cache.bytes, tags=m)


def model_load(model: str, *, ok: bool, seconds: float | None = None) -> None:
    """A Reranker replica loaded ``model`` (or failed to)."""
    get("rag_rerank_model_loads_total").inc(tags={"model": model, "outcome": "ok" if ok else "error"})
    if ok:
        get("rag_rerank_model_loaded").set(1, tags={"model": model})
    if seconds is not None:
        get("rag_rerank_model_load_seconds").set(seconds, tags={"model": model})


def model_unloaded(model: str) -> None:
    """The replica's multiplexer evicted ``model``."""
    get("rag_rerank_model_loaded").set(0, tags={"model": model})


# Errors a stage call ended with (counted there, or deliberately not): the ingress does not count them again.
_FROM_STAGE: weakref.WeakSet[BaseException] = weakref.WeakSet()


def stage_error(stage: str, err: BaseException, *, count: bool = True) -> None:
    """``err`` ended a call to ``stage``: count it in rag_errors_total (unless ``count`` is False)."""
    _FROM_STAGE.add(err)
    if count:
        error_type = err.error_type if isinstance(err, RagError) else type(err).__name__
        get("rag_errors_total").inc(tags={"stage": stage, "error_type": error_type})


def from_stage(err: BaseException) -> bool:
    """Whether ``err`` came from a stage call (so the ingress does not count it as its own)."""
    return err in _FROM_STAGE
