"""The native API: ``POST /search``, ``POST /search/stream`` (Server-Sent Events), and the probes and
description of the service: ``GET /healthz``, ``GET /readyz``, ``GET /info``.

``/search`` runs both stages (``rag.search``'s policy, through ``SearchService``): ``fetch_k`` dense
candidates, reranked, the best ``top_k``, per-stage timings, and what the reranker is (``reranked``,
``reason`` when it did not run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from deployments._schemas import INSTRUCTION_DESCRIPTION, ErrorBody, Integer, ModelCard
from deployments._service import RerankChoice, SearchReply
from deployments.api.common import Service
from deployments.api.errors import ERRORS, error_response
from rag.search import Dense
from rag.search import SearchRequest as PolicyRequest
from rag.settings import SearchMode

__all__ = ["Hit", "RerankerInfo", "SearchRequest", "SearchResponse", "healthz", "info", "readyz", "search",
           "search_stream"]  # fmt: skip

router = APIRouter()
probes = APIRouter()  # /healthz, /info, /readyz: registered after every dialect's routes (the spec's order)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: StrictStr = Field(description="Natural-language query.", examples=["how do I parse a date?"])
    fetch_k: Integer | None = Field(None, description="Stage-1 candidates (default: the service's, 100).")
    top_k: Integer | None = Field(None, description="Results returned (default: the service's, 8).")
    rerank: StrictBool = Field(True, description="Run stage 2 (cross-encoder).")
    budget_ms: StrictFloat | StrictInt | None = Field(
        None, gt=0, description="Latency budget; reranking is skipped when it cannot fit (reason 'budget')."
    )
    collection: StrictStr | None = Field(None, description="Collection to search (default: the service's).")
    filter: dict[str, Any] | None = Field(
        None,
        description="Narrow stage 1: {source: str | {in: [...]} | {prefix: str}, doc_id: str | {in: [...]}, "
        "metadata: {...} (containment)}; keys combine with AND.",
        examples=[{"source": {"prefix": "docs/"}, "metadata": {"lang": "en"}}],
    )
    mode: SearchMode | None = Field(
        None,
        description="Stage 1: dense (pgvector), lexical (BM25, or full-text search where the server lacks "
        "pg_textsearch) or hybrid (both, fused by RRF). Default: the service's RAG_SEARCH_MODE (hybrid); "
        "timings_ms.strategy says what ran.",
    )
    rerank_model: StrictStr | None = Field(
        None,
        description="The served rerank model for stage 2 (GET /v1/models lists them; unset: the default). "
        "An unknown name is a 422 listing the served names.",
    )
    instruction: StrictStr | None = Field(None, description=INSTRUCTION_DESCRIPTION)

    def choice(self, service: Service) -> RerankChoice:
        """The rerank model and instruction, validated (422 before any stage)."""
        return service.rerank_choice(self.rerank_model, self.instruction)

    def validated(self, service: Service) -> PolicyRequest:
        """The policy's request: validated, defaults applied, the filter parsed (422 before any stage)."""
        return service.search_request(
            query=self.query,
            fetch_k=self.fetch_k,
            top_k=self.top_k,
            rerank=self.rerank,
            budget_ms=self.budget_ms,
            collection=self.collection,
            filter=self.filter,
            mode=self.mode,
        )


