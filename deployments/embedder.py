"""Embedder deployment: query embeddings, batched across concurrent requests with ``@serve.batch``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from ray import serve

from deployments import metrics
from deployments._args import EmbedderUserConfig
from rag.embed import make_embedder
from rag.stages import EmbedderConfig

__all__ = ["Embedder"]

log = logging.getLogger("ray.serve")

_DEFAULTS = EmbedderUserConfig()
MAX_CONCURRENT_BATCHES = 1  # config rule: max_ongoing_requests >= max_batch_size * this


@serve.deployment(name="Embedder", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class Embedder:
    """Wraps ``rag.embed.Embedder`` (built by ``make_embedder``); one forward pass per batch of queries."""

    def __init__(self, config: EmbedderConfig) -> None:
        self.config = config
        self.embedder = make_embedder(config)
        self._info = self.embedder.info()
        self._cfg = _DEFAULTS
        metrics.model_info("embedder", self._info, backend="sentence-transformers")

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        self._cfg = EmbedderUserConfig.model_validate(user_config or {})
        self._cfg.apply(self.embed_batch, "embedder")

    async def embed(self, query: str) -> np.ndarray:
        """The L2-normalised embedding of one query (float32; validated at the ingress)."""
        return await self.embed_batch(query)

    async def embed_many(self, texts: list[str]) -> list[np.ndarray]:
        """Embeddings of several texts (validated at the ingress); each joins the same batch queue."""
        return list(await asyncio.gather(*(self.embed_batch(t) for t in texts)))

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens the model reads of each text (special tokens included, cut at its max_seq_length): the
        ``usage`` of ``POST /v1/embeddings``."""
        e = self.embedder
        enc = e.tokenizer(list(texts), truncation=True, max_length=e.max_seq_length, verbose=False)
        return [len(x) for x in enc["input_ids"]]

    def info(self) -> dict[str, Any]:
        """What this replica runs and the configuration it was given (GET /info)."""
        return {
            **self._info,
            "threads": getattr(self.embedder, "threads", None),
            "token_budget": getattr(self.embedder, "token_budget", None),
            "user_config": self._cfg.model_dump(),
            "max_concurrent_batches": MAX_CONCURRENT_BATCHES,
            "config": self.config.public(),
        }

    def ready(self) -> dict[str, Any]:
        return dict(self._info)

    @serve.batch(
        max_batch_size=_DEFAULTS.max_batch_size,
        batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s,
        max_concurrent_batches=MAX_CONCURRENT_BATCHES,
    )
    async def embed_batch(self, texts: list[str]) -> list[np.ndarray]:
        vecs = await asyncio.to_thread(self.embedder.embed_queries, texts)
        return list(vecs)
