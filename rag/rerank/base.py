"""What a rerank backend is: one scoring method, what it reports, and the disabled backend.

A backend scores a flat list of (query, document) pairs: ``score(pairs) -> Scores``, one float per pair in
input order. ``Scores`` is that list, carrying how the scores were computed (``ScoreTimings``) and, behind
the score cache, which came from it (``cached``). That is the only way scores come out of a backend; the
rerank engine (``rag.rerank_engine``) holds one backend and does everything around it: windows, the cache,
chunks, admission.

``tokenizer`` and ``max_length`` tell the engine how the backend reads a pair: with a fast tokenizer, the
engine splits long documents into windows of ``max_length`` tokens; ``None`` means the backend reads whole
documents itself (Cohere splits them on its side). ``pair_overhead(instruction)`` is what a pair costs beyond
its query's and document's tokens (the cross-encoder's special tokens; the LLM reranker's prompt).

Instructions: an LLM reranker (``rag.rerank.llm``) scores a pair under an instruction, its
``default_instruction`` unless ``score`` gets ``instructions`` (one per pair; None entries: the default).
The other backends have ``default_instruction = None`` and take none: they refuse any given (the rerank
engine refuses such a request up front, as invalid input).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from rag.errors import InvalidInput, RerankerError
from rag.validation import Pair

__all__ = ["NoReranker", "Pair", "RerankBackend", "ScoreTimings", "Scores", "refuse_instructions"]


@dataclass(frozen=True)
class ScoreTimings:
    """How one ``score`` call went. Milliseconds, and counts of pairs, passes and tokens."""

    tokenize_ms: float = 0.0
    inference_ms: float = 0.0
    refine_ms: float = 0.0
    pairs: int = 0
    unique_pairs: int = 0  # identical pairs are scored once
    refined_pairs: int = 0  # rescored in fp32 (the fast path's refine)
    forward_passes: int = 0
    tokens: int = 0  # tokens of the unique pairs, as the model read them
    padded_tokens: int = 0
    cache_hits: int = 0  # pairs answered by the score cache (rag.score_cache)
    cache_misses: int = 0
    cache_lookup_ms: float = 0.0

    def with_cache(self, pairs: int, hits: int, lookup_ms: float) -> ScoreTimings:
        return replace(
            self, pairs=pairs, cache_hits=hits, cache_misses=pairs - hits, cache_lookup_ms=lookup_ms
        )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class Scores(list[float]):
    """One relevance score per (query, document) pair, in input order, and how they were computed."""

    __slots__ = ("cached", "timings")

    def __init__(
        self,
        scores: Iterable[float] = (),
        timings: ScoreTimings | None = None,
        cached: Sequence[bool] | None = None,
    ) -> None:
        super().__init__(float(s) for s in scores)
        self.timings = timings if timings is not None else ScoreTimings(pairs=len(self))
        self.cached: list[bool] = list(cached) if cached is not None else [False] * len(self)
        if len(self.cached) != len(self):
            raise ValueError(f"{len(self.cached)} cache flags for {len(self)} scores")


class RerankBackend(Protocol):
    """A rerank model: ``score(pairs)`` is the one way to get scores (see the module docstring)."""

    enabled: bool
    tokenizer: Any | None  # a fast (Rust) tokenizer the engine plans windows with; None: no windows
    max_length: int  # tokens of one [CLS] query [SEP] document [SEP] the model reads
    default_instruction: str | None  # what an LLM reranker is told by default; None: takes no instruction

    def score(self, pairs: Sequence[Pair], instructions: Sequence[str | None] | None = None) -> Scores: ...

    def pair_overhead(self, instruction: str | None) -> int:
        """Tokens a pair costs beyond its query's and its document's (the windows' sizing)."""
        ...

    def info(self) -> dict[str, Any]:
        """What the backend is, as JSON values (``GET /info``, metrics labels, the score cache's key): at
        least backend, model, revision, device, dtype, trained."""
        ...


class NoReranker:
    """Stage 2 disabled (``RAG_RERANKER=none``)."""

    enabled = False
    tokenizer = None
    max_length = 0
    default_instruction = None

    def score(self, pairs: Sequence[Pair], instructions: Sequence[str | None] | None = None) -> Scores:
        raise RerankerError("reranking is disabled (RAG_RERANKER=none)")

    def pair_overhead(self, instruction: str | None) -> int:
        return 0

    def info(self) -> dict[str, Any]:
        return {"backend": "none", "model": None, "device": None, "dtype": None, "trained": None}


def refuse_instructions(backend: str, instructions: Sequence[str | None] | None) -> None:
    """A backend without instructions (``default_instruction`` None) given one: invalid input."""
    if instructions is not None and any(i is not None for i in instructions):
        raise InvalidInput(
            f"the {backend} reranker takes no instruction: leave instruction out, or use an LLM reranker "
            "(RAG_RERANKER=llm)"
        )


def elapsed_ms(since: float) -> float:
    return (time.perf_counter() - since) * 1e3
