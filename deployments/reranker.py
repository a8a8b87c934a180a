"""Reranker deployment: the served rerank models (``deployments._model_pool``), each a rerank engine
(``rag.rerank_engine``) with its chunks batched by its own ``@serve.batch`` queue.

The engines do the work (windows, score cache, cost cap, admission, chunks and turns, the batch body); this
class wires them to Serve: a request names its model through Serve's model multiplexing (the ingress calls
``handle.options(multiplexed_model_id=name)``; here ``serve.get_multiplexed_model_id()``), the pool loads it
on demand and evicts the least recently used past ``rerank_models_per_replica``; every chunk of every
request goes through its model's batch queue, so concurrent requests for one model share forward passes and
a batch never mixes two models; ``user_config`` sets the batch knobs of every queue (``reconfigure``, no
restart); each batch is recorded in metrics with its model; ``record_autoscaling_stats`` reports the pending
pairs of every model the autoscaling policy scales on.

Batch size is bounded twice, both from ``user_config``: ``max_batch_size`` requests and
``max_pairs_per_batch`` pairs (the memory bound on a GPU fraction), folded into one cost by
``rag.rerank_schedule.batch_cost`` (Ray's ``batch_size_fn``). One batch per model runs at a time; the
engine's scheduler holds the next chunks while it runs and releases them together when it ends, so they form
the next batch together (Ray's queue would otherwise form it ``batch_wait_timeout_s`` after its first item).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from deployments._args import RerankerUserConfig
from deployments._model_pool import MAX_CONCURRENT_BATCHES, Loaded, ModelPool
from deployments.autoscaling import PENDING_PAIRS
from rag.errors import RerankerError
from rag.rerank_engine import RerankEngine, RerankOptions, RerankResult
from rag.rerank_schedule import ADMIT_FRACTION
from rag.stages import RerankerConfig

__all__ = ["MAX_CONCURRENT_BATCHES", "Reranker"]

log = logging.getLogger("ray.serve")

_DEFAULTS = RerankerUserConfig()


@serve.deployment(name="Reranker", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class Reranker:
    """The served rerank models (cross-encoder, Cohere, LLM or none), one ``RerankEngine`` each."""

    def __init__(self, config: RerankerConfig) -> None:
        self.config = config
        self._cfg = _DEFAULTS
        self.pool = ModelPool(config, _DEFAULTS, before_batch=self._chaos)

    @property
    def engine(self) -> RerankEngine:
        """The default model's engine (loaded at start-up; tests and benchmarks read its scheduler)."""
        engine = self.pool.peek(self.pool.default)
        if engine is None:
            raise RerankerError(f"the default rerank model {self.pool.default!r} is not loaded right now")
        return engine

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        self._cfg = RerankerUserConfig.model_validate(user_config or {})
        self.pool.reconfigure(self._cfg)

    async def _model(self) -> Loaded:
        """The model this request named (Serve's multiplexed model id; none: the default)."""
        return await self.pool.get(serve.get_multiplexed_model_id() or None)

    async def rerank(
        self,
        query: str,
        documents: list[str],
        deadline_s: float | None = None,
        *,
        instruction: str | None = None,
    ) -> list[float]:
        """One score per /search candidate, in input order. ``deadline_s``: how long the caller waits;
        work that would finish later is refused (Overloaded) or stopped (StageTimeout). ``instruction``: as
        for ``rerank_documents``."""
        if not documents:
            return []
        loaded = await self._model()
        opt = RerankOptions(kind="candidates", deadline_s=deadline_s, instruction=instruction)
        return (await loaded.engine.rerank(query, documents, opt)).scores

    async def rerank_documents(
        self,
        query: str,
        documents: list[str],
        deadline_s: float | None = None,
        *,
        max_tokens_per_doc: int | None = None,
        truncate: bool | None = None,
        field: str = "documents",
        instruction: str | None = None,
    ) -> RerankResult:
        """The rerank routes: long documents split into windows, one score per document. ``instruction``:
        an LLM reranker's (None: its model's default); a model that takes none refuses one (422)."""
        loaded = await self._model()
        opt = RerankOptions("documents", max_tokens_per_doc, truncate, deadline_s, field, instruction)
        return await loaded.engine.rerank(query, documents, opt)

    async def card(self) -> dict[str, Any]:
        """What the requested model is (the ingress's ModelCard of a reply): its backend's facts."""
        loaded = await self._model()
        return {**loaded.engine.backend.info(), "name": loaded.name}

    def info(self) -> dict[str, Any]:
        """What this replica runs and the configuration it holds (GET /info; no secrets): the default
        model's engine when loaded, and every served model with whether this replica holds it."""
        pool = self.pool
        engine = pool.peek(pool.default)
        head = engine.info() if engine is not None else self._described(pool.default)
        return {
            **head,
            "config": self.config.public(),
            "default_model": pool.default,
            "models": pool.describe(),
            "loaded_models": pool.held(),
            "models_per_replica": pool.max_loaded,
            "replica": _replica_id(),
            "user_config": self._cfg.model_dump(),
            "max_concurrent_batches": MAX_CONCURRENT_BATCHES,
            "admit_fraction": ADMIT_FRACTION,
        }

    def _described(self, name: str) -> dict[str, Any]:
        d = next(m for m in self.pool.describe() if m["name"] == name)
        return {"model": d["model"], "backend": d["backend"], "device": None, "dtype": None, "trained": None}

    def ready(self) -> dict[str, Any]:
        pool = self.pool
        engine = pool.peek(pool.default)
        head = engine.backend.info() if engine is not None else self._described(pool.default)
        enabled = engine.enabled if engine is not None else head["backend"] != "none"
        return {**head, "enabled": enabled, "default_model": pool.default}

    def stats(self, reset: bool = False, model: str | None = None) -> dict[str, Any]:
        """Batching stats of this replica (tests, benchmarks): the ``model`` engine's (default: the default
        model's) ``rag.rerank_stats.EngineStats``, the requests active now, the user_config it runs with;
        and for every model: the models of each recent batch, what is loaded and how often it was."""
        pool = self.pool
        out: dict[str, Any] = {
            "batch_models": [list(b) for b in pool.batch_models],
            "loaded_models": pool.held(),
            "loads": dict(pool.loads),
            "load_s": {n: round(x.load_s, 4) for n, x in pool.loaded.items()},
            "pending_pairs": pool.pending_pairs(),
            "rss_bytes": _rss_bytes(),
            "user_config": self._cfg.model_dump(),
        }
        engine = pool.peek(model or pool.default)
        if engine is not None:
            s = engine.scheduler
            out.update(
                engine.stats.as_dict(reset),
                active_requests=len(s.active),
                active_pairs=s.pending_pairs(),
                pairs_per_s=s.pairs_per_s,
                compute_pairs_per_s=s.compute_pairs_per_s,
                round_pairs=s.budget(),
            )
        if reset:
            pool.batch_models.clear()
        return out

    async def _chaos(self) -> None:
        """``user_config``'s test knobs: extra latency per batch, or every batch failing."""
        if self._cfg.inject_delay_ms:
            await asyncio.sleep(self._cfg.inject_delay_ms / 1e3)
        if self._cfg.inject_failure:
            raise RerankerError("injected reranker failure (user_config.inject_failure=true)")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve calls this on the replica (Ray 2.60 custom metrics): the pairs admitted and not yet
        scored over every model it holds, what ``deployments.autoscaling.PendingPairsPolicy`` scales on
        (``PENDING_PAIRS``)."""
        return {PENDING_PAIRS: float(self.pool.pending_pairs())}


def _rss_bytes() -> int | None:
    """This replica's resident memory (what the models it holds cost; docs/serving.md)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil comes with ray[serve]; no verdict without it
        return None


def _replica_id() -> str | None:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # not in a replica
        return None
