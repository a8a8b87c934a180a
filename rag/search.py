"""The two-stage policy, written once: validate -> stage 1 -> rerank or degrade (with a reason) -> rank.

``Pipeline`` (in-process), the Serve ingress (DeploymentHandles) and ``rag eval`` all run this one policy;
none re-implements it. The policy does no I/O itself: ``two_stage`` is a generator that *yields* the stage
calls it needs (``Embed``, ``Retrieve``, ``Rerank``) and a ``Dense`` notice once stage 1 is known, and
receives each call's result (or its exception, thrown in). A driver performs the calls:
``run_sync(policy, do)`` for the library, ``await run_async(policy, do)`` for the ingress.

Stage 1 runs in the request's ``mode`` (``dense``, ``lexical`` or ``hybrid``; ``rag.store.hybrid``): the
``Retrieve`` call carries the query text and the mode. Degradation: when stage 2 does not run, the answer is
stage 1's order and ``reason`` says why (``score`` is then the stage-1 score: ``fused_score`` in the lexical
and hybrid modes, ``dense_score`` in dense mode):

============== ===================================================================================
not_requested  the request said ``rerank: false``
disabled       the reranker backend is ``none``
no_candidates  stage 1 found nothing
budget         the latency budget was spent, or reranking would not fit in what is left
overloaded     the reranker refused the work at once (queue full or admission): retry later
reranker_error the reranker failed, timed out or has no live replica
============== ===================================================================================

With ``strict_rerank`` a failure raises instead of degrading (``not_requested``/``disabled``/
``no_candidates``/``budget`` still answer in dense order).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rag import drivers
from rag.errors import Overloaded, RerankerError, StageTimeout
from rag.stages import SearchConfig
from rag.validation import check_mode, validate_collection_name, validate_search

__all__ = [
    "SKIP_REASONS",
    "Dense",
    "Embed",
    "LatencyModel",
    "Rerank",
    "Retrieve",
    "SearchRequest",
    "SearchResult",
    "dense_hits",
    "make_request",
    "rank",
    "run_async",
    "run_sync",
    "stage1_score",
    "two_stage",
]

R = TypeVar("R")  # what a policy returns
SKIP_REASONS = ("not_requested", "disabled", "no_candidates", "budget", "overloaded", "reranker_error")


# -- the stage calls the policy yields ---------------------------------------------------------------
@dataclass(frozen=True)
class Embed:
    query: str


@dataclass(frozen=True)
class Retrieve:
    collection: str
    vector: Any
    k: int
    filter: Any = None
    query: str | None = None  # the text, for the lexical side
    mode: str = "dense"  # dense | lexical | hybrid


@dataclass(frozen=True)
class Rerank:
    query: str
    documents: list[str]
    timeout_s: float | None  # how long the caller waits; drivers pass it on as the reranker's deadline
    budget_bound: bool = False  # the timeout is what is left of the request's budget (a skip, not an error)


@dataclass(frozen=True)
class Dense:
    """Stage 1 is done (a notice; drivers answer None). Streaming routes send these hits at once."""

    hits: list[dict[str, Any]]
    candidates: int
    timings_ms: dict[str, float]


Step = Embed | Retrieve | Rerank | Dense


@dataclass(frozen=True)
class SearchRequest:
    query: str
    fetch_k: int
    top_k: int
    collection: str
    rerank: bool = True
    budget_ms: float | None = None
    filter: Any = None
    vector: Any = None  # a precomputed query embedding skips the Embed call (rag eval batches them)
    mode: str = "hybrid"  # stage 1: dense | lexical | hybrid


@dataclass
class SearchResult:
    hits: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    timings_ms: dict[str, float]
    reranked: bool
    reason: str | None = None
    detail: str | None = None
    strategy: str | None = None  # which stage-1 search plan ran (when the store says)
    reranker: dict[str, Any] = field(default_factory=dict)  # what stage 2 is (the caller fills it in)


def make_request(
    cfg: SearchConfig,
    query: object,
    *,
    fetch_k: int | None = None,
    top_k: int | None = None,
    rerank: bool = True,
    budget_ms: float | None = None,
    collection: str | None = None,
    filter: Any = None,
    vector: Any = None,
    mode: str | None = None,
) -> SearchRequest:
    """A validated request; unset values take the configured defaults. Raises InvalidInput."""
    fetch_k = cfg.fetch_k if fetch_k is None else fetch_k
    top_k = cfg.top_k if top_k is None else top_k
    validate_search(query, fetch_k, top_k, max_fetch_k=cfg.max_fetch_k, max_chars=cfg.max_query_chars)
    coll = validate_collection_name(collection) if collection is not None else cfg.collection
    budget = budget_ms if budget_ms is not None else cfg.budget_ms
    mode = check_mode(cfg.search_mode if mode is None else mode)
    return SearchRequest(str(query), fetch_k, top_k, coll, rerank, budget, filter, vector, mode)


def rank(candidates: Sequence[dict], scores: Sequence[float], top_k: int) -> list[dict]:
    """Attach ``score`` to each candidate and return the best ``top_k`` (stable on ties: dense order)."""
    if len(candidates) != len(scores):
        raise RerankerError(f"reranker returned {len(scores)} scores for {len(candidates)} candidates")
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    return [{**candidates[i], "score": float(scores[i])} for i in order[:top_k]]


def stage1_score(hit: dict) -> float | None:
    """The score stage 1 ordered ``hit`` by: ``fused_score`` (lexical, hybrid), else ``dense_score``."""
    return hit["fused_score"] if "fused_score" in hit else hit["dense_score"]


def dense_hits(candidates: Sequence[dict], top_k: int) -> list[dict]:
    """Stage 1's order, ``score`` = its stage-1 score (``dense_score`` in dense mode): the answer whenever
    stage 2 does not run."""
    return [{**c, "score": stage1_score(c)} for c in candidates[:top_k]]


@dataclass
class LatencyModel:
    """The reranker's recent latency per pair (EWMA), as the caller sees it (queueing included).

    With no observation for ``probe_after_s`` the estimate is stale and one request is let through to
    refresh it, so a burst of budget skips cannot freeze the estimate forever.
    """

    alpha: float = 0.3
    probe_after_s: float = 5.0
    ms_per_pair: float | None = None
    last_update: float = field(default=0.0)

    def observe(self, ms: float, pairs: int) -> None:
        x = ms / max(1, pairs)
        self.ms_per_pair = (
            x if self.ms_per_pair is None else self.alpha * x + (1 - self.alpha) * self.ms_per_pair
        )
        self.last_update = time.monotonic()

    def estimate_ms(self, pairs: int) -> float | None:
        if self.ms_per_pair is None or time.monotonic() - self.last_update > self.probe_after_s:
            return None
        return self.ms_per_pair * pairs


def two_stage(
    req: SearchRequest,
    *,
    reranker_enabled: bool,
    rerank_timeout_s: float | None,
    strict: bool = False,
    latency: LatencyModel | None = None,
) -> Generator[Step, Any, SearchResult]:
    """The policy (see the module docstring). ``rerank_timeout_s``: the longest wait for stage 2."""
    t0 = time.perf_counter()
    vec = req.vector if req.vector is not None else (yield Embed(req.query))
    t1 = time.perf_counter()
    found = yield Retrieve(req.collection, vec, req.fetch_k, req.filter, req.query, req.mode)
    cands = list(found or [])
    t2 = time.perf_counter()
    timings = {"embed": (t1 - t0) * 1e3, "retrieve": (t2 - t1) * 1e3, "rerank": 0.0}
    strategy = getattr(found, "strategy", None)
    dense = dense_hits(cands, req.top_k)
    yield Dense(dense, len(cands), dict(timings))

    def answer(hits: list[dict], reason: str | None = None, detail: str | None = None) -> SearchResult:
        end = time.perf_counter()
        if reason is None:
            timings["rerank"] = (end - t2) * 1e3
        timings["total"] = (end - t0) * 1e3
        return SearchResult(hits, cands, timings, reason is None, reason, detail, strategy)

    if not req.rerank:
        return answer(dense, "not_requested")
    if not reranker_enabled:
        return answer(dense, "disabled")
    if not cands:
        return answer(dense, "no_candidates")
    timeout_s, budget_bound = rerank_timeout_s, False
    if req.budget_ms is not None:
        remaining_ms = req.budget_ms - (time.perf_counter() - t0) * 1e3
        estimate = latency.estimate_ms(len(cands)) if latency else None
        if remaining_ms <= 0 or (estimate is not None and estimate > remaining_ms):
            need = f", reranking needs ~{estimate:.0f} ms" if estimate is not None else ""
            return answer(dense, "budget", f"remaining {remaining_ms:.0f} ms{need}")
        if timeout_s is None or remaining_ms / 1e3 < timeout_s:
            timeout_s, budget_bound = remaining_ms / 1e3, True
    started = time.perf_counter()
    try:
        scores = yield Rerank(req.query, [c["content"] for c in cands], timeout_s, budget_bound)
        hits = rank(cands, scores, req.top_k)
    except StageTimeout as e:
        if latency is not None:  # a lower bound: the estimate learns that it was too slow
            latency.observe((time.perf_counter() - started) * 1e3, len(cands))
        if budget_bound:
            return answer(
                dense, "budget", f"reranking did not finish within the remaining {timeout_s * 1e3:.0f} ms"
            )
        if strict:
            raise
        return answer(dense, "reranker_error", f"{type(e).__name__}: {e}")
    except Overloaded as e:  # refused at once (the reranker's admission, or a full queue)
        if strict:
            raise
        return answer(dense, "overloaded", str(e))
    except Exception as e:
        if strict:
            raise
        return answer(dense, "reranker_error", f"{type(e).__name__}: {e}")
    if latency is not None:
        latency.observe((time.perf_counter() - started) * 1e3, len(cands))
    return answer(hits)


# -- drivers ----------------------------------------------------------------------------------------------
def run_sync(policy: Generator[Any, Any, R], do: Callable[[Any], Any]) -> R:
    """Drive a search policy with a blocking ``do(step)`` (``rag.drivers``; the stage-1 notice is skipped)."""
    return drivers.run_sync(policy, lambda step: None if isinstance(step, Dense) else do(step))


async def run_async(
    policy: Generator[Any, Any, R],
    do: Callable[[Any], Awaitable[Any]],
    on_dense: Callable[[Dense], Awaitable[None]] | None = None,
) -> R:
    """Drive a search policy with an async ``do(step)``; ``on_dense`` hears the stage-1 notice (streaming)."""

    async def step_or_notice(step: Any) -> Any:
        if not isinstance(step, Dense):
            return await do(step)
        if on_dense is not None:
            await on_dense(step)
        return None

    return await drivers.run_async(policy, step_or_notice)
