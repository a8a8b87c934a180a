"""Request and response models of the HTTP API (they are the OpenAPI schema at ``/docs``).

Types are checked by pydantic (a non-string document is a 422); ranges that depend on configuration
(fetch_k <= max_fetch_k, top_k <= fetch_k, number of documents) are checked by the service, also as 422s.
``apply_limits`` writes those configured ranges into the OpenAPI document (``request_limits``: the values
come from the same SearchConfig the service validates with).
"""

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)

__all__ = [
    "QUERY_PATTERN",
    "TEXT_PATTERN",
    "CohereRerankRequest",
    "CohereRerankResponse",
    "CohereV1RerankRequest",
    "EmbedRequest",
    "ErrorBody",
    "Hit",
    "OpenAIEmbeddingsRequest",
    "OpenAIEmbeddingsResponse",
    "RerankerInfo",
    "SearchRequest",
    "SearchResponse",
    "TEIRank",
    "TEIRerankRequest",
    "V1RerankResponse",
    "apply_limits",
    "request_limits",
]


def _whole(value: int | float) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


# JSON Schema's "integer" is any number with no fractional part (4.0 included), so that is what is accepted:
# an int, or a float equal to one; never a string or a boolean.
Integer = Annotated[StrictInt | StrictFloat, AfterValidator(_whole), WithJsonSchema({"type": "integer"})]


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong and what to change.")
    error_type: str = Field(
        description="Machine-readable kind: invalid_input, overloaded, store_unavailable, ..."
    )


# -- /search ---------------------------------------------------------------------------------------
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


# -- rerank routes: Cohere v2 (/v2/rerank), Cohere v1 and Jina (/v1/rerank), TEI (/rerank) ----------
DocumentIn = StrictStr | dict[str, Any]
_DOCS = (
    "Strings, or objects `{id?, text}` (Jina, vLLM; Cohere v1's `rank_fields` names the text field); "
    "both may be mixed. Ids must not repeat; they come back in the results."
)
_MAX_TOKENS = (
    "Tokens of each document read (default and cap: RAG_RERANK_MAX_TOKENS_PER_DOC, 4096). A document "
    "longer than the model's window is split into overlapping windows; its score is the best window's."
)


