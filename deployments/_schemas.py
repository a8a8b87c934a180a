"""Request and response models of the HTTP API (they are the OpenAPI schema at ``/docs``).

Types are checked by pydantic (a non-string document is a 422); ranges that depend on configuration
(fetch_k <= max_fetch_k, top_k <= fetch_k, number of documents) are checked by the service, also as 422s.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

__all__ = [
    "CohereRerankRequest",
    "CohereRerankResponse",
    "EmbedRequest",
    "ErrorBody",
    "Hit",
    "RerankerInfo",
    "SearchRequest",
    "SearchResponse",
    "TEIRank",
    "TEIRerankRequest",
]


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong and what to change.")
    error_type: str = Field(
        description="Machine-readable kind: invalid_input, overloaded, store_unavailable, ..."
    )


# -- /search ---------------------------------------------------------------------------------------
class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: StrictStr = Field(description="Natural-language query.", examples=["how do I parse a date?"])
    fetch_k: StrictInt | None = Field(None, description="Stage-1 candidates (default: the service's, 100).")
    top_k: StrictInt | None = Field(None, description="Results returned (default: the service's, 8).")
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


class Hit(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    doc_id: str | None = None
    source: str
    content: str
    score: float = Field(description="Rerank score; the dense score when stage 2 did not run.")
    dense_score: float = Field(description="Cosine similarity from stage 1.")
    chunk_index: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class RerankerInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None
    backend: str | None = None
    device: str | None
    dtype: str | None
    trained: bool | None = Field(description="False for the offline stand-in: its ranking is not meaningful.")
    reranked: bool
    reason: str | None = Field(
        None,
        description=(
            "Why not reranked: not_requested | disabled | budget | overloaded | reranker_error "
            "| no_candidates."
        ),
    )
    detail: str | None = Field(None, description="The error behind reason=reranker_error or overloaded.")


class SearchResponse(BaseModel):
    query: str
    collection: str
    results: list[Hit]
    candidates: int = Field(description="Stage-1 candidates that were (or would have been) reranked.")
    timings_ms: dict[str, float | str] = Field(
        description="embed, retrieve, rerank, total (milliseconds); strategy: the stage-1 search plan."
    )
    reranker: RerankerInfo


# -- /v2/rerank (Cohere) ---------------------------------------------------------------------------
class CohereRerankRequest(BaseModel):
    """Cohere Rerank v2 request (``cohere.ClientV2.rerank``). Unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = Field(None, description="Accepted for compatibility; the served model is used.")
    query: StrictStr
    documents: list[StrictStr]
    top_n: StrictInt | None = Field(None, description="Results to return (default: all).")
    max_tokens_per_doc: StrictInt | None = Field(
        None, description="Accepted; the model truncates at 512 tokens."
    )


class CohereV1RerankRequest(BaseModel):
    """Cohere Rerank v1 request (``cohere.Client.rerank``, used by LlamaIndex's CohereRerank)."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None
    query: StrictStr
    documents: list[StrictStr | dict[str, Any]]
    top_n: StrictInt | None = None
    return_documents: StrictBool = False
    rank_fields: list[StrictStr] | None = None


class CohereResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    relevance_score: float


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: dict[str, Any]


# -- /rerank (TEI) ---------------------------------------------------------------------------------
class TEIRerankRequest(BaseModel):
    """Hugging Face text-embeddings-inference ``/rerank`` request."""

    model_config = ConfigDict(extra="allow")
    query: StrictStr
    texts: list[StrictStr]
    raw_scores: StrictBool = Field(False, description="Logits instead of sigmoid scores.")
    return_text: StrictBool = False
    truncate: StrictBool | None = None
    truncation_direction: Literal["Left", "Right", "left", "right"] | None = None


class TEIRank(BaseModel):
    index: int
    score: float
    text: str | None = None


# -- /embed (TEI) ----------------------------------------------------------------------------------
class EmbedRequest(BaseModel):
    """TEI ``/embed`` request: one text or a list; the answer is a list of vectors."""

    model_config = ConfigDict(extra="allow")
    inputs: StrictStr | list[StrictStr]
    normalize: StrictBool = Field(True, description="Vectors are always L2-normalised.")
