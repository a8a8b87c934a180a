"""What the ingress does between HTTP and the other deployments: stage calls, latency budget, degradation.

Kept apart from the FastAPI routes so it can be driven with fake handles in tests. Every handle call goes
through ``SearchService.call``: it has a timeout, cancels the request when the timeout fires, and turns Ray's
own failures (queue full, replica gone, timeout) into ``rag.errors`` types that the ingress's one error table
maps to HTTP statuses.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from deployments import metrics
from deployments._args import IngressArgs
from rag.errors import InvalidInput, Overloaded, RagError, validate_collection_name
from rag.pipeline import validate_query, validate_search
from rag.rerank import rank

__all__ = ["LatencyModel", "SearchService", "StageTimeout", "StageUnavailable"]

log = logging.getLogger("ray.serve")

SKIP_REASONS_COUNTED = ("budget", "overloaded", "reranker_error", "disabled")


class StageTimeout(Overloaded):
    """A deployment did not answer within its timeout (503, retry)."""

    error_type = "timeout"


class StageUnavailable(Overloaded):
    """A deployment has no live replica (503, retry)."""

    error_type = "unavailable"


def as_rag_error(stage: str, err: BaseException, timeout_s: float) -> BaseException:
    """Ray's failures -> rag.errors types; a RagError raised in a replica -> that error itself."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
        RequestCancelledError,
    )

    if isinstance(err, RayTaskError) and isinstance(getattr(err, "cause", None), BaseException):
        cause = err.cause
        if isinstance(cause, RagError | BackPressureError):
            err = cause
    if isinstance(err, RagError):
        return err
    if isinstance(err, asyncio.TimeoutError | TimeoutError):
        return StageTimeout(
            f"the {stage} stage did not answer within {timeout_s:g}s: the service is overloaded, retry later",
            retry_after_s=1.0,
        )
    if isinstance(err, BackPressureError):
        return Overloaded(
            f"the {stage} stage's queue is full ({err.message}): retry later",
            retry_after_s=err.retry_after_s or 1.0,
        )
    if isinstance(
        err, DeploymentUnavailableError | ReplicaUnavailableError | RayActorError | RequestCancelledError
    ):
        return StageUnavailable(f"the {stage} stage is unavailable ({type(err).__name__}): retry later")
    return err  # a bug: the error table answers 500


