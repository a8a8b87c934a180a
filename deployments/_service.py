"""What the ingress does between HTTP and the other deployments: handle calls, timeouts, Ray's failures.

The search policy itself (validation, stage 1, rerank or degrade, ranking) is ``rag.search``'s; this module
only performs its stage calls through DeploymentHandles. Every handle call goes through
``SearchService.call``: it has a timeout, cancels the request when the timeout fires, and turns Ray's own
failures (queue full, replica gone, timeout) into ``rag.errors`` types that the ingress's one error table
maps to HTTP statuses. Kept apart from the FastAPI routes so it can be driven with fake handles in tests.

Each stage has a ``Breaker`` (``deployments._breaker``): a failure that says the stage has no live replica
(Ray's actor-died and unavailable errors; for embed and retrieve also a timeout; for retrieve a database that
cannot be reached) opens it, and while it is open calls to that stage fail at once (``StageUnavailable``, or
the database's own ``StoreUnavailable``) instead of queueing in Serve's router until a new replica is up. The
policy hears that as any other rerank failure (dense order, ``reason="reranker_error"``); embed and retrieve
answer 503 + Retry-After. A background probe (the stage's ``ready()``, every ``PROBE_EVERY_S``) closes it.
Serve's router does not fail a request while a deployment has no replica, it holds it until a new one is up,
so a call still pending reads its handle's router every ``WATCH_EVERY_S`` (empty once a call to the dead
replica failed: at once) and, past ``SUSPECT_AFTER_S``, asks the controller too (``serve.status``, shared for
``STATUS_MAX_AGE_S``: it sees a death only at its next health check); no live replica opens the breaker and
fails that call too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import platform
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments._breaker import (
    PROBE_EVERY_S,
    STATUS_MAX_AGE_S,
    SUSPECT_AFTER_S,
    WATCH_EVERY_S,
    Breaker,
    looks_dead,
    routable_replicas,
    running_replicas,
)
from rag.errors import (
    InvalidInput,
    Overloaded,
    RagError,
    StageTimeout,
    StageUnavailable,
    StoreUnavailable,
)
from rag.search import (
    Dense,
    Embed,
    LatencyModel,
    Rerank,
    Retrieve,
    SearchRequest,
    SearchResult,
    Step,
    make_request,
    run_async,
    two_stage,
)
from rag.settings import SearchConfig
from rag.validation import validate_documents, validate_query, validate_texts

__all__ = ["SKIP_REASONS_COUNTED", "SearchService", "as_rag_error", "logit"]

log = logging.getLogger("ray.serve")

SKIP_REASONS_COUNTED = ("budget", "overloaded", "reranker_error", "disabled")
UNKNOWN_RERANKER = {"model": None, "backend": None, "device": None, "dtype": None, "trained": None}


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


class SearchService:
    """The ingress's logic over three DeploymentHandles (or fakes with the same methods)."""

    def __init__(
        self,
        embedder: DeploymentHandle,
        retriever: DeploymentHandle,
        reranker: DeploymentHandle,
        config: SearchConfig,
    ) -> None:
        self.embedder, self.retriever, self.reranker = embedder, retriever, reranker
        self.config: Any = config
        self.latency = LatencyModel()
        self._reranker_info: dict[str, Any] | None = None
        self._embedder_info: dict[str, Any] | None = None
        self._reranker_info_at = 0.0
        self.breakers = {stage: Breaker(stage) for stage in ("embed", "retrieve", "rerank")}
        self._running: dict[tuple[str, str], int] = {}
        self._running_at = 0.0
        self._running_lock = asyncio.Lock()

    # -- circuit breakers --------------------------------------------------------------------------
    def _probe_target(self, stage: str) -> DeploymentHandle:
        return {"embed": self.embedder, "retrieve": self.retriever, "rerank": self.reranker}[stage]

    def _trip(self, stage: str, err: BaseException) -> None:
        b = self.breakers.get(stage)
        if b is None:
            return
        b.open(err)
        if b.probe is None or b.probe.done():
            b.probe = asyncio.get_running_loop().create_task(self._probe(b))

    async def _probe(self, b: Breaker) -> None:
        """Until the stage's ready() answers: then close the breaker."""
        handle, t = self._probe_target(b.stage), self.config.ready_timeout_s
        while b.is_open:
            await asyncio.sleep(PROBE_EVERY_S)
            response: Any = None
            try:
                response = handle.ready.remote()
                await asyncio.wait_for(_awaited(response), t)
            except Exception as e:
                if isinstance(e, asyncio.TimeoutError | TimeoutError) and hasattr(response, "cancel"):
                    response.cancel()
                err = as_rag_error(b.stage, e, t)
                if isinstance(err, StoreUnavailable):  # the database's own words: "unreachable ..."
                    b.open(err)
                continue
            b.close()

    async def _no_live_replica(self, stage: str, pending_s: float) -> bool:
        """True only when the handle's router holds no replica, or (a call pending past ``SUSPECT_AFTER_S``)
        Serve's controller says the stage's deployment has none."""
        handle = self._probe_target(stage)
        if routable_replicas(handle) == 0:
            return True
        if pending_s < SUSPECT_AFTER_S:
            return False
        key = (getattr(handle, "app_name", None), getattr(handle, "deployment_name", None))
        if not all(isinstance(k, str) for k in key):  # a fake handle (tests): nothing to ask
            return False
        async with self._running_lock:
            if time.monotonic() - self._running_at > STATUS_MAX_AGE_S:
                try:
                    self._running = await asyncio.wait_for(
                        asyncio.to_thread(running_replicas), self.config.ready_timeout_s
                    )
                except Exception as e:  # the controller is busy or restarting (or slow): no verdict
                    log.warning("could not ask Serve's controller for replica states: %s", e)
                    return False
                self._running_at = time.monotonic()
        return self._running.get(key, 1) == 0  # type: ignore[arg-type]

    async def _watched(self, stage: str, response: Any, timeout_s: float) -> Any:
        """``await response`` within ``timeout_s``; fail at once if the stage turns out to have no replica."""
        task = asyncio.ensure_future(_awaited(response))
        try:
            start = time.monotonic()
            deadline = start + timeout_s
            # every WATCH_EVERY_S while pending: the router knows a death at once, the controller in seconds
            while stage in self.breakers and deadline - time.monotonic() > WATCH_EVERY_S:
                done, _ = await asyncio.wait({task}, timeout=WATCH_EVERY_S)
                if done:
                    break
                if await self._no_live_replica(stage, time.monotonic() - start):
                    if hasattr(response, "cancel"):
                        response.cancel()
                    err = StageUnavailable(
                        f"the {stage} stage has no running replica (Serve is starting one): retry later",
                        retry_after_s=PROBE_EVERY_S,
                    )
                    self._trip(stage, err)
                    raise err
            return await asyncio.wait_for(task, max(0.0, deadline - time.monotonic()))
        finally:
            if not task.done():
                task.cancel()

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

        breaker = self.breakers.get(stage)
        if breaker is not None and breaker.is_open:  # no live replica: fail now, not after the timeout
            if hasattr(response, "cancel"):
                response.cancel()
            refusal = breaker.refusal()
            if count_errors:
                metrics.get("rag_errors_total").inc(tags={"stage": stage, "error_type": refusal.error_type})
            refusal.rag_stage = stage  # type: ignore[attr-defined]
            raise refusal
        try:
            return await self._watched(stage, response, timeout_s)
        except Exception as e:
            if isinstance(e, asyncio.TimeoutError | TimeoutError) and hasattr(response, "cancel"):
                response.cancel()
            err = as_rag_error(stage, e, timeout_s)
            err.rag_stage = stage  # type: ignore[union-attr]
            # ready()/info() time out sooner than traffic does (count_errors=False): no sign of death
            traffic = count_errors and timeout_is_error
            if looks_dead(stage, e, err) and (traffic or not isinstance(err, StageTimeout)):
                self._trip(stage, err)
            if count_errors and (timeout_is_error or not isinstance(err, StageTimeout)):
                metrics.get("rag_errors_total").inc(
                    tags={"stage": stage, "error_type": getattr(err, "error_type", type(err).__name__)}
                )
            if err is e:
                raise
            raise err from e

    async def do(self, step: Step) -> Any:
        """Perform one stage call of the policy through its deployment."""
        c = self.config
        if isinstance(step, Embed):
            return await self.call("embed", self.embedder.embed.remote(step.query), c.embed_timeout_s)
        if isinstance(step, Retrieve):
            args = (step.collection, step.vector, step.k) + (
                (step.filter,) if step.filter is not None else ()
            )
            return await self.call("retrieve", self.retriever.search.remote(*args), c.retrieve_timeout_s)
        if isinstance(step, Rerank):
            timeout_s = step.timeout_s if step.timeout_s is not None else c.rerank_wait_s
            response = self.reranker.rerank.remote(step.query, step.documents, deadline_s=timeout_s)
            return await self.call("rerank", response, timeout_s, timeout_is_error=not step.budget_bound)
        raise TypeError(f"unknown step {step!r}")

    # -- /search -----------------------------------------------------------------------------------
    def search_request(self, **kw: Any) -> SearchRequest:
        """A validated request (InvalidInput -> 422 before any stage runs)."""
        flt = kw.pop("filter", None)
        if flt is not None:
            from rag.store import parse_filter

            flt = parse_filter(flt)
        return make_request(self.config, kw.pop("query"), filter=flt, **kw)

    async def search(
        self, req: SearchRequest, on_dense: Callable[[Dense], Awaitable[None]] | None = None
    ) -> dict[str, Any]:
        info = await self.reranker_info()
        policy = two_stage(
            req,
            reranker_enabled=info.get("backend") != "none",
            rerank_timeout_s=self.config.rerank_wait_s,
            strict=self.config.strict_rerank,
            latency=self.latency,
        )
        res = await run_async(policy, self.do, on_dense)
        self._record(res)
        return self.response(req, res, info)

    def _record(self, res: SearchResult) -> None:
        t = res.timings_ms
        for stage in ("embed", "retrieve"):
            _observe(stage, t[stage])
        metrics.get("rag_candidates_per_request").observe(len(res.candidates))
        if res.reranked:
            _observe("rerank", t["rerank"])
        elif res.reason in SKIP_REASONS_COUNTED:
            metrics.get("rag_rerank_skipped_total").inc(tags={"reason": res.reason})
        if res.reason == "reranker_error":
            log.warning("rerank failed, answering in dense order: %s", res.detail)
        _observe("total", t["total"])

    @staticmethod
    def response(req: SearchRequest, res: SearchResult, info: dict[str, Any]) -> dict[str, Any]:
        timings: dict[str, Any] = {k: round(v, 3) for k, v in res.timings_ms.items()}
        if res.strategy:
            timings["strategy"] = res.strategy
        return {
            "query": req.query,
            "collection": req.collection,
            "results": res.hits,
            "candidates": len(res.candidates),
            "timings_ms": timings,
            "reranker": {**info, "reranked": res.reranked, "reason": res.reason, "detail": res.detail},
        }

    # -- other routes ------------------------------------------------------------------------------
    async def rerank_scores(self, query: str, documents: list[str]) -> list[float]:
        """Scores only (see ``rerank_documents``)."""
        return (await self.rerank_documents(query, documents))["scores"]

    async def rerank_documents(
        self,
        query: str,
        documents: list[str],
        *,
        max_tokens_per_doc: int | None = None,
        truncate: bool | None = None,
        field: str = "documents",
    ) -> dict[str, Any]:
        """The rerank routes' call: long documents split into windows by the Reranker, one score per
        document, the best window's span, and usage (pairs, tokens, cache hits, queue/inference/total ms).
        Errors are not degraded here: there is no dense order."""
        validate_query(query, max_chars=self.config.max_query_chars)
        validate_documents(documents, limit=self.config.documents_limit, field=field)
        if max_tokens_per_doc is not None and max_tokens_per_doc < 1:
            raise InvalidInput(f"max_tokens_per_doc must be a positive integer, got {max_tokens_per_doc}")
        t0 = time.perf_counter()
        timeout_s = self.config.rerank_wait_s
        out = await self.call(
            "rerank",
            self.reranker.rerank_documents.remote(
                query,
                documents,
                timeout_s,
                max_tokens_per_doc=max_tokens_per_doc,
                truncate=truncate,
                field=field,
            ),
            timeout_s,
        )
        ms = (time.perf_counter() - t0) * 1e3
        self.latency.observe(ms, max(1, int(out.get("pairs") or len(documents))))
        _observe("rerank", ms)
        return {**out, "total_ms": ms}

    async def embed(self, texts: list[str]) -> list[list[float]]:
        c = self.config
        validate_texts(texts, limit=c.max_embed_inputs, max_chars=c.max_query_chars)
        t0 = time.perf_counter()
        vecs = await self.call("embed", self.embedder.embed_many.remote(texts), c.embed_timeout_s)
        _observe("embed", (time.perf_counter() - t0) * 1e3)
        return [[float(x) for x in v] for v in vecs]

    async def embed_with_usage(self, texts: list[str]) -> tuple[list[Any], list[int], dict[str, Any]]:
        """Vectors (float32 arrays), tokens per text, and the embedder's info (OpenAI's /v1/embeddings)."""
        c = self.config
        validate_texts(texts, limit=c.max_embed_inputs, max_chars=c.max_query_chars)
        t0 = time.perf_counter()
        vecs, tokens = await asyncio.gather(
            self.call("embed", self.embedder.embed_many.remote(texts), c.embed_timeout_s),
            self.call("embed", self.embedder.count_tokens.remote(texts), c.embed_timeout_s),
        )
        _observe("embed", (time.perf_counter() - t0) * 1e3)
        if self._embedder_info is None:
            self._embedder_info = await self.call("embed", self.embedder.info.remote(), c.ready_timeout_s)
        return list(vecs), [int(t) for t in tokens], dict(self._embedder_info or {})

    async def reranker_info(self, max_age_s: float = 30.0) -> dict[str, Any]:
        """What the Reranker runs (cached; refreshed every ``max_age_s`` in case it was redeployed)."""
        if self._reranker_info is None or time.monotonic() - self._reranker_info_at > max_age_s:
            try:
                info = await self.call("rerank", self.reranker.info.remote(), self.config.ready_timeout_s)
                drop = ("config", "user_config", "score_cache", "long_documents")  # /info has them
                self._reranker_info = {k: v for k, v in info.items() if k not in drop}
                self._reranker_info_at = time.monotonic()
            except Exception as e:
                log.warning("could not get the reranker's info: %s", e)
                if self._reranker_info is not None:
                    return dict(self._reranker_info)
                return dict(UNKNOWN_RERANKER)
        return dict(self._reranker_info)

    async def info(self) -> dict[str, Any]:
        """GET /info: the effective configuration of every stage, as its replica holds it; no secrets."""
        t = self.config.ready_timeout_s
        calls = {
            "embedder": self.call("embed", self.embedder.info.remote(), t, count_errors=False),
            "store": self.call("retrieve", self.retriever.info.remote(), t, count_errors=False),
            "reranker": self.call("rerank", self.reranker.info.remote(), t, count_errors=False),
        }
        results = await asyncio.gather(*calls.values(), return_exceptions=True)
        stages: dict[str, Any] = {"search": {"config": self.config.public(), **self._limits()}}
        for name, r in zip(calls, results, strict=True):
            stages[name] = {"error": str(r)} if isinstance(r, BaseException) else r
        return {"service": _versions(), "stages": stages}

    def _limits(self) -> dict[str, Any]:
        c = self.config
        return {
            "limits": {
                "max_fetch_k": c.max_fetch_k,
                "max_documents": c.documents_limit,
                "max_query_chars": c.max_query_chars,
                "max_embed_inputs": c.max_embed_inputs,
                "max_body_bytes": c.max_body_bytes,
            },
            "timeouts_s": {
                "embed": c.embed_timeout_s,
                "retrieve": c.retrieve_timeout_s,
                "rerank": c.rerank_wait_s,
                "ready": c.ready_timeout_s,
            },
        }

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """(all ready, per-component detail or error)."""
        t = self.config.ready_timeout_s
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
                elif isinstance(r, StageUnavailable):
                    reason = f"not ready ({r})"
                out[name] = {"ready": False, "reason": reason}
            else:
                out[name] = {"ready": True, **r}
        return ok, out


async def _awaited(response: Any) -> Any:
    return await response


def _versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "name": "rag-serve",
        "version": ver("rag-serve"),
        "ray": ver("ray"),
        "torch": ver("torch"),
        "sentence_transformers": ver("sentence-transformers"),
        "openvino": ver("openvino"),
        "python": platform.python_version(),
    }


def _observe(stage: str, ms: float) -> None:
    metrics.get("rag_stage_latency_ms").observe(ms, tags={"stage": stage})


def logit(p: float) -> float:
    """Inverse sigmoid: the raw score behind a sigmoid relevance score (TEI's raw_scores)."""
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))
