"""Hugging Face text-embeddings-inference: ``POST /rerank`` and ``POST /embed``.

``/rerank``: ``{query, texts}`` -> ``[{index, score}]``, best first, with TEI's usage headers. TEI's
``truncate: false`` is a 422 for a text that does not fit the model with the query; ``true`` scores the
first window only; unset, long texts are split into windows. ``/embed``: one text or a list -> vectors.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from deployments._schemas import (
    INSTRUCTION_DESCRIPTION,
    MAX_TOKENS_DESCRIPTION,
    MODEL_DESCRIPTION,
    Integer,
    Span,
)
from deployments._service import RerankReply, logit
from deployments.api.common import Service, order, usage_headers
from deployments.api.errors import ERRORS

__all__ = ["MODEL_HEADER", "EmbedRequest", "TEIRank", "TEIRerankRequest", "embed", "tei_rerank"]

router = APIRouter()


class TEIRerankRequest(BaseModel):
    """Hugging Face text-embeddings-inference ``/rerank`` request."""

    model_config = ConfigDict(extra="allow")
    query: StrictStr
    texts: list[StrictStr]
    raw_scores: StrictBool = Field(False, description="Logits instead of sigmoid scores.")
    return_text: StrictBool = False
    truncate: StrictBool | None = Field(
        None,
        description="TEI's meaning: false = a text that does not fit the model with the query is a 422; "
        "true = only its first window is scored. Unset: long texts are split into windows.",
    )
    truncation_direction: Literal["Left", "Right", "left", "right"] | None = None
    max_tokens_per_doc: Integer | None = Field(None, description=MAX_TOKENS_DESCRIPTION)
    instruction: StrictStr | None = Field(None, description=INSTRUCTION_DESCRIPTION)


# TEI's body has no model field (one TEI serves one model): the model goes in this header.
MODEL_HEADER = "X-Rerank-Model"
ModelHeader = Annotated[
    str | None,
    Header(alias=MODEL_HEADER, description=f"{MODEL_DESCRIPTION} (TEI's body has no model field.)"),
]


class TEIRank(BaseModel):
    index: int
    score: float
    text: str | None = None
    span: Span | None = None

    @classmethod
    def ranked(cls, req: TEIRerankRequest, reply: RerankReply) -> list[TEIRank]:
        """Every text, best first: sigmoid scores (logits with ``raw_scores``), texts on request, spans."""
        r = reply.result
        return [
            cls(
                index=i,
                score=logit(r.scores[i]) if req.raw_scores else r.scores[i],
                text=req.texts[i] if req.return_text else None,
                span=Span.of(r.spans[i]),
            )
            for i in order(r.scores)
        ]


class EmbedRequest(BaseModel):
    """TEI ``/embed`` request: one text or a list; the answer is a list of vectors."""

    model_config = ConfigDict(extra="allow")
    inputs: StrictStr | list[StrictStr]
    normalize: StrictBool = Field(True, description="Vectors are always L2-normalised.")

    @property
    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else self.inputs


@router.post("/rerank", response_model=list[TEIRank], response_model_exclude_none=True, responses=ERRORS)
async def tei_rerank(
    req: TEIRerankRequest, response: Response, service: Service, model: ModelHeader = None
) -> list[TEIRank]:
    """TEI rerank: `{query, texts}` -> `[{index, score}]`, best first; TEI's usage headers.
    `truncate: false` is TEI's 422 for a text that does not fit; unset, long texts are split. The model:
    the `X-Rerank-Model` header (unset: the default)."""
    reply = await service.rerank_documents(
        req.query,
        req.texts,
        max_tokens_per_doc=req.max_tokens_per_doc,
        truncate=req.truncate,
        field="texts",
        model=model,
        instruction=req.instruction,
    )
    usage_headers(response, reply)
    return TEIRank.ranked(req, reply)


@router.post("/embed", response_model=list[list[float]], responses=ERRORS)
async def embed(req: EmbedRequest, service: Service) -> list[list[float]]:
    """TEI embed: `{inputs: str | [str]}` -> one L2-normalised vector per input."""
    return await service.embed(req.texts)
