"""Reranker deployment: ``@serve.batch`` over the flattened (query, document) pairs of all queued requests.

One batch = one ``reranker.score(pairs)`` call over every pair of every request in it (the cross-encoder packs
them into forward passes by its token budget), run off the event loop; the scores are split back per request.

Batch size is bounded twice, both from ``user_config``: ``max_batch_size`` requests and
``max_pairs_per_batch`` pairs (the memory bound on a GPU fraction). Ray's ``batch_size_fn`` compares one
number with ``max_batch_size``, so ``_batch_cost`` returns a cost that exceeds ``max_batch_size`` exactly
when either bound would be exceeded. A request with more documents than the pair cap is split into several
items first.

Ray 2.60's batch queue forms the next batch ``batch_wait_timeout_s`` after its first request arrives, even
while the model is still busy with the previous one; under load that gives many small batches queued behind
each other (measured: a largest batch of 3 requests at concurrency 16). So requests wait at a gate while a
batch runs and are released together when it finishes: everything that queued meanwhile forms the next batch.

Admission: the caller passes how long it will wait (``deadline_s``, the ingress's rerank timeout). A request
that would finish after ``ADMIT_FRACTION`` (0.8) of that, judged from the pairs already admitted and this
replica's measured pairs/s, is refused at once with ``Overloaded`` instead of being computed for a caller
that has gone (before this, at concurrency 16 on 2 CPUs every batch ran past the 30 s timeout and nothing
was reranked). The ingress answers those searches in dense order with ``reason: overloaded``.

Long documents (``rerank_documents``, the rerank routes): each document is planned into windows first
(``rag.longdoc``), and every window is one pair: items, the pair cap, the batch cost and the admission
estimate all count windows. ``/search`` candidates (``rerank``) are chunks: one window each unless
``rerank_search_windows`` says more. Scores go through the replica's score cache (``rag.score_cache``)
unless ``rerank_cache`` is off: a batch computes only the pairs it lacks.

Fair capacity: a request goes through the batch queue one chunk of at most ``rerank_chunk_pairs`` pairs at a
time (its next chunk joins the queue when the previous one is scored), so every batch holds at most one
chunk per request and a 1,000-document request takes turns with the /search requests instead of holding the
replica for its whole run. Chunk boundaries are the cancellation points: a request that is cancelled (the
ingress's timeout, or its HTTP client went away; Serve cancels the replica's task) or whose ``deadline_s``
has passed sends no further chunk, and a batch drops, before it starts, the items of cancelled requests
(Ray's batch queue skips cancelled futures) and of requests past their deadline. Admission estimates the
wait under that sharing: a request of ``n`` pairs waits for at most as many rounds' worth of each active
request's pairs as it needs itself. The rerank routes refuse up front (422) a request costing more tokens
than ``rerank_max_request_tokens``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ray import serve

from deployments import metrics
from deployments._args import RerankerUserConfig
from deployments.autoscaling import PENDING_PAIRS
from rag.errors import InvalidInput, Overloaded, RerankerError, StageTimeout
from rag.longdoc import Plan, windower_for
from rag.rerank import make_reranker
from rag.score_cache import with_cache
from rag.settings import RerankerConfig
from rag.validation import check_text, validate_query

__all__ = ["Reranker"]

log = logging.getLogger("ray.serve")

_DEFAULTS = RerankerUserConfig()
# One batch runs at a time; the next one gathers at the gate meanwhile. Config rule:
# max_ongoing_requests >= max_batch_size * MAX_CONCURRENT_BATCHES (2x leaves room for the next batch to fill).
MAX_CONCURRENT_BATCHES = 1
# Admit a request only if its estimated finish is within this fraction of the caller's deadline: the rate is
# an estimate from past batches, and other processes on the node (stage 1 under load) can slow the next down.
ADMIT_FRACTION = 0.8


@dataclass(frozen=True)
class _Item:
    """One queued unit of work: a query and (a chunk of) its documents."""

    query: str
    documents: tuple[str, ...]
    request_cap: int
    pair_cap: int
    enqueued_at: float
    expires_at: float | None = None  # perf_counter() after which the caller no longer waits


@dataclass(frozen=True)
class _Part:
    """What one item got back from its batch."""

    scores: list[float]
    queue_ms: float  # from joining the batch queue to the batch starting
    batch: int  # which batch (a request's items may share one)
    batch_ms: float  # the batch's compute time (shared by everything in it)
    cache_hits: int


def _batch_cost(items: list[_Item]) -> int:
    """> request_cap iff the batch holds more than request_cap items or more than pair_cap pairs."""
    if not items:
        return 0
    request_cap, pair_cap = items[-1].request_cap, items[-1].pair_cap
    pairs = sum(len(i.documents) for i in items)
    return max(len(items), -(-pairs * request_cap // pair_cap))


def admission_wait_s(pending_pairs: int, pairs: int, pairs_per_s: float | None) -> float | None:
    """Seconds until a request of ``pairs`` would finish behind ``pending_pairs`` (None: no estimate yet)."""
    if not pairs_per_s or pending_pairs <= 0:
        return None  # idle, or nothing measured yet: always admitted
    return (pending_pairs + pairs) / pairs_per_s


def fair_pairs_ahead(remaining: list[int], pairs: int, chunk: int) -> int:
    """Pairs scored before a new request of ``pairs`` finishes, when every active request (``remaining``
    pairs each) contributes up to ``chunk`` pairs per round: at most as many rounds of each as it needs."""
    rounds_pairs = -(-pairs // chunk) * chunk
    return sum(min(r, rounds_pairs) for r in remaining)


def validate_rerank_input(query: object, documents: object) -> None:
    """The one text rule (``rag.validation``), applied before a request joins a batch."""
    validate_query(query)
    if not isinstance(documents, list | tuple):
        raise InvalidInput(f"documents must be a list of strings, got {type(documents).__name__}")
    for i, d in enumerate(documents):
        check_text(d, f"documents[{i}]")


@serve.deployment(name="Reranker", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class Reranker:
    """Wraps a ``rag.rerank.Reranker`` (cross-encoder, Cohere or none)."""

    def __init__(self, config: RerankerConfig) -> None:
        self.config = config
        self.reranker = make_reranker(config)
        self.scorer = with_cache(self.reranker, config)  # the reranker, behind the score cache when on
        self.windower = windower_for(self.reranker, config)
        self._info = dict(self.reranker.info())
        self._cfg = _DEFAULTS
        self._lock = threading.Lock()  # one score() at a time, so last_timings belongs to our call
        self._running = 0  # batches executing now
        self._gate = asyncio.Event()  # set while fewer than MAX_CONCURRENT_BATCHES run
        self._gate.set()
        self._stats = self._empty_stats()
        self._recent: deque[tuple[int, int]] = deque(maxlen=64)
        self._active: dict[int, int] = {}  # admitted requests -> their pairs not yet scored
        self._next_request = 0
        self._pairs_per_s: float | None = None  # per batch (compute time): min(last, EWMA)
        self._batch_no = 0
        metrics.get("rag_model_info").set(
            1,
            tags={
                "role": "reranker",
                "model": str(self._info.get("model")),
                "backend": str(self._info.get("backend")),
                "device": str(self._info.get("device")),
                "dtype": str(self._info.get("dtype")),
                "trained": str(self._info.get("trained")).lower(),
            },
        )

    # -- config ------------------------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        cfg = RerankerUserConfig.model_validate(user_config or {})
        self.score_batch.set_max_batch_size(cfg.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._cfg = cfg
        log.info("reranker user_config: %s", cfg.model_dump())

    # -- API ---------------------------------------------------------------------------------------
    async def rerank(self, query: str, documents: list[str], deadline_s: float | None = None) -> list[float]:
        """One score per /search candidate, in input order. Validated here, before joining a batch.

        Candidates are chunks: each is one pair (the model reads its first window) unless
        ``rerank_search_windows`` > 1. ``deadline_s``: how long the caller will wait; work that would finish
        later is refused (Overloaded).
        """
        validate_rerank_input(query, documents)
        if not documents:
            return []
        self._check_enabled()
        windows = self.config.rerank_search_windows
        if windows > 1 and self.windower is not None:
            plan = await asyncio.to_thread(self.windower.plan, query, documents, max_windows=windows)
            scores, _ = await self._score_queued(query, plan.texts, deadline_s)
            return [d.score for d in plan.combine(scores, self.config.rerank_long_documents)]
        scores, _ = await self._score_queued(query, list(documents), deadline_s)
        return scores

    async def rerank_documents(
        self,
        query: str,
        documents: list[str],
        deadline_s: float | None = None,
        *,
        max_tokens_per_doc: int | None = None,
        truncate: bool | None = None,
        field: str = "documents",
    ) -> dict[str, Any]:
        """The rerank routes: long documents split into windows, scores combined per document.

        ``max_tokens_per_doc``: tokens of each document read (default and cap: ``rerank_max_tokens_per_doc``).
        ``truncate`` (TEI): None splits long documents; True scores the first window only; False refuses
        (InvalidInput) a document that does not fit the model with the query. Returns scores, the best
        window's character span per document (None when not split), windows per document, and usage:
        pairs, tokens, cache hits, queue and inference milliseconds.
        """
        validate_rerank_input(query, documents)
        self._check_enabled()
        cap = self.config.rerank_max_tokens_per_doc
        if max_tokens_per_doc is not None and not 1 <= max_tokens_per_doc <= cap:
            raise InvalidInput(
                f"max_tokens_per_doc must be between 1 and {cap} (RAG_RERANK_MAX_TOKENS_PER_DOC), "
                f"got {max_tokens_per_doc}"
            )
        mode = self.config.rerank_long_documents
        t0 = time.perf_counter()
        plan: Plan | None = None
        if self.windower is not None:
            plan = await asyncio.to_thread(
                self.windower.plan,
                query,
                documents,
                max_tokens_per_doc=max_tokens_per_doc,
                max_windows=1 if (truncate is True or mode == "first") else None,
                too_long="error" if truncate is False else "split",
                field=field,
            )
        tokenize_ms = (time.perf_counter() - t0) * 1e3
        if plan is not None:
            self._check_cost(plan)
        texts = plan.texts if plan is not None else list(documents)
        scores, usage = await self._score_queued(query, texts, deadline_s)
        if plan is None:  # a backend that reads documents itself (Cohere)
            return {
                "scores": scores,
                "spans": [None] * len(scores),
                "windows": [1] * len(scores),
                "tokens": None,
                "tokenize_ms": tokenize_ms,
                **usage,
            }
        docs = plan.combine(scores, mode)
        return {
            "scores": [d.score for d in docs],
            "spans": [list(d.span) if d.span is not None else None for d in docs],
            "windows": [d.windows for d in docs],
            "tokens": plan.tokens,
            "tokenize_ms": tokenize_ms,
            **usage,
        }

    def _check_cost(self, plan: Plan) -> None:
        """The per-request cost cap (tokens of all pairs, as the model reads them): 422 before any work."""
        cap = self.config.rerank_max_request_tokens
        if plan.tokens > cap:
            self._stats["refused_cost"] += 1
            raise InvalidInput(
                f"this rerank request would cost {plan.tokens} tokens ({plan.n_pairs} query-window pairs), "
                f"more than the per-request cap of {cap} tokens (RAG_RERANK_MAX_REQUEST_TOKENS): send fewer "
                "or shorter documents, lower max_tokens_per_doc, or split the request"
            )

    def _check_enabled(self) -> None:
        if not self.reranker.enabled:
            raise RerankerError("reranking is disabled (RAG_RERANKER=none)")

    async def _score_queued(
        self, query: str, texts: list[str], deadline_s: float | None
    ) -> tuple[list[float], dict[str, Any]]:
        """Scores of (query, text) pairs through the batch queue, after admission, one chunk at a time, and
        usage figures. Stops between chunks when cancelled or past ``deadline_s`` (module docstring)."""
        n = len(texts)
        if n == 0:
            return [], {"pairs": 0, "cache_hits": 0, "queue_ms": 0.0, "inference_ms": 0.0}
        cfg = self._cfg
        step = max(1, min(cfg.max_pairs_per_batch, self.config.rerank_chunk_pairs))
        ahead = fair_pairs_ahead(list(self._active.values()), n, step)
        wait_s = admission_wait_s(ahead, n, self._pairs_per_s)
        if deadline_s is not None and wait_s is not None and wait_s > ADMIT_FRACTION * deadline_s:
            self._stats["refused_overloaded"] += 1
            raise Overloaded(
                f"the reranker is busy: this request would finish in about {wait_s:.1f}s "
                f"({ahead} pairs ahead at {self._pairs_per_s:.0f} pairs/s), later than "
                f"{ADMIT_FRACTION:.0%} of its {deadline_s:g}s deadline; retry later, or add Reranker "
                "replicas",
                retry_after_s=max(1.0, round(wait_s - deadline_s, 1)),
            )
        start = time.perf_counter()
        expires_at = start + deadline_s if deadline_s is not None else None
        rid, self._next_request = self._next_request, self._next_request + 1
        self._active[rid] = n
        self._stats["requests"] += 1
        self._stats["pairs_requested"] += n
        parts: list[_Part] = []
        done = 0
        try:
            for i in range(0, n, step):
                if expires_at is not None and time.perf_counter() >= expires_at:
                    self._stats["expired"] += 1
                    raise StageTimeout(
                        f"the rerank request passed its {deadline_s:g}s deadline after {done} of {n} pairs; "
                        "stopped (retry later, send fewer documents, or add Reranker replicas)",
                        retry_after_s=1.0,
                    )
                await self._gate.wait()  # while a batch runs, gather here: released together, one batch
                chunk = tuple(texts[i : i + step])
                item = _Item(
                    query, chunk, cfg.max_batch_size, cfg.max_pairs_per_batch, time.perf_counter(), expires_at
                )
                part = await self.score_batch(item)
                if isinstance(part, BaseException):  # this request's own failure (see _run_batch)
                    raise part
                parts.append(part)
                done += len(chunk)
                self._active[rid] = n - done
        except asyncio.CancelledError:  # the caller went away (client disconnect, the ingress's timeout)
            self._stats["cancelled"] += 1
            raise
        finally:
            del self._active[rid]
            self._stats["pairs_dropped"] += n - done
        batches = {p.batch: p.batch_ms for p in parts}
        usage = {
            "pairs": n,
            "cache_hits": sum(p.cache_hits for p in parts),
            "queue_ms": sum(p.queue_ms for p in parts),
            "inference_ms": sum(batches.values()),
        }
        return [s for part in parts for s in part.scores], usage

    def info(self) -> dict[str, Any]:
        """What this replica runs and the configuration it holds (GET /info; no secrets)."""
        cache = getattr(self.scorer, "cache", None)
        c = self.config
        return {
            **self._info,
            "score_cache": cache.info() if cache is not None else {"enabled": False},
            "long_documents": {
                "aggregation": c.rerank_long_documents,
                "max_tokens_per_doc": c.rerank_max_tokens_per_doc,
                "window_overlap": c.rerank_window_overlap,
                "search_windows": c.rerank_search_windows,
                "split": self.windower is not None,
            },
            "user_config": self._cfg.model_dump(),
            "max_concurrent_batches": MAX_CONCURRENT_BATCHES,
            "admit_fraction": ADMIT_FRACTION,
            "chunk_pairs": c.rerank_chunk_pairs,
            "max_request_tokens": c.rerank_max_request_tokens,
            "config": self.config.public(),
        }

    def ready(self) -> dict[str, Any]:
        return {**self._info, "enabled": self.reranker.enabled}

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Batching stats of this replica (tests and debugging): batches, largest batch, recent sizes; pairs
        requested, computed (``pairs``) and dropped (cancelled, expired); requests active now."""
        out = {
            **self._stats,
            "active_requests": len(self._active),
            "active_pairs": sum(self._active.values()),
            "recent_batches": [list(x) for x in self._recent],
            "user_config": self._cfg.model_dump(),
        }
        if reset:
            self._stats = self._empty_stats()
            self._recent.clear()
        return out

    # -- batching ----------------------------------------------------------------------------------
    @serve.batch(
        max_batch_size=_DEFAULTS.max_batch_size,
        batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s,
        max_concurrent_batches=MAX_CONCURRENT_BATCHES,
        batch_size_fn=_batch_cost,
    )
    async def score_batch(self, items: list[_Item]) -> list[_Part | BaseException]:
        self._running += 1
        if self._running >= MAX_CONCURRENT_BATCHES:
            self._gate.clear()
        try:
            # Ray has dropped the items of cancelled requests; drop those past their deadline too, unscored
            now = time.perf_counter()
            out: list[_Part | BaseException | None] = [None] * len(items)
            live = []
            for k, it in enumerate(items):
                if it.expires_at is not None and now >= it.expires_at:
                    self._stats["expired_items"] += 1
                    out[k] = StageTimeout(
                        "the rerank request passed its deadline while queued; not scored (retry later)",
                        retry_after_s=1.0,
                    )
                else:
                    live.append(k)
            if live:
                for k, part in zip(live, await self._run_batch([items[k] for k in live]), strict=True):
                    out[k] = part
            return [p for p in out if p is not None]
        finally:
            self._running -= 1
            if self._running < MAX_CONCURRENT_BATCHES:
                self._gate.set()

    async def _run_batch(self, items: list[_Item]) -> list[_Part | BaseException]:
        """Score the batch in one call; if that fails, each request alone, so only the bad one fails."""
        try:
            return list(await self._score_items(items))
        except Exception as e:
            if len(items) == 1 or self._cfg.inject_failure:
                raise
            log.warning("a batch of %d requests failed (%s); scoring them one by one", len(items), e)
        out: list[_Part | BaseException] = []
        for it in items:
            try:
                out.extend(await self._score_items([it]))
            except Exception as e:
                out.append(e)
        return out

    async def _score_items(self, items: list[_Item]) -> list[_Part]:
        start = time.perf_counter()
        self._batch_no += 1
        batch = self._batch_no
        queued = []
        for it in items:
            q_ms = (start - it.enqueued_at) * 1e3
            queued.append(q_ms)
            metrics.get("rag_rerank_phase_latency_ms").observe(q_ms, tags={"phase": "queue"})
        pairs = [(it.query, d) for it in items for d in it.documents]
        cfg = self._cfg
        if cfg.inject_delay_ms:
            await asyncio.sleep(cfg.inject_delay_ms / 1e3)
        if cfg.inject_failure:
            raise RerankerError("injected reranker failure (user_config.inject_failure=true)")
        scores, timings, hits = await asyncio.to_thread(self._score, pairs)
        batch_ms = (time.perf_counter() - start) * 1e3
        self._record(len(items), len(pairs), timings, batch_ms)
        out, i = [], 0
        for it, q_ms in zip(items, queued, strict=True):
            k = len(it.documents)
            out.append(_Part(scores[i : i + k], q_ms, batch, batch_ms, sum(hits[i : i + k])))
            i += k
        return out

    def _score(self, pairs: list[tuple[str, str]]) -> tuple[list[float], dict[str, float], list[bool]]:
        with self._lock:
            t0 = time.perf_counter()
            try:
                if hasattr(self.scorer, "score_with_hits"):
                    scores, timings, hits = self.scorer.score_with_hits(pairs)
                else:
                    scores = self.scorer.score(pairs)
                    timings = dict(getattr(self.scorer, "last_timings", None) or {})
                    hits = [False] * len(pairs)
            except RerankerError:
                raise
            except Exception as e:
                raise RerankerError(f"reranker failed: {type(e).__name__}: {e}") from e
            timings = dict(timings)
            timings.setdefault("inference_ms", (time.perf_counter() - t0) * 1e3)
        if len(scores) != len(pairs):
            raise RerankerError(f"reranker returned {len(scores)} scores for {len(pairs)} pairs")
        return [float(s) for s in scores], timings, list(hits)

    def _record(self, n_items: int, n_pairs: int, timings: dict[str, float], batch_ms: float) -> None:
        metrics.get("rag_rerank_batch_pairs").observe(n_pairs)
        cache = getattr(self.scorer, "cache", None)
        if cache is not None:
            if timings.get("cache_hits"):
                metrics.get("rag_rerank_cache_hits_total").inc(int(timings["cache_hits"]))
            if timings.get("cache_misses"):
                metrics.get("rag_rerank_cache_misses_total").inc(int(timings["cache_misses"]))
            metrics.get("rag_rerank_cache_entries").set(len(cache))
            metrics.get("rag_rerank_cache_bytes").set(cache.bytes)
        metrics.get("rag_rerank_batch_requests").observe(n_items)
        for phase in ("tokenize", "inference"):
            if f"{phase}_ms" in timings:
                metrics.get("rag_rerank_phase_latency_ms").observe(
                    timings[f"{phase}_ms"], tags={"phase": phase}
                )
        computed = n_pairs - int(timings.get("cache_hits", 0))  # pairs that went through the model
        if batch_ms > 0 and computed > 0:
            rate = computed / (batch_ms / 1e3)
            ewma = rate if self._pairs_per_s is None else 0.3 * rate + 0.7 * self._pairs_per_s
            self._pairs_per_s = min(rate, ewma)  # down at once when a batch runs slower, up gradually
        st = self._stats
        st["batches"] += 1
        st["items"] += n_items
        st["pairs"] += n_pairs
        st["max_batch_requests"] = max(st["max_batch_requests"], n_items)
        st["max_batch_pairs"] = max(st["max_batch_pairs"], n_pairs)
        st["last_batch_ms"] = round(batch_ms, 2)
        self._recent.append((n_items, n_pairs))

    @staticmethod
    def _empty_stats() -> dict[str, Any]:
        return {
            "batches": 0,
            "items": 0,
            "pairs": 0,  # pairs scored (computed or from the cache)
            "requests": 0,
            "pairs_requested": 0,
            "pairs_dropped": 0,  # of stopped requests: not delivered (the in-flight chunk may be scored)
            "cancelled": 0,
            "expired": 0,
            "expired_items": 0,
            "refused_overloaded": 0,
            "refused_cost": 0,
            "max_batch_requests": 0,
            "max_batch_pairs": 0,
            "last_batch_ms": None,
        }

    # -- autoscaling -------------------------------------------------------------------------------
    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve calls this on the replica (Ray 2.60 custom metrics): the pairs admitted and not yet
        scored, what ``deployments.autoscaling.PendingPairsPolicy`` scales on (``PENDING_PAIRS``)."""
        return {PENDING_PAIRS: float(sum(self._active.values()))}
