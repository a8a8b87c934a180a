"""The Cohere backend: Cohere's hosted Rerank v2 API (or anything that speaks it) via ``cohere.ClientV2``.

Pairs are grouped by query: one API call per query, the documents in input order. Cohere reads whole
documents (it splits long ones on its side), so the engine plans no windows for this backend.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pydantic import SecretStr

from rag.errors import ConfigError, RerankerError
from rag.rerank.base import Scores, ScoreTimings, refuse_instructions
from rag.validation import Pair, validate_pairs

__all__ = ["CohereReranker"]


class CohereReranker:
    """Cohere Rerank v2 (``cohere.ClientV2``). Pairs are grouped by query: one API call per query."""

    enabled = True
    tokenizer = None  # documents are sent whole
    max_length = 0
    default_instruction = None  # Cohere's API takes no instruction

    def __init__(
        self,
        *,
        api_key: SecretStr | str | None,
        model: str = "rerank-v3.5",
        base_url: str | None = None,
        timeout_s: float = 10.0,
        max_retries: int = 2,
    ) -> None:
        if isinstance(api_key, SecretStr):
            api_key = api_key.get_secret_value()
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
        return {
            "backend": "cohere",
            "model": self.model,
            "device": "remote",
            "dtype": None,
            "trained": True,
            "base_url": self.base_url,
            "revision": None,
        }

    def _rerank(self, query: str, docs: list[str]) -> list[float]:
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                resp = self.client.rerank(model=self.model, query=query, documents=docs, top_n=len(docs))
                scores = [0.0] * len(docs)
                for r in resp.results:
                    scores[r.index] = float(r.relevance_score)
                return scores
            except Exception as e:
                last = e
                status = getattr(e, "status_code", None)
                if status is not None and 400 <= status < 500 and status != 429:
                    break  # a client error will not succeed on retry
                time.sleep(min(2.0, 0.2 * 2**attempt))
        raise RerankerError(f"Cohere rerank failed ({self.base_url or 'api.cohere.com'}): {last}") from last

    def pair_overhead(self, instruction: str | None) -> int:
        return 0

    def score(self, pairs: Sequence[Pair], instructions: Sequence[str | None] | None = None) -> Scores:
        refuse_instructions("cohere", instructions)
        pairs = validate_pairs(pairs)
        t0 = time.perf_counter()
        groups: dict[str, list[int]] = {}
        for i, (q, _) in enumerate(pairs):
            groups.setdefault(q, []).append(i)
        scores = [0.0] * len(pairs)
        for q, idx in groups.items():
            for i, s in zip(idx, self._rerank(q, [pairs[i][1] for i in idx]), strict=True):
                scores[i] = s
        ms = (time.perf_counter() - t0) * 1e3
        return Scores(scores, ScoreTimings(inference_ms=ms, pairs=len(pairs), unique_pairs=len(pairs)))
