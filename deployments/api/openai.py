"""OpenAI: ``POST /v1/embeddings`` (``openai.OpenAI(base_url=".../v1").embeddings.create``) and
``GET /v1/models`` (``client.models.list()``): the served rerank models.

``input`` is a text or a list (not token ids); ``encoding_format`` float or base64 (little-endian float32
bytes, as OpenAI sends them); ``usage`` counts the embedder's tokens. ``dimensions`` must be the model's:
the served model cannot shorten its vectors.
"""

from __future__ import annotations

import base64
import time
from typing import Literal

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from deployments._schemas import Integer
from deployments._service import EmbedReply
from deployments.api.common import Service
from deployments.api.errors import ERRORS

__all__ = [
    "ModelList",
    "OpenAIEmbeddingsRequest",
    "OpenAIEmbeddingsResponse",
    "list_models",
    "openai_embeddings",
]

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


class ServedModel(BaseModel):
    """One served rerank model in OpenAI's list shape (``id``, ``object``, ``created``, ``owned_by``), with
    what this service adds: its backend, the model it loads, whether it is the default, and whether the
    Reranker replica that answered holds it loaded now."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(description="The name requests use (`model`; `rerank_model` on /search).")
    object: Literal["model"] = "model"
    created: int = Field(description="When this service started (Unix seconds): OpenAI's field.")
    owned_by: str = "rag-serve"
    backend: str
    model: str | None = Field(description="HF id or folder (Cohere's model name for backend cohere).")
    default: bool
    loaded: bool = Field(description="Held loaded by the Reranker replica that answered.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ServedModel]
    replica: str | None = Field(None, description="The Reranker replica that answered.")
    loaded_models: list[str] = Field(default_factory=list, description="The models that replica holds.")
    models_per_replica: int | None = Field(
        None, description="rerank_models_per_replica: models one replica holds at most (LRU beyond)."
    )
    models_by_replica: dict[str, list[str]] | None = Field(
        None,
        description="Every Reranker replica -> the models it holds, as Serve's router knows them (each "
        "replica reports its loads and evictions; null until the router has heard).",
    )


_STARTED = int(time.time())


@router.get("/v1/models", response_model=ModelList, response_model_exclude_none=True, responses=ERRORS)
async def list_models(service: Service) -> ModelList:
    """The served rerank models in OpenAI's list shape (`client.models.list()`), each with its backend,
    model, whether it is the default, and whether the answering Reranker replica holds it loaded."""
    got = await service.models()
    data = [
        ServedModel(
            id=m["name"],
            created=_STARTED,
            backend=m["backend"],
            model=m.get("model"),
            default=m["default"],
            loaded=m["loaded"],
            **({"instruction": m["instruction"]} if "instruction" in m else {}),
        )
        for m in got["models"]
    ]
    return ModelList(
        data=data,
        replica=got["replica"],
        loaded_models=got["loaded_models"],
        models_per_replica=got["models_per_replica"],
        models_by_replica=got["models_by_replica"],
    )
