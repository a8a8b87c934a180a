"""Stage 2: rerankers. A reranker scores a flat list of (query, document) pairs; ranking is core logic.

- ``CrossEncoderReranker``: a sentence-transformers ``CrossEncoder``. In ``float32`` with ``sort=False`` it
  is exactly ``CrossEncoder.predict``; by default it sorts pairs by length, packs them into batches by a
  padded-token budget, and runs in bf16 where the CPU has native bf16 (fp16 on CUDA).
- ``CohereReranker``: Cohere's hosted Rerank v2 API (or anything that speaks it) via ``cohere.ClientV2``.
- ``NoReranker``: stage 2 disabled; the pipeline keeps the dense order.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from rag.errors import ConfigError, InvalidInput, ModelError, RerankerError
from rag.settings import Settings

__all__ = [
    "CohereReranker",
    "CrossEncoderReranker",
    "NoReranker",
    "Pair",
    "Reranker",
    "make_reranker",
    "rank",
]

log = logging.getLogger(__name__)

Pair = tuple[str, str]


@runtime_checkable
class Reranker(Protocol):
    """``score(pairs)`` returns one relevance score per (query, document) pair, in input order."""

    enabled: bool

    def score(self, pairs: Sequence[Pair]) -> list[float]: ...

    def info(self) -> dict[str, Any]: ...


def validate_pairs(pairs: Sequence[Pair]) -> None:
    for i, p in enumerate(pairs):
        if not (isinstance(p, tuple | list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str)):
            raise InvalidInput(f"pair {i} must be a (query, document) pair of strings, got {type(p).__name__}")


def rank(candidates: Sequence[dict], scores: Sequence[float], top_k: int) -> list[dict]:
    """Attach ``score`` to each candidate and return the best ``top_k`` (stable on ties: dense order)."""
    if len(candidates) != len(scores):
        raise RerankerError(f"reranker returned {len(scores)} scores for {len(candidates)} candidates")
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    return [{**candidates[i], "score": float(scores[i])} for i in order[:top_k]]


class NoReranker:
    """Stage 2 disabled (``RAG_RERANKER=none``)."""

    enabled = False

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        raise RerankerError("reranking is disabled (RAG_RERANKER=none)")

    def info(self) -> dict[str, Any]:
        return {"backend": "none", "model": None, "device": None, "dtype": None, "trained": None}


class CrossEncoderReranker:
    """sentence-transformers cross-encoder with a length-sorted, token-budgeted, bf16-capable fast path."""

    enabled = True

    def __init__(
        self,
        model: str,
        *,
        cache_dir: os.PathLike[str] | str = ".rag/models",
        device: str = "auto",
        dtype: str = "auto",
        max_length: int = 512,
        batch_size: int = 32,
        token_budget: int = 8192,
        sort: bool = True,
        threads: int = 0,
        offline: bool = False,
    ) -> None:
        from pathlib import Path

        import torch
        from sentence_transformers import CrossEncoder

        from rag.embed import pick_device, pick_dtype
        from rag.models import resolve_cross_encoder

        self.resolved = resolve_cross_encoder(model, cache_dir=Path(cache_dir), offline=offline)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.sort = sort
        if threads > 0 and self.device == "cpu":
            torch.set_num_threads(threads)
        try:
            self.ce = CrossEncoder(self.resolved.path, device=self.device, max_length=max_length)
        except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear error
            raise ModelError(f"could not load reranker {model!r} from {self.resolved.path}: {e}") from e
        self.model = self.ce.model.eval()
        if self.dtype != "float32":
            self.model.to(getattr(torch, self.dtype))
        self.tokenizer = self.ce.tokenizer
        self.activation = self.ce.activation_fn
        self._lock = threading.Lock()  # one forward pass at a time per replica
        self.last_timings: dict[str, float] = {}

    def info(self) -> dict[str, Any]:
        return {
            "backend": "cross-encoder",
            "model": self.resolved.requested,
            "source": self.resolved.source,
            "device": self.device,
            "dtype": self.dtype,
            "trained": self.resolved.trained,
            "max_length": self.max_length,
        }

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Pair indices grouped into forward passes: sorted by length, at most token_budget padded tokens."""
        idx = sorted(range(len(lengths)), key=lengths.__getitem__) if self.sort else list(range(len(lengths)))
        if not self.sort:
            return [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        out: list[list[int]] = []
        cur: list[int] = []
        for i in idx:  # ascending length: the newest item is the longest of its batch
            if cur and (len(cur) + 1) * lengths[i] > self.token_budget:
                out.append(cur)
                cur = []
            cur.append(i)
        if cur:
            out.append(cur)
        return out

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        if not pairs:
            return []
        validate_pairs(pairs)
        import torch

        t0 = time.perf_counter()
        enc = self.tokenizer(
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            truncation="longest_first",
            max_length=self.max_length,
            padding=False,
        )
        feats = [dict(zip(enc.keys(), vals, strict=True)) for vals in zip(*enc.values(), strict=True)]
        lengths = [len(f["input_ids"]) for f in feats]
        batches = self._batches(lengths)
        t1 = time.perf_counter()
        scores = [0.0] * len(pairs)
        try:
            with self._lock, torch.inference_mode():
                for b in batches:
                    inputs = self.tokenizer.pad([feats[i] for i in b], padding=True, return_tensors="pt")
                    inputs = {k: v.to(self.device) for k, v in inputs.items()}
                    logits = self.model(**inputs).logits
                    out = self.activation(logits.float()).reshape(-1).tolist()
                    for i, s in zip(b, out, strict=True):
                        scores[i] = float(s)
        except RuntimeError as e:  # CUDA OOM, bad shapes...
            raise RerankerError(f"reranker forward pass failed: {e}") from e
        t2 = time.perf_counter()
        self.last_timings = {
            "tokenize_ms": (t1 - t0) * 1e3,
            "inference_ms": (t2 - t1) * 1e3,
            "pairs": len(pairs),
            "forward_passes": len(batches),
            "tokens": sum(lengths),
        }
        return scores


class CohereReranker:
    """Cohere Rerank v2 (``cohere.ClientV2``). Pairs are grouped by query: one API call per query."""

    enabled = True

    def __init__(
        self,
        *,
        api_key: str | None,
        model: str = "rerank-v3.5",
        base_url: str | None = None,
        timeout_s: float = 10.0,
        max_retries: int = 2,
    ) -> None:
        if not api_key:
            raise ConfigError(
                "the cohere reranker needs an API key: set CO_API_KEY (or RAG_COHERE_API_KEY), "
                "or choose another backend with RAG_RERANKER=cross-encoder"
            )
        import cohere

        self.model = model
        self.base_url = base_url
        self.max_retries = max_retries
        self.client = cohere.ClientV2(api_key=api_key, base_url=base_url, timeout=timeout_s)

    def info(self) -> dict[str, Any]:
        return {"backend": "cohere", "model": self.model, "device": "remote", "dtype": None,
                "trained": True, "base_url": self.base_url}

    def _rerank(self, query: str, docs: list[str]) -> list[float]:
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                resp = self.client.rerank(model=self.model, query=query, documents=docs, top_n=len(docs))
                scores = [0.0] * len(docs)
                for r in resp.results:
                    scores[r.index] = float(r.relevance_score)
                return scores
            except Exception as e:  # noqa: BLE001 - the SDK raises many types; all mean "stage 2 failed"
                last = e
                status = getattr(e, "status_code", None)
                if status is not None and 400 <= status < 500 and status != 429:
                    break  # a client error will not succeed on retry
                time.sleep(min(2.0, 0.2 * 2**attempt))
        raise RerankerError(f"Cohere rerank failed ({self.base_url or 'api.cohere.com'}): {last}") from last

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        validate_pairs(pairs)
        groups: dict[str, list[int]] = {}
        for i, (q, _) in enumerate(pairs):
            groups.setdefault(q, []).append(i)
        scores = [0.0] * len(pairs)
        for q, idx in groups.items():
            for i, s in zip(idx, self._rerank(q, [pairs[i][1] for i in idx]), strict=True):
                scores[i] = s
        return scores


def make_reranker(settings: Settings) -> Reranker:
    """The reranker the settings ask for."""
    if settings.reranker == "none":
        return NoReranker()
    if settings.reranker == "cohere":
        key = settings.cohere_api_key.get_secret_value() if settings.cohere_api_key else None
        return CohereReranker(
            api_key=key,
            model=settings.cohere_model,
            base_url=settings.cohere_base_url,
            timeout_s=settings.cohere_timeout_s,
            max_retries=settings.cohere_max_retries,
        )
    return CrossEncoderReranker(
        settings.rerank_model,
        cache_dir=settings.model_cache,
        device=settings.rerank_device,
        dtype=settings.rerank_dtype,
        max_length=settings.rerank_max_length,
        batch_size=settings.rerank_batch_size,
        token_budget=settings.rerank_token_budget,
        threads=settings.rerank_threads,
        offline=settings.offline,
    )
