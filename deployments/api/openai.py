"""OpenAI embeddings: ``POST /v1/embeddings`` (``openai.OpenAI(base_url=".../v1").embeddings.create``).

``input`` is a text or a list (not token ids); ``encoding_format`` float or base64 (little-endian float32
bytes, as OpenAI sends them); ``usage`` counts the embedder's tokens. ``dimensions`` must be the model's:
the served model cannot shorten its vectors.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from deployments._schemas import Integer
from deployments._service import EmbedReply
from deployments.api.common import Service
from deployments.api.errors import ERRORS

__all__ = ["OpenAIEmbeddingsRequest", "OpenAIEmbeddingsResponse", "openai_embeddings"]

router = APIRouter()


class OpenAIEmbeddingsRequest(BaseModel):
    """OpenAI ``POST /v1/embeddings`` (``openai.OpenAI(base_url=...).embeddings.create``)."""

    model_config = ConfigDict(extra="allow")
    input: StrictStr | list[StrictStr] = Field(description="A text or a list of texts (not token ids).")
    model: StrictStr | None = Field(None, description="Accepted; the served embedding model is used.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes, as OpenAI sends them."
    )
    dimensions: Integer | None = Field(None, description="Must be the model's dimension when given.")
    user: StrictStr | None = None

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: dict[str, int] = Field(description="prompt_tokens and total_tokens (the embedder's tokenizer).")

    @classmethod
    def build(cls, req: OpenAIEmbeddingsRequest, reply: EmbedReply) -> OpenAIEmbeddingsResponse:
        data = []
        for i, v in enumerate(reply.vectors):
            arr = np.asarray(v, dtype="<f4")
            emb = (
                base64.b64encode(arr.tobytes()).decode() if req.encoding_format == "base64" else arr.tolist()
            )
            data.append(OpenAIEmbedding(index=i, embedding=emb))
        total = sum(reply.tokens)
        model = str(reply.embedder.model or req.model or "")
        return cls(data=data, model=model, usage={"prompt_tokens": total, "total_tokens": total})


@router.post("/v1/embeddings", response_model=OpenAIEmbeddingsResponse, responses=ERRORS)
async def openai_embeddings(req: OpenAIEmbeddingsRequest, service: Service) -> OpenAIEmbeddingsResponse:
    """OpenAI embeddings (`openai.OpenAI(base_url=".../v1").embeddings.create`): `input` a text or a
    list, `encoding_format` float or base64 (little-endian float32); `usage` in embedder tokens."""
    reply = await service.embed_with_usage(req.texts, dimensions=req.dimensions)
    return OpenAIEmbeddingsResponse.build(req, reply)