@dataclass
class LatencyModel:
    """The reranker's recent latency per pair (EWMA), as the ingress sees it (queueing included).

    With no observation for ``probe_after_s`` the estimate is considered stale and one request is let through
    to refresh it, so a burst of budget skips cannot freeze the estimate forever.
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


@dataclass
class SearchParams:
    query: str
    fetch_k: int
    top_k: int
    rerank: bool
    budget_ms: float | None
    collection: str


@dataclass
class Stage1:
    params: SearchParams
    candidates: list[dict[str, Any]]
    timings: dict[str, float]
    started: float


@dataclass
class Stage2:
    hits: list[dict[str, Any]]
    reranker: dict[str, Any]
    rerank_ms: float


class SearchService:
    """The ingress's logic. ``embedder``/``retriever``/``reranker`` are DeploymentHandles (or fakes)."""

    def __init__(self, embedder: Any, retriever: Any, reranker: Any, args: IngressArgs) -> None:
        self.embedder, self.retriever, self.reranker = embedder, retriever, reranker
        self.args = args
        self.latency = LatencyModel()
        self._reranker_info: dict[str, Any] | None = None
        self._reranker_info_at = 0.0

    # -- handle calls ------------------------------------------------------------------------------
    async def call(
        self,
        stage: str,
        response: Any,
        timeout_s: float,
        *,
        count_errors: bool = True,
        timeout_is_error: bool = True,
    ) -> Any:
        """Await a handle call with a timeout (cancelling it when the timeout fires); errors as rag.errors."""

        async def resolve() -> Any:
            return await response

        try:
            return await asyncio.wait_for(resolve(), timeout_s)
        except Exception as e:
            if isinstance(e, asyncio.TimeoutError | TimeoutError) and hasattr(response, "cancel"):
                response.cancel()
            err = as_rag_error(stage, e, timeout_s)
            err.rag_stage = stage  # type: ignore[union-attr]
            if count_errors and (timeout_is_error or not isinstance(err, StageTimeout)):
                metrics.get("rag_errors_total").inc(
                    tags={"stage": stage, "error_type": getattr(err, "error_type", type(err).__name__)}
                )
            if err is e:
                raise
            raise err from e

    # -- validation --------------------------------------------------------------------------------
    def check_query(self, query: str) -> str:
        validate_query(query)
        if len(query) > self.args.max_query_chars:
            raise InvalidInput(
                f"query is {len(query)} characters long; the limit is {self.args.max_query_chars}: shorten it"
            )
        return query

    def search_params(
        self,
        query: str,
        fetch_k: int | None,
        top_k: int | None,
        rerank: bool,
        budget_ms: float | None,
        collection: str | None,
    ) -> SearchParams:
        a = self.args
        fetch_k = a.fetch_k if fetch_k is None else fetch_k
        top_k = a.top_k if top_k is None else top_k
        self.check_query(query)
        validate_search(query, fetch_k, top_k, a.max_fetch_k)
        coll = validate_collection_name(collection) if collection is not None else a.collection
        return SearchParams(
            query, fetch_k, top_k, rerank, budget_ms if budget_ms is not None else a.budget_ms, coll
        )

    def check_documents(self, documents: list[Any], field: str = "documents") -> None:
        if not documents:
            raise InvalidInput(f"{field} must contain at least one document")
        if len(documents) > self.args.max_documents:
            raise InvalidInput(
                f"{len(documents)} {field}; at most {self.args.max_documents} per request: send fewer, "
                "or split them over several requests"
            )

    # -- stages ------------------------------------------------------------------------------------
    async def stage1(self, p: SearchParams) -> Stage1:
        a = self.args
        t0 = time.perf_counter()
        vec = await self.call("embed", self.embedder.embed.remote(p.query), a.embed_timeout_s)
        t1 = time.perf_counter()
        candidates = await self.call(
            "retrieve", self.retriever.search.remote(p.collection, vec, p.fetch_k), a.retrieve_timeout_s
        )
        t2 = time.perf_counter()
        timings = {"embed": (t1 - t0) * 1e3, "retrieve": (t2 - t1) * 1e3}
        _observe("embed", timings["embed"])
        _observe("retrieve", timings["retrieve"])
        metrics.get("rag_candidates_per_request").observe(len(candidates))
        return Stage1(p, candidates, timings, t0)

    async def stage2(self, s1: Stage1) -> Stage2:
        """Rerank, or the dense order with the reason why not (never raises unless strict_rerank)."""
        p, cands = s1.params, s1.candidates
        info = await self.reranker_info()
        dense = [{**c, "score": c["dense_score"]} for c in cands[: p.top_k]]

        def skip(reason: str, detail: str | None = None) -> Stage2:
            if reason in SKIP_REASONS_COUNTED:
                metrics.get("rag_rerank_skipped_total").inc(tags={"reason": reason})
            return Stage2(dense, {**info, "reranked": False, "reason": reason, "detail": detail}, 0.0)

        if not p.rerank:
            return skip("not_requested")
        if info.get("backend") == "none":
            return skip("disabled")
        if not cands:
            return skip("no_candidates")
        timeout_s, budget_bound = self.args.rerank_timeout_s, False
        if p.budget_ms is not None:
            remaining_ms = p.budget_ms - (time.perf_counter() - s1.started) * 1e3
            estimate = self.latency.estimate_ms(len(cands))
            if remaining_ms <= 0 or (estimate is not None and estimate > remaining_ms):
                return skip(
                    "budget", f"remaining {remaining_ms:.0f} ms, reranking needs ~{estimate or 0:.0f} ms"
                )
            if remaining_ms / 1e3 < timeout_s:
                timeout_s, budget_bound = remaining_ms / 1e3, True
        t0 = time.perf_counter()
        try:
            scores = await self.call(
                "rerank",
                self.reranker.rerank.remote(p.query, [c["content"] for c in cands], deadline_s=timeout_s),
                timeout_s,
                timeout_is_error=not budget_bound,  # running out of budget is a skip, not an error
            )
            hits = rank(cands, scores, p.top_k)
        except Exception as e:
            ms = (time.perf_counter() - t0) * 1e3
            if isinstance(e, StageTimeout) and budget_bound:
                self.latency.observe(ms, len(cands))  # a lower bound: the estimate learns it was too slow
                return skip(
                    "budget", f"reranking did not finish within the remaining {timeout_s * 1e3:.0f} ms"
                )
            if self.args.strict_rerank:
                raise
            if type(e) is Overloaded:  # refused at once (the reranker's admission, or Ray's queue limit)
                return skip("overloaded", str(e))
            log.warning("rerank failed, answering in dense order: %s", e)
            return skip("reranker_error", f"{type(e).__name__}: {e}")
        ms = (time.perf_counter() - t0) * 1e3
        self.latency.observe(ms, len(cands))
        _observe("rerank", ms)
        return Stage2(hits, {**info, "reranked": True, "reason": None, "detail": None}, ms)

    async def search(self, p: SearchParams) -> dict[str, Any]:
        s1 = await self.stage1(p)
        s2 = await self.stage2(s1)
        return self.search_response(s1, s2)

    def search_response(self, s1: Stage1, s2: Stage2) -> dict[str, Any]:
        total = (time.perf_counter() - s1.started) * 1e3
        _observe("total", total)
        return {
            "query": s1.params.query,
            "collection": s1.params.collection,
            "results": s2.hits,
            "candidates": len(s1.candidates),
            "timings_ms": {
                **{k: round(v, 3) for k, v in s1.timings.items()},
                "rerank": round(s2.rerank_ms, 3),
                "total": round(total, 3),
            },
            "reranker": s2.reranker,
        }

    # -- other routes ------------------------------------------------------------------------------
    async def rerank_scores(self, query: str, documents: list[str]) -> list[float]:
        """Scores for /v2/rerank and /rerank (errors are not degraded here: there is no dense order)."""
        self.check_query(query)
        self.check_documents(documents)
        t0 = time.perf_counter()
        timeout_s = self.args.rerank_timeout_s
        scores = await self.call(
            "rerank", self.reranker.rerank.remote(query, documents, deadline_s=timeout_s), timeout_s
        )
        ms = (time.perf_counter() - t0) * 1e3
        self.latency.observe(ms, len(documents))
        _observe("rerank", ms)
        return scores

    async def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            raise InvalidInput("inputs must contain at least one text")
        if len(texts) > self.args.max_embed_inputs:
            raise InvalidInput(f"{len(texts)} inputs; at most {self.args.max_embed_inputs} per request")
        for t in texts:
            self.check_query(t)
        t0 = time.perf_counter()
        vecs = await self.call("embed", self.embedder.embed_many.remote(texts), self.args.embed_timeout_s)
        _observe("embed", (time.perf_counter() - t0) * 1e3)
        return [[float(x) for x in v] for v in vecs]

    async def reranker_info(self, max_age_s: float = 30.0) -> dict[str, Any]:
        """What the Reranker runs (cached; refreshed every ``max_age_s`` in case it was redeployed)."""
        if self._reranker_info is None or time.monotonic() - self._reranker_info_at > max_age_s:
            try:
                self._reranker_info = await self.call(
                    "rerank", self.reranker.info.remote(), self.args.ready_timeout_s
                )
                self._reranker_info_at = time.monotonic()
            except Exception as e:
                log.warning("could not get the reranker's info: %s", e)
                if self._reranker_info is not None:
                    return dict(self._reranker_info)
                return {"model": None, "backend": None, "device": None, "dtype": None, "trained": None}
        return dict(self._reranker_info)

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """(all ready, per-component detail or error)."""
        t = self.args.ready_timeout_s
        checks: dict[str, Awaitable[Any]] = {
            "embedder": self.call("embed", self.embedder.ready.remote(), t, count_errors=False),
            "reranker": self.call("rerank", self.reranker.ready.remote(), t, count_errors=False),
            "database": self.call("retrieve", self.retriever.ready.remote(), t, count_errors=False),
        }
        results = await asyncio.gather(*checks.values(), return_exceptions=True)
        out: dict[str, Any] = {}
        ok = True
        for name, r in zip(checks, results, strict=True):
            if isinstance(r, BaseException):
                ok = False
                reason = str(r) if isinstance(r, RagError) else f"{type(r).__name__}: {r}"
                if isinstance(r, StageTimeout):
                    reason = f"not ready (no answer within {t:g}s: still starting or overloaded)"
                out[name] = {"ready": False, "reason": reason}
            else:
                out[name] = {"ready": True, **r}
        return ok, out


def _observe(stage: str, ms: float) -> None:
    metrics.get("rag_stage_latency_ms").observe(ms, tags={"stage": stage})


def logit(p: float) -> float:
    """Inverse sigmoid: the raw score behind a sigmoid relevance score (TEI's raw_scores)."""
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))
