"""Cohere Rerank v2: ``POST /v2/rerank`` (``cohere.ClientV2(base_url=...)``, LangChain's CohereRerank).

Documents may be strings or ``{id?, text}`` objects; long documents are split into windows
(``max_tokens_per_doc``); usage comes in ``meta`` and in TEI's headers. ``CohereResult.ranked`` and
``cohere_meta`` are shared with the Cohere v1 / Jina route (``deployments.api.jina``).
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from deployments._schemas import (
    DOCS_DESCRIPTION,
    INSTRUCTION_DESCRIPTION,
    MAX_TOKENS_DESCRIPTION,
    MODEL_DESCRIPTION,
    DocumentIn,
    Integer,
    Span,
)
from deployments._service import RerankReply
from deployments.api.common import Documents, Service, order, usage_headers
from deployments.api.errors import ERRORS

__all__ = ["CohereRerankRequest", "CohereRerankResponse", "CohereResult", "cohere_meta", "cohere_rerank_v2"]

router = APIRouter()


class CohereRerankRequest(BaseModel):
    """Cohere Rerank v2 request (``cohere.ClientV2.rerank``). Unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = Field(None, description=MODEL_DESCRIPTION)
    query: StrictStr
    documents: list[DocumentIn] = Field(description=DOCS_DESCRIPTION)
    top_n: Integer | None = Field(None, description="Results to return (default: all).")
    max_tokens_per_doc: Integer | None = Field(None, description=MAX_TOKENS_DESCRIPTION)
    return_documents: StrictBool = Field(False, description="Return each result's text as `document.text`.")
    instruction: StrictStr | None = Field(None, description=INSTRUCTION_DESCRIPTION)


class RerankDocumentOut(BaseModel):
    text: str


class CohereResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    relevance_score: float
    id: str | int | None = Field(None, description="The document's id, when it was sent with one.")
    document: RerankDocumentOut | None = None
    span: Span | None = Field(
        None, description="When the document was split: the character span of the window that scored best."
    )
    windows: int | None = Field(None, description="Windows scored when the document was split.")

    @classmethod
    def ranked(
        cls, reply: RerankReply, docs: Documents, top_n: int | None, return_documents: bool
    ) -> list[CohereResult]:
        """The results, best first (``top_n`` of them), with ids, texts and spans where they apply."""
        r = reply.result
        return [
            cls(
                index=i,
                relevance_score=r.scores[i],
                id=docs.ids[i],
                document=RerankDocumentOut(text=docs.texts[i]) if return_documents else None,
                span=Span.of(r.spans[i]),
                windows=r.windows[i] if r.spans[i] is not None else None,
            )
            for i in order(r.scores, top_n)
        ]


def cohere_meta(reply: RerankReply, version: str) -> dict[str, Any]:
    """Cohere's ``meta``: the API version, search units billed, input tokens, and a warning when the model
    is the offline stand-in."""
    usage = reply.result.usage
    meta: dict[str, Any] = {
        "api_version": {"version": version},
        # Cohere: a search unit is one query over up to 100 documents; split documents count per window
        "billed_units": {"search_units": max(1, -(-usage.pairs // 100))},
    }
    if usage.tokens is not None:
        meta["tokens"] = {"input_tokens": usage.tokens, "output_tokens": 0}
    card = reply.reranker
    if card.trained is False:
        meta["warnings"] = [f"reranker {card.model} is the offline stand-in: scores are not meaningful"]
    return meta


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: dict[str, Any] = Field(
        description="api_version, billed_units.search_units (windows / 100, rounded up), "
        "tokens.input_tokens, warnings."
    )

    @classmethod
    def build(cls, req: CohereRerankRequest, docs: Documents, reply: RerankReply) -> CohereRerankResponse:
        results = CohereResult.ranked(reply, docs, req.top_n, req.return_documents)
        return cls(id=str(uuid.uuid4()), results=results, meta=cohere_meta(reply, "2"))


@router.post("/v2/rerank", response_model=CohereRerankResponse, response_model_exclude_none=True,
             responses=ERRORS)  # fmt: skip
async def cohere_rerank_v2(
    req: CohereRerankRequest, response: Response, service: Service
) -> CohereRerankResponse:
    """Cohere Rerank v2 (`cohere.ClientV2(base_url=...)`, LangChain's CohereRerank). Documents may be
    `{id?, text}` objects; long documents are split (`max_tokens_per_doc`); usage in `meta`, headers."""
    docs = Documents.parse(req.documents)
    reply = await service.rerank_documents(
        req.query,
        docs.texts,
        top_n=req.top_n,
        max_tokens_per_doc=req.max_tokens_per_doc,
        model=req.model,
        instruction=req.instruction,
    )
    usage_headers(response, reply)
    return CohereRerankResponse.build(req, docs, reply)
