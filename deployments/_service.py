"""What the ingress does between HTTP and the other deployments: one method per kind of request.

The search policy itself (validation, stage 1, rerank or degrade, ranking) is ``rag.search``'s; this module
performs its stage calls through DeploymentHandles (``deployments._calls``: timeouts, Ray's failures,
breakers). Kept apart from the FastAPI routes (``deployments.api``) so it can be driven with fake handles in
tests. Every request is validated here, once, with ``rag.validation`` (the edge); the replicas trust it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import platform
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments._calls import StageCalls, as_rag_error
from deployments._ray_compat import multiplexed_models
from deployments._schemas import ModelCard
from rag.errors import InvalidInput, RagError, StageTimeout, StageUnavailable
from rag.rerank_engine import RerankResult
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
from rag.stages import SearchConfig
from rag.validation import validate_documents, validate_query, validate_texts

__all__ = ["RerankChoice", "RerankReply", "SearchReply", "SearchService", "as_rag_error", "logit"]

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class RerankChoice:
    """Which served rerank model scores a request ("": the Reranker's one model, when ``rerank_models`` is
    unset), and the instruction it gets (None: the model's default)."""

    model: str = ""
    instruction: str | None = None


@dataclass(frozen=True)
class SearchReply:
    """One search: the validated request, the policy's result, and what the reranker is."""

    request: SearchRequest
    result: SearchResult
    reranker: ModelCard


@dataclass(frozen=True)
class RerankReply:
    """One call of the rerank routes: the engine's result, the time the ingress waited for it, and the model
    that scored it."""

    result: RerankResult
    total_ms: float
    reranker: ModelCard


@dataclass(frozen=True)
class EmbedReply:
    vectors: list[Any]  # float32 arrays, one per text
    tokens: list[int]  # tokens the model read of each text
    embedder: ModelCard
    dim: int


class SearchService(StageCalls):
    """The ingress's logic over three DeploymentHandles (or fakes with the same methods)."""

    def __init__(
        self,
        embedder: DeploymentHandle,
        retriever: DeploymentHandle,
        reranker: DeploymentHandle,
        config: SearchConfig,
    ) -> None:
        super().__init__(embedder, retriever, reranker, config.ready_timeout_s)
        self.config = config
        self.latency = LatencyModel()
        self._cards: dict[str, tuple[ModelCard, float]] = {}
        self._rerankers: dict[str, DeploymentHandle] = {}
        self._embedder_info: dict[str, Any] | None = None

    # -- which rerank model --------------------------------------------------------------------------
    def rerank_choice(self, model: object = None, instruction: object = None) -> RerankChoice:
        """A request's rerank model and instruction, validated (an unknown model is a 422 that lists the
        served names), before any stage runs."""
        if model is not None and not isinstance(model, str):
            raise InvalidInput(f"the rerank model must be a string naming a served model, got {model!r}")
        name = self.config.pick_model(model)
        if instruction is not None:
            instruction = validate_query(instruction, "instruction", max_chars=self.config.max_query_chars)
        return RerankChoice(name, instruction)

    def _reranker_for(self, model: str) -> DeploymentHandle:
        """The Reranker handle that routes to ``model`` (Serve's multiplexing: a replica that holds it)."""
        if not model:
            return self.reranker
        if model not in self._rerankers:
            self._rerankers[model] = self.reranker.options(multiplexed_model_id=model)
        return self._rerankers[model]

    async def do(self, step: Step, choice: RerankChoice | None = None) -> Any:
        """Perform one stage call of the policy through its deployment."""
        c = self.config
        if isinstance(step, Embed):
            return await self.call("embed", self.embedder.embed.remote(step.query), c.embed_timeout_s)
        if isinstance(step, Retrieve):
            call = self.retriever.search.remote(
                step.collection, step.vector, step.k, step.filter, query=step.query, mode=step.mode
            )
            return await self.call("retrieve", call, c.retrieve_timeout_s)
        if isinstance(step, Rerank):
            timeout_s = step.timeout_s if step.timeout_s is not None else c.rerank_wait_s
            choice = choice or RerankChoice()
            kw: dict[str, Any] = {"deadline_s": timeout_s}
            if choice.instruction is not None:
                kw["instruction"] = choice.instruction
            response = self._reranker_for(choice.model).rerank.remote(step.query, step.documents, **kw)
            return await self.call("rerank", response, timeout_s, timeout_is_error=not step.budget_bound)
        raise TypeError(f"unknown step {step!r}")

    # -- /search -----------------------------------------------------------------------------------
    def search_request(self, **kw: Any) -> SearchRequest:
        """A validated request (InvalidInput -> 422 before any stage runs); the filter parsed once."""
        flt = kw.pop("filter", None)
        if flt is not None:
            from rag.store import parse_filter

            flt = parse_filter(flt)
        return make_request(self.config, kw.pop("query"), filter=flt, **kw)

    async def search(
        self,
        req: SearchRequest,
        on_dense: Callable[[Dense], Awaitable[None]] | None = None,
        choice: RerankChoice | None = None,
    ) -> SearchReply:
        choice = choice or RerankChoice()
        entry = next((m for m in self.config.rerank_models if m.name == choice.model), None)
        if entry is not None:  # a named model: its backend is configuration; no call that would load it
            enabled = entry.backend != "none"
        else:
            enabled = (await self.reranker_card()).backend != "none"
        policy = two_stage(
            req,
            reranker_enabled=enabled,
            rerank_timeout_s=self.config.rerank_wait_s,
            strict=self.config.strict_rerank,
            latency=self.latency,
        )

        async def do(step: Step) -> Any:
            return await self.do(step, choice)

        res = await run_async(policy, do, on_dense)
        self._record(res)
        if entry is None:
            card = await self.reranker_card()
        elif res.reranked:  # the model is loaded now: asking what it is loads nothing
            card = await self.reranker_card(choice.model)
        else:  # not reranked (failed to load, skipped): what the configuration says it is
            said = {"model": entry.model, "backend": entry.backend, "name": entry.name}
            card = ModelCard.model_validate({"device": None, "dtype": None, "trained": None, **said})
        return SearchReply(req, res, card)

    def _record(self, res: SearchResult) -> None:
        t = res.timings_ms
        for stage in ("embed", "retrieve"):
            _observe(stage, t[stage])
        metrics.get("rag_candidates_per_request").observe(len(res.candidates))
        if res.reranked:
            _observe("rerank", t["rerank"])
        elif res.reason in metrics.SKIP_REASONS_COUNTED:
            metrics.get("rag_rerank_skipped_total").inc(tags={"reason": res.reason})
        if res.reason == "reranker_error":
            log.warning("rerank failed, answering in dense order: %s", res.detail)
        _observe("total", t["total"])

    # -- rerank routes -----------------------------------------------------------------------------
    async def rerank_documents(
        self,
        query: object,
        documents: object,
        *,
        top_n: int | None = None,
        max_tokens_per_doc: int | None = None,
        truncate: bool | None = None,
        field: str = "documents",
        model: object = None,
        instruction: object = None,
    ) -> RerankReply:
        """The rerank routes' call: validated here (``top_n``: the results the route will return; ``model``:
        a served model's name, None for the default); long documents split into windows by the Reranker's
        engine, one score per document, the best window's span, usage. Errors are not degraded: there is
        no dense order to fall back on."""
        c = self.config
        q = validate_query(query, max_chars=c.max_query_chars)
        choice = self.rerank_choice(model, instruction)
        docs = validate_documents(documents, limit=c.documents_limit, field=field)
        if top_n is not None and not 1 <= top_n <= c.documents_limit:
            raise InvalidInput(f"top_n must be between 1 and {c.documents_limit}, got {top_n}")
        cap = c.rerank_max_tokens_per_doc
        if max_tokens_per_doc is not None and not 1 <= max_tokens_per_doc <= cap:
            raise InvalidInput(
                f"max_tokens_per_doc must be between 1 and {cap} (RAG_RERANK_MAX_TOKENS_PER_DOC), "
                f"got {max_tokens_per_doc}"
            )
        t0 = time.perf_counter()
        timeout_s = c.rerank_wait_s
        kw: dict[str, Any] = {"max_tokens_per_doc": max_tokens_per_doc, "truncate": truncate, "field": field}
        if choice.instruction is not None:
            kw["instruction"] = choice.instruction
        call = self._reranker_for(choice.model).rerank_documents.remote(q, docs, timeout_s, **kw)
        result: RerankResult = await self.call("rerank", call, timeout_s)
        ms = (time.perf_counter() - t0) * 1e3
        self.latency.observe(ms, max(1, result.usage.pairs or len(docs)))
        _observe("rerank", ms)
        return RerankReply(result, ms, await self.reranker_card(choice.model))

    async def reranker_card(self, model: str = "", max_age_s: float = 30.0) -> ModelCard:
        """What the rerank model ``model`` is ("": the Reranker's default; cached, refreshed every
        ``max_age_s`` in case it was redeployed)."""
        held = self._cards.get(model)
        if held is None or time.monotonic() - held[1] > max_age_s:
            try:
                call = self._reranker_for(model).card.remote() if model else self.reranker.info.remote()
                info = await self.call("rerank", call, self.config.ready_timeout_s)
                card = ModelCard.model_validate({k: v for k, v in info.items() if k not in _NOT_CARD})
                self._cards[model] = (card, time.monotonic())
                return card
            except Exception as e:
                log.warning("could not get the reranker's info: %s", e)
                return held[0] if held is not None else ModelCard.unknown()
        return held[0]

    async def models(self) -> dict[str, Any]:
        """GET /v1/models: every served rerank model, and what the answering Reranker replica holds."""
        t = self.config.ready_timeout_s
        info = await self.call("rerank", self.reranker.info.remote(), t, count_errors=False)
        return {
            "models": info.get("models", []),
            "replica": info.get("replica"),
            "loaded_models": info.get("loaded_models", []),
            "models_per_replica": info.get("models_per_replica"),
            "models_by_replica": multiplexed_models(self.reranker),
        }

    # -- embedding routes --------------------------------------------------------------------------
    async def embed(self, texts: list[str]) -> list[list[float]]:
        c = self.config
        valid = validate_texts(texts, limit=c.max_embed_inputs, max_chars=c.max_query_chars)
        t0 = time.perf_counter()
        vecs = await self.call("embed", self.embedder.embed_many.remote(valid), c.embed_timeout_s)
        _observe("embed", (time.perf_counter() - t0) * 1e3)
        return [[float(x) for x in v] for v in vecs]

    async def embed_with_usage(self, texts: list[str], *, dimensions: int | None = None) -> EmbedReply:
        """Vectors, tokens per text, and what the embedder is (OpenAI's /v1/embeddings). ``dimensions``
        must be the model's when given (it cannot shorten its vectors)."""
        c = self.config
        valid = validate_texts(texts, limit=c.max_embed_inputs, max_chars=c.max_query_chars)
        t0 = time.perf_counter()
        vecs, tokens = await asyncio.gather(
            self.call("embed", self.embedder.embed_many.remote(valid), c.embed_timeout_s),
            self.call("embed", self.embedder.count_tokens.remote(valid), c.embed_timeout_s),
        )
        _observe("embed", (time.perf_counter() - t0) * 1e3)
        if self._embedder_info is None:
            self._embedder_info = await self.call("embed", self.embedder.info.remote(), c.ready_timeout_s)
        card = ModelCard.model_validate(self._embedder_info or ModelCard.unknown().model_dump())
        dim = int((card.model_extra or {}).get("dim") or (len(vecs[0]) if vecs else 0))
        if dimensions is not None and dimensions != dim:
            raise InvalidInput(
                f"dimensions={dimensions}: the served model {card.model} has {dim} dimensions and cannot "
                "shorten them; leave dimensions out"
            )
        return EmbedReply(list(vecs), [int(t) for t in tokens], card, dim)

    # -- /info, /readyz ----------------------------------------------------------------------------
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
        if isinstance(stages["reranker"], dict) and "error" not in stages["reranker"]:
            stages["reranker"]["models_by_replica"] = multiplexed_models(self.reranker)
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


# What the Reranker's info() holds besides its model card (GET /info and /v1/models show those).
_NOT_CARD = frozenset(
    {"config", "user_config", "score_cache", "long_documents", "models", "loaded_models", "replica",
     "default_model", "models_per_replica"}
)  # fmt: skip


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
