"""Cohere Rerank v1 and Jina Rerank: ``POST /v1/rerank``, one body for both.

Cohere v1 (``cohere.Client``, LlamaIndex's CohereRerank) reads ``id``, ``results`` and ``meta``; Jina
(api.jina.ai's and vLLM's shape: LlamaIndex's and LangChain's JinaRerank) reads ``model``, ``results`` and
``usage``. Each client ignores the other's fields.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from deployments._schemas import (
    DOCS_DESCRIPTION,
    INSTRUCTION_DESCRIPTION,
    MAX_TOKENS_DESCRIPTION,
    MODEL_DESCRIPTION,
    DocumentIn,
    Integer,
)
from deployments._service import RerankReply
from deployments.api.cohere import CohereRerankResponse, CohereResult, cohere_meta
from deployments.api.common import Documents, Service, usage_headers
from deployments.api.errors import ERRORS

__all__ = ["CohereV1RerankRequest", "V1RerankResponse", "rerank_v1"]

router = APIRouter()


class CohereV1RerankRequest(BaseModel):
    """Cohere Rerank v1 (``cohere.Client.rerank``, LlamaIndex's CohereRerank) and Jina Rerank
    (``POST /v1/rerank`` of api.jina.ai and vLLM; LlamaIndex's and LangChain's JinaRerank) requests."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = Field(None, description=MODEL_DESCRIPTION)
    query: StrictStr
    documents: list[DocumentIn] = Field(description=DOCS_DESCRIPTION)
    top_n: Integer | None = None
    return_documents: StrictBool | None = Field(
        None,
        description="Return the texts. Unset: true when `model` is a Jina model (Jina's default), else "
        "false (Cohere v1's default).",
    )
    rank_fields: list[StrictStr] | None = None
    max_tokens_per_doc: Integer | None = Field(None, description=MAX_TOKENS_DESCRIPTION)
    instruction: StrictStr | None = Field(None, description=INSTRUCTION_DESCRIPTION)

    @property
    def text_field(self) -> str:
        """The documents' text field (Cohere v1's ``rank_fields``: its first)."""
        return (self.rank_fields or ["text"])[0]


class V1RerankResponse(CohereRerankResponse):
    """Cohere v1 (id, results, meta) and Jina (model, results, usage) in one body: either client reads
    its fields and ignores the others."""

    model: str | None = None
    usage: dict[str, int] = Field(description="Jina's usage: total_tokens (= prompt_tokens).")

    @classmethod
    def build_v1(cls, req: CohereV1RerankRequest, docs: Documents, reply: RerankReply) -> V1RerankResponse:
        return_docs = req.return_documents
        if return_docs is None:  # Jina returns the documents unless told not to; Cohere v1 does not
            return_docs = (req.model or "").lower().startswith("jina")
        tokens = reply.result.usage.tokens or 0
        return cls(
            id=str(uuid.uuid4()),
            model=req.model or reply.reranker.model,
            results=CohereResult.ranked(reply, docs, req.top_n, return_docs),
            meta=cohere_meta(reply, "1"),
            usage={"total_tokens": tokens, "prompt_tokens": tokens},
        )


@router.post("/v1/rerank", response_model=V1RerankResponse, response_model_exclude_none=True,
             responses=ERRORS)  # fmt: skip
async def rerank_v1(req: CohereV1RerankRequest, response: Response, service: Service) -> V1RerankResponse:
    """Cohere Rerank v1 (`cohere.Client`, LlamaIndex's CohereRerank) and Jina Rerank (LlamaIndex's and
    LangChain's JinaRerank, vLLM's shape): one body carries both (`id`, `meta`; `model`, `usage`)."""
    docs = Documents.parse(req.documents, req.text_field)
    reply = await service.rerank_documents(
        req.query,
        docs.texts,
        top_n=req.top_n,
        max_tokens_per_doc=req.max_tokens_per_doc,
        model=req.model,
        instruction=req.instruction,
    )
    usage_headers(response, reply)
    return V1RerankResponse.build_v1(req, docs, reply)