class Hit(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    doc_id: str | None = None
    source: str
    content: str
    score: float = Field(
        description="Rerank score; when stage 2 did not run, the stage-1 score (fused_score in the lexical "
        "and hybrid modes, dense_score in dense mode)."
    )
    dense_score: float | None = Field(
        description="Cosine similarity from stage 1 (null for a row found only by the lexical side that has "
        "no embedding). Lexical and hybrid hits add lexical_rank (1 = best; null: only the dense side found "
        "it) and fused_score (the RRF score stage 1 ordered by)."
    )
    chunk_index: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class RerankerInfo(ModelCard):
    reranked: bool
    reason: str | None = Field(
        None,
        description=(
            "Why not reranked: not_requested | disabled | budget | overloaded | reranker_error "
            "| no_candidates."
        ),
    )
    detail: str | None = Field(None, description="The error behind reason=reranker_error or overloaded.")

    @classmethod
    def of(cls, reply: SearchReply) -> RerankerInfo:
        res = reply.result
        card = reply.reranker.model_dump()
        return cls(**card, reranked=res.reranked, reason=res.reason, detail=res.detail)


class SearchResponse(BaseModel):
    query: str
    collection: str
    results: list[Hit]
    candidates: int = Field(description="Stage-1 candidates that were (or would have been) reranked.")
    timings_ms: dict[str, float | str] = Field(
        description="embed, retrieve, rerank, total (milliseconds); strategy: the stage-1 search plan."
    )
    reranker: RerankerInfo

    @classmethod
    def build(cls, reply: SearchReply) -> SearchResponse:
        res = reply.result
        timings: dict[str, float | str] = {k: round(v, 3) for k, v in res.timings_ms.items()}
        if res.strategy:
            timings["strategy"] = res.strategy
        return cls(
            query=reply.request.query,
            collection=reply.request.collection,
            results=[Hit(**h) for h in res.hits],
            candidates=len(res.candidates),
            timings_ms=timings,
            reranker=RerankerInfo.of(reply),
        )


@router.post("/search", response_model=SearchResponse, responses=ERRORS)
async def search(req: SearchRequest, service: Service) -> SearchResponse:
    """Both stages: `fetch_k` dense candidates, reranked, best `top_k`; per-stage timings."""
    choice = req.choice(service)
    return SearchResponse.build(await service.search(req.validated(service), choice=choice))


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


@router.post("/search/stream", responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
async def search_stream(req: SearchRequest, service: Service) -> StreamingResponse:
    """Server-Sent Events: `dense` (stage-1 top_k) as soon as it is known, `reranked`, then `done`."""
    r, choice = req.validated(service), req.choice(service)
    dense: asyncio.Future[Dense] = asyncio.get_running_loop().create_future()

    async def on_dense(d: Dense) -> None:
        dense.set_result(d)

    task = asyncio.create_task(service.search(r, on_dense, choice))
    await asyncio.wait({task, dense}, return_when=asyncio.FIRST_COMPLETED)
    if not dense.done():  # stage 1 failed: the error gets its proper status, before any event
        dense.cancel()
        task.result()  # raises
    d = dense.result()

    async def events() -> AsyncIterator[str]:
        timings = {k: round(v, 3) for k, v in d.timings_ms.items() if k != "rerank"}
        try:
            yield _sse("dense", {"results": d.hits, "candidates": d.candidates, "timings_ms": timings})
            try:
                out = SearchResponse.build(await task).model_dump(mode="json")
            except Exception as e:  # strict_rerank: report in-band, the status line is already sent
                yield _sse("error", json.loads(bytes(error_response(e).body)))
                return
            yield _sse("reranked", {"results": out["results"], "reranker": out["reranker"]})
            yield _sse("done", {"timings_ms": out["timings_ms"], "candidates": out["candidates"]})
        finally:
            if not task.done():  # the client went away: stop waiting for stage 2
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@probes.get("/healthz")
async def healthz() -> dict[str, str]:
    """The ingress process is alive (no dependency checked)."""
    return {"status": "ok"}


@probes.get("/info", responses={401: ERRORS[401]})
async def info(service: Service) -> dict[str, Any]:
    """The effective configuration of every stage as its replica holds it (models, runtime, limits,
    batch knobs, database versions); no secrets."""
    return await service.info()


@probes.get(
    "/readyz", responses={503: {"model": ErrorBody, "description": "Not ready; the reason says why."}}
)
async def readyz(service: Service) -> JSONResponse:
    """Models loaded and the database reachable; else 503 with the reason."""
    ok, detail = await service.ready()
    if ok:
        return JSONResponse({"ready": True, **detail})
    reasons = "; ".join(f"{k}: {v['reason']}" for k, v in detail.items() if not v["ready"])
    return JSONResponse(
        {"error": f"not ready: {reasons}", "error_type": "not_ready", **detail},
        status_code=503,
        headers={"Retry-After": "1"},
    )
