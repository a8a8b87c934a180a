"""Reranker deployment: the rerank engine (``rag.rerank_engine``) with its chunks batched by ``@serve.batch``.

The engine does the work (windows, score cache, cost cap, admission, chunks and turns, the batch body); this
class wires it to Serve: every chunk of every request goes through ``score_batch``, so concurrent requests
share forward passes; ``user_config`` sets the batch knobs (``reconfigure``, no restart); each batch is
recorded in metrics; ``record_autoscaling_stats`` reports the pending pairs the autoscaling policy scales on.

Batch size is bounded twice, both from ``user_config``: ``max_batch_size`` requests and
``max_pairs_per_batch`` pairs (the memory bound on a GPU fraction), folded into one cost by
``rag.rerank_schedule.batch_cost`` (Ray's ``batch_size_fn``). One batch runs at a time; the engine's
scheduler holds the next chunks while it runs and releases them together when it ends, so they form the next
batch together (Ray's queue would otherwise form it ``batch_wait_timeout_s`` after its first item).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from deployments import metrics
from deployments._args import RerankerUserConfig
from deployments.autoscaling import PENDING_PAIRS
from rag.errors import RerankerError
from rag.rerank import make_reranker
from rag.rerank_engine import RerankEngine, RerankOptions, RerankResult
from rag.rerank_schedule import ADMIT_FRACTION, Item, Part, batch_cost
from rag.stages import RerankerConfig

__all__ = ["Reranker"]

log = logging.getLogger("ray.serve")

_DEFAULTS = RerankerUserConfig()
# Config rule: max_ongoing_requests >= max_batch_size * MAX_CONCURRENT_BATCHES (2x leaves room to fill).
MAX_CONCURRENT_BATCHES = 1


@serve.deployment(name="Reranker", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class Reranker:
    """A ``RerankEngine`` over the configured backend (cross-encoder, Cohere or none)."""

    def __init__(self, config: RerankerConfig) -> None:
        self.config = config
        self.engine = RerankEngine(make_reranker(config), config, submit=self.score_batch)
        self.engine.on_batch = metrics.record_rerank_batch
        self._cfg = _DEFAULTS
        self.engine.set_batch_caps(_DEFAULTS.max_batch_size, _DEFAULTS.max_pairs_per_batch)
        metrics.model_info("reranker", self.engine.backend.info())

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        self._cfg = RerankerUserConfig.model_validate(user_config or {})
        self._cfg.apply(self.score_batch, "reranker")
        self.engine.set_batch_caps(self._cfg.max_batch_size, self._cfg.max_pairs_per_batch)

    async def rerank(self, query: str, documents: list[str], deadline_s: float | None = None) -> list[float]:
        """One score per /search candidate, in input order. ``deadline_s``: how long the caller waits;
        work that would finish later is refused (Overloaded) or stopped (StageTimeout)."""
        if not documents:
            return []
        opt = RerankOptions(kind="candidates", deadline_s=deadline_s)
        return (await self.engine.rerank(query, documents, opt)).scores

    async def rerank_documents(
        self,
        query: str,
        documents: list[str],
        deadline_s: float | None = None,
        *,
        max_tokens_per_doc: int | None = None,
        truncate: bool | None = None,
        field: str = "documents",
    ) -> RerankResult:
        """The rerank routes: long documents split into windows, one score per document."""
        opt = RerankOptions("documents", max_tokens_per_doc, truncate, deadline_s, field)
        return await self.engine.rerank(query, documents, opt)

    def info(self) -> dict[str, Any]:
        """What this replica runs and the configuration it holds (GET /info; no secrets)."""
        return {
            **self.engine.info(),
            "user_config": self._cfg.model_dump(),
            "max_concurrent_batches": MAX_CONCURRENT_BATCHES,
            "admit_fraction": ADMIT_FRACTION,
        }

    def ready(self) -> dict[str, Any]:
        return {**self.engine.backend.info(), "enabled": self.engine.enabled}

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Batching stats of this replica (tests, benchmarks): ``rag.rerank_stats.EngineStats``, the
        requests active now, and the user_config it runs with."""
        s = self.engine.scheduler
        return {
            **self.engine.stats.as_dict(reset),
            "active_requests": len(s.active),
            "active_pairs": s.pending_pairs(),
            "pairs_per_s": s.pairs_per_s,
            "compute_pairs_per_s": s.compute_pairs_per_s,
            "round_pairs": s.budget(),
            "user_config": self._cfg.model_dump(),
        }

    @serve.batch(
        max_batch_size=_DEFAULTS.max_batch_size,
        batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s,
        max_concurrent_batches=MAX_CONCURRENT_BATCHES,
        batch_size_fn=batch_cost,
    )
    async def score_batch(self, items: list[Item]) -> list[Part | BaseException]:
        return await self.engine.run_batch(items, before=self._chaos)

    async def _chaos(self) -> None:
        """``user_config``'s test knobs: extra latency per batch, or every batch failing."""
        if self._cfg.inject_delay_ms:
            await asyncio.sleep(self._cfg.inject_delay_ms / 1e3)
        if self._cfg.inject_failure:
            raise RerankerError("injected reranker failure (user_config.inject_failure=true)")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve calls this on the replica (Ray 2.60 custom metrics): the pairs admitted and not yet
        scored, what ``deployments.autoscaling.PendingPairsPolicy`` scales on (``PENDING_PAIRS``)."""
        return {PENDING_PAIRS: float(self.engine.scheduler.pending_pairs())}
