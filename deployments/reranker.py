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
from rag.errors import InvalidInput, Overloaded, RerankerError
from rag.rerank import make_reranker
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
        self._info = dict(self.reranker.info())
        self._cfg = _DEFAULTS
        self._lock = threading.Lock()  # one score() at a time, so last_timings belongs to our call
        self._running = 0  # batches executing now
        self._gate = asyncio.Event()  # set while fewer than MAX_CONCURRENT_BATCHES run
        self._gate.set()
        self._stats = self._empty_stats()
        self._recent: deque[tuple[int, int]] = deque(maxlen=64)
        self._pending_pairs = 0  # admitted and not finished
        self._pairs_per_s: float | None = None  # per batch (compute time): min(last, EWMA)
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
        """One score per document, in input order. Validated here, before joining a batch.

        ``deadline_s``: how long the caller will wait; work that would finish later is refused (Overloaded).
        """
        validate_rerank_input(query, documents)
        if not documents:
            return []
        if not self.reranker.enabled:
            raise RerankerError("reranking is disabled (RAG_RERANKER=none)")
        n = len(documents)
        wait_s = admission_wait_s(self._pending_pairs, n, self._pairs_per_s)
        if deadline_s is not None and wait_s is not None and wait_s > ADMIT_FRACTION * deadline_s:
            raise Overloaded(
                f"the reranker is busy: this request would finish in about {wait_s:.1f}s "
                f"({self._pending_pairs} pairs ahead at {self._pairs_per_s:.0f} pairs/s), later than "
                f"{ADMIT_FRACTION:.0%} of its {deadline_s:g}s deadline; retry later, or add Reranker "
                "replicas",
                retry_after_s=max(1.0, round(wait_s - deadline_s, 1)),
            )
        cfg, now = self._cfg, time.perf_counter()
        step = cfg.max_pairs_per_batch
        items = [
            _Item(query, tuple(documents[i : i + step]), cfg.max_batch_size, step, now)
            for i in range(0, len(documents), step)
        ]
        self._pending_pairs += n
        try:
            await self._gate.wait()  # while a batch runs, gather here; released together they form one batch
            parts = await asyncio.gather(*(self.score_batch(it) for it in items))
        finally:
            self._pending_pairs -= n
        for part in parts:
            if isinstance(part, BaseException):  # this request's own failure (see _run_batch)
                raise part
        return [s for part in parts for s in part]

    def info(self) -> dict[str, Any]:
        """What this replica runs and the configuration it holds (GET /info; no secrets)."""
        return {
            **self._info,
            "user_config": self._cfg.model_dump(),
            "max_concurrent_batches": MAX_CONCURRENT_BATCHES,
            "admit_fraction": ADMIT_FRACTION,
            "config": self.config.public(),
        }

    def ready(self) -> dict[str, Any]:
        return {**self._info, "enabled": self.reranker.enabled}

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Batching stats of this replica (tests and debugging): batches, largest batch, recent sizes."""
        out = {
            **self._stats,
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
    async def score_batch(self, items: list[_Item]) -> list[list[float] | BaseException]:
        self._running += 1
        if self._running >= MAX_CONCURRENT_BATCHES:
            self._gate.clear()
        try:
            return await self._run_batch(items)
        finally:
            self._running -= 1
            if self._running < MAX_CONCURRENT_BATCHES:
                self._gate.set()

    async def _run_batch(self, items: list[_Item]) -> list[list[float] | BaseException]:
        """Score the batch in one call; if that fails, each request alone, so only the bad one fails."""
        try:
            return list(await self._score_items(items))
        except Exception as e:
            if len(items) == 1 or self._cfg.inject_failure:
                raise
            log.warning("a batch of %d requests failed (%s); scoring them one by one", len(items), e)
        out: list[list[float] | BaseException] = []
        for it in items:
            try:
                out.extend(await self._score_items([it]))
            except Exception as e:
                out.append(e)
        return out

    async def _score_items(self, items: list[_Item]) -> list[list[float]]:
        start = time.perf_counter()
        for it in items:
            metrics.get("rag_rerank_phase_latency_ms").observe(
                (start - it.enqueued_at) * 1e3, tags={"phase": "queue"}
            )
        pairs = [(it.query, d) for it in items for d in it.documents]
        cfg = self._cfg
        if cfg.inject_delay_ms:
            await asyncio.sleep(cfg.inject_delay_ms / 1e3)
        if cfg.inject_failure:
            raise RerankerError("injected reranker failure (user_config.inject_failure=true)")
        scores, timings = await asyncio.to_thread(self._score, pairs)
        self._record(len(items), len(pairs), timings, (time.perf_counter() - start) * 1e3)
        out, i = [], 0
        for it in items:
            out.append(scores[i : i + len(it.documents)])
            i += len(it.documents)
        return out

    def _score(self, pairs: list[tuple[str, str]]) -> tuple[list[float], dict[str, float]]:
        with self._lock:
            t0 = time.perf_counter()
            try:
                scores = self.reranker.score(pairs)
            except RerankerError:
                raise
            except Exception as e:
                raise RerankerError(f"reranker failed: {type(e).__name__}: {e}") from e
            timings = dict(getattr(self.reranker, "last_timings", None) or {})
            timings.setdefault("inference_ms", (time.perf_counter() - t0) * 1e3)
        if len(scores) != len(pairs):
            raise RerankerError(f"reranker returned {len(scores)} scores for {len(pairs)} pairs")
        return [float(s) for s in scores], timings

    def _record(self, n_items: int, n_pairs: int, timings: dict[str, float], batch_ms: float) -> None:
        metrics.get("rag_rerank_batch_pairs").observe(n_pairs)
        metrics.get("rag_rerank_batch_requests").observe(n_items)
        for phase in ("tokenize", "inference"):
            if f"{phase}_ms" in timings:
                metrics.get("rag_rerank_phase_latency_ms").observe(
                    timings[f"{phase}_ms"], tags={"phase": phase}
                )
        if batch_ms > 0:
            rate = n_pairs / (batch_ms / 1e3)
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
            "pairs": 0,
            "max_batch_requests": 0,
            "max_batch_pairs": 0,
            "last_batch_ms": None,
        }