class CohereRerankRequest(BaseModel):
    """Cohere Rerank v2 request (``cohere.ClientV2.rerank``). Unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = Field(None, description="Accepted for compatibility; the served model is used.")
    query: StrictStr
    documents: list[DocumentIn] = Field(description=_DOCS)
    top_n: Integer | None = Field(None, description="Results to return (default: all).")
    max_tokens_per_doc: Integer | None = Field(None, description=_MAX_TOKENS)
    return_documents: StrictBool = Field(False, description="Return each result's text as `document.text`.")


class CohereV1RerankRequest(BaseModel):
    """Cohere Rerank v1 (``cohere.Client.rerank``, LlamaIndex's CohereRerank) and Jina Rerank
    (``POST /v1/rerank`` of api.jina.ai and vLLM; LlamaIndex's and LangChain's JinaRerank) requests."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None
    query: StrictStr
    documents: list[DocumentIn] = Field(description=_DOCS)
    top_n: Integer | None = None
    return_documents: StrictBool | None = Field(
        None,
        description="Return the texts. Unset: true when `model` is a Jina model (Jina's default), else "
        "false (Cohere v1's default).",
    )
    rank_fields: list[StrictStr] | None = None
    max_tokens_per_doc: Integer | None = Field(None, description=_MAX_TOKENS)


class RerankDocumentOut(BaseModel):
    text: str


class Span(BaseModel):
    start: int = Field(description="First character of the best-scoring window.")
    end: int = Field(description="One past its last character.")


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


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: dict[str, Any] = Field(
        description="api_version, billed_units.search_units (windows / 100, rounded up), "
        "tokens.input_tokens, warnings."
    )


class V1RerankResponse(CohereRerankResponse):
    """Cohere v1 (id, results, meta) and Jina (model, results, usage) in one body: either client reads
    its fields and ignores the others."""

    model: str | None = None
    usage: dict[str, int] = Field(description="Jina's usage: total_tokens (= prompt_tokens).")


# -- /rerank (TEI) ---------------------------------------------------------------------------------
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
    max_tokens_per_doc: Integer | None = Field(None, description=_MAX_TOKENS)


class TEIRank(BaseModel):
    index: int
    score: float
    text: str | None = None
    span: Span | None = None


# -- /embed (TEI), /v1/embeddings (OpenAI) ---------------------------------------------------------
class EmbedRequest(BaseModel):
    """TEI ``/embed`` request: one text or a list; the answer is a list of vectors."""

    model_config = ConfigDict(extra="allow")
    inputs: StrictStr | list[StrictStr]
    normalize: StrictBool = Field(True, description="Vectors are always L2-normalised.")


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


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: dict[str, int] = Field(description="prompt_tokens and total_tokens (the embedder's tokenizer).")


# -- limits: the request constraints that come from configuration, as JSON Schema -------------------------
# rag/validation.py enforces these limits (its 422s name the setting); the functions below state the same
# config values in the OpenAPI schema, so a client (or schemathesis) reads them from /openapi.json. One rule,
# two readers: nothing here is a number of its own.
TEXT_PATTERN = r"^[^\x00]*$"  # no NUL (lone surrogates are not valid UTF-8, so never valid JSON text here)
# ... and not blank by Python's str.isspace (the service's rule), which counts \x1c-\x1f and \x85 too
_PY_SPACE = r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
QUERY_PATTERN = rf"^[^\x00]*[^\x00{_PY_SPACE}][^\x00]*$"
Keywords = dict[str, dict[str, Any]]  # JSON type ("string", "array", "integer") -> keywords for it


def _filter_schema() -> dict[str, Any]:
    """The filter grammar of rag/store/filters.py (parse_filter enforces it) as JSON Schema."""
    from rag.store.filters import MAX_IN_VALUES, MAX_VALUE_CHARS

    text = {"type": "string", "maxLength": MAX_VALUE_CHARS, "pattern": TEXT_PATTERN}
    values = {"type": "array", "items": text, "minItems": 1, "maxItems": MAX_IN_VALUES}

    def op(name: str, schema: dict[str, Any]) -> dict[str, Any]:
        one = {"properties": {name: schema}, "required": [name], "additionalProperties": False}
        return {"type": "object", **one}

    return {
        "type": "object",
        "properties": {
            "source": {"anyOf": [text, op("in", values), op("prefix", text)]},
            "doc_id": {"anyOf": [text, op("in", values)]},
            "metadata": {"type": "object", "description": "Contained in the chunk's metadata (jsonb @>)."},
        },
        "additionalProperties": False,
    }


def request_limits(config: Any) -> dict[str, dict[str, Keywords]]:
    """Request model -> field -> JSON type -> the JSON Schema keywords ``config`` (a SearchConfig) sets."""
    from rag.errors import _COLLECTION_RE

    query = {"string": {"minLength": 1, "maxLength": config.max_query_chars, "pattern": QUERY_PATTERN}}
    k = {"integer": {"minimum": 1, "maximum": config.max_fetch_k}}
    docs_n = config.documents_limit
    text = {"type": "string", "pattern": TEXT_PATTERN}
    doc_id = {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}], "description": "Unique."}
    documents = {
        "array": {"minItems": 1, "maxItems": docs_n},
        "string": {"pattern": TEXT_PATTERN},
        # {text, id?}; Cohere v1's rank_fields may name another field than text (the service reads that one)
        "object": {"properties": {"text": text, "id": doc_id}, "required": ["text"]},
    }
    top_n = {"integer": {"minimum": 1, "maximum": docs_n}}
    max_tokens = {"integer": {"minimum": 1, "maximum": config.rerank_max_tokens_per_doc}}
    inputs = {"array": {"minItems": 1, "maxItems": config.max_embed_inputs}, **query}
    return {
        "SearchRequest": {
            "query": query,
            "fetch_k": k,
            "top_k": {"integer": {**k["integer"], "description": "At most fetch_k."}},
            "budget_ms": {"number": {"exclusiveMinimum": 0}, "integer": {"exclusiveMinimum": 0}},
            "collection": {"string": {"pattern": _COLLECTION_RE.pattern}},
            "filter": {"object": _filter_schema()},
        },
        "CohereRerankRequest": {
            "query": query,
            "documents": documents,
            "top_n": top_n,
            "max_tokens_per_doc": max_tokens,
        },
        "CohereV1RerankRequest": {
            "query": query,
            "documents": documents,
            "top_n": top_n,
            "max_tokens_per_doc": max_tokens,
        },
        "TEIRerankRequest": {
            "query": query,
            "texts": {"array": documents["array"], "string": documents["string"]},
            "max_tokens_per_doc": max_tokens,
        },
        "EmbedRequest": {"inputs": inputs},
        "OpenAIEmbeddingsRequest": {"input": inputs},
    }


def _constrain(schema: dict[str, Any], keywords: Keywords) -> None:
    """Merge ``keywords[type]`` into every subschema of ``schema`` of that type (through anyOf and items)."""
    for sub in schema.get("anyOf", ()):
        _constrain(sub, keywords)
    kind = schema.get("type")
    if kind in keywords:
        schema.update(keywords[kind])
    if kind == "array" and "items" in schema:
        _constrain(schema["items"], {t: kw for t, kw in keywords.items() if t != "array"})


def apply_limits(openapi: dict[str, Any], config: Any) -> dict[str, Any]:
    """``openapi`` (FastAPI's generated document) with ``request_limits(config)`` merged into its request
    bodies; returns it."""
    components = openapi.get("components", {}).get("schemas", {})
    for model, fields in request_limits(config).items():
        props = components[model]["properties"]
        for name, keywords in fields.items():
            _constrain(props[name], keywords)
    return openapi
