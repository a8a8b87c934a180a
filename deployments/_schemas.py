"""What the HTTP API's dialects share: the error body, JSON Schema integers, the reranker's description,
the rerank documents' field types, and the limits from configuration written into the OpenAPI document.

Each dialect's own request and response models live with its routes (``deployments.api.<dialect>``). Types
are checked by pydantic (a non-string document is a 422); ranges that depend on configuration (fetch_k <=
max_fetch_k, top_k <= fetch_k, number of documents) are checked by ``rag.validation``, also as 422s.
``apply_limits`` writes those configured ranges into the OpenAPI document (``request_limits``: the values
come from the same SearchConfig the service validates with).
"""

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)

from rag.stages import SearchConfig
from rag.validation import COLLECTION_RE

__all__ = [
    "DOCS_DESCRIPTION",
    "INSTRUCTION_DESCRIPTION",
    "MAX_TOKENS_DESCRIPTION",
    "MODEL_DESCRIPTION",
    "QUERY_PATTERN",
    "TEXT_PATTERN",
    "DocumentIn",
    "ErrorBody",
    "Integer",
    "ModelCard",
    "Span",
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


class ModelCard(BaseModel):
    """What a model replica reports it runs (its ``info()``): the fields the API reads, the rest kept."""

    model_config = ConfigDict(extra="allow")
    model: str | None
    backend: str | None = None
    device: str | None
    dtype: str | None
    trained: bool | None = Field(description="False for the offline stand-in: its ranking is not meaningful.")

    @classmethod
    def unknown(cls) -> "ModelCard":
        return cls(model=None, device=None, dtype=None, trained=None)


# -- rerank documents: Cohere v2 (/v2/rerank), Cohere v1 and Jina (/v1/rerank), TEI (/rerank) ----------
DocumentIn = StrictStr | dict[str, Any]
DOCS_DESCRIPTION = (
    "Strings, or objects `{id?, text}` (Jina, vLLM; Cohere v1's `rank_fields` names the text field); "
    "both may be mixed. Ids must not repeat; they come back in the results."
)
MODEL_DESCRIPTION = (
    "The served rerank model to score with (GET /v1/models lists them; unset: the default). An unknown "
    "name is a 422 listing the served names. When the service serves one model (RAG_RERANK_MODELS unset), "
    "any name is accepted and that model scores."
)
INSTRUCTION_DESCRIPTION = (
    "The task instruction an LLM reranker (backend llm) reads in its prompt; unset: the model's default "
    "instruction. A model that takes none (cross-encoder, Cohere) answers 422."
)
MAX_TOKENS_DESCRIPTION = (
    "Tokens of each document read (default and cap: RAG_RERANK_MAX_TOKENS_PER_DOC, 4096). A document "
    "longer than the model's window is split into overlapping windows; its score is the best window's."
)


class Span(BaseModel):
    start: int = Field(description="First character of the best-scoring window.")
    end: int = Field(description="One past its last character.")

    @classmethod
    def of(cls, span: tuple[int, int] | None) -> "Span | None":
        return None if span is None else cls(start=span[0], end=span[1])


# -- limits: the request constraints that come from configuration, as JSON Schema -------------------------
# rag/validation.py enforces these limits (its 422s name the setting); the functions below state the same
# config values in the OpenAPI schema, so a client (or schemathesis) reads them from /openapi.json. One rule,
# two readers: nothing here is a number of its own.
TEXT_PATTERN = r"^[^\x00]*$"  # no NUL (lone surrogates are not valid UTF-8, so never valid JSON text here)
# ... and not blank by Python's str.isspace (the service's rule), which counts \x1c-\x1f and \x85 too
_PY_SPACE = r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
QUERY_PATTERN = rf"^[^\x00]*[^\x00{_PY_SPACE}][^\x00]*$"
Keywords = dict[str, dict[str, Any]]  # JSON type ("string", "array", "integer") -> keywords for it


def _no_nul_object(depth: int) -> dict[str, Any]:
    """An object's keywords for JSON without NUL in any key or string (PostgreSQL's jsonb cannot hold one):
    ``depth`` levels of nesting are described, deeper values left as any JSON."""
    text = {"type": "string", "pattern": TEXT_PATTERN}
    scalars: list[dict[str, Any]] = [text, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
    value: dict[str, Any] = {"anyOf": scalars}
    if depth > 1:
        nested = {"type": "object", **_no_nul_object(depth - 1)}
        value = {"anyOf": [*scalars, {"type": "array", "items": {"anyOf": scalars}}, nested]}
    return {"propertyNames": {"pattern": TEXT_PATTERN}, "additionalProperties": value}


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
            "metadata": {
                "type": "object",
                "description": "Contained in the chunk's metadata (jsonb @>).",
                **_no_nul_object(depth=2),
            },
        },
        "additionalProperties": False,
    }


def request_limits(config: SearchConfig) -> dict[str, dict[str, Keywords]]:
    """Request model -> field -> JSON type -> the JSON Schema keywords ``config`` (a SearchConfig) sets."""
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
    # no served model takes an instruction: no string is valid (the service answers 422)
    instruction = {"string": {**query["string"]}} if config.takes_instructions else {"string": {"not": {}}}
    # the served models' names (when RAG_RERANK_MODELS lists them; else any name is accepted)
    model = {"string": {"enum": [m.name for m in config.rerank_models]}} if config.rerank_models else {}
    return {
        "SearchRequest": {
            "query": query,
            "fetch_k": k,
            "top_k": {"integer": {**k["integer"], "description": "At most fetch_k."}},
            "budget_ms": {"number": {"exclusiveMinimum": 0}, "integer": {"exclusiveMinimum": 0}},
            "collection": {"string": {"pattern": COLLECTION_RE.pattern}},
            "filter": {"object": _filter_schema()},
            "rerank_model": model,
            "instruction": instruction,
        },
        "CohereRerankRequest": {
            "query": query,
            "documents": documents,
            "top_n": top_n,
            "max_tokens_per_doc": max_tokens,
            "model": model,
            "instruction": instruction,
        },
        "CohereV1RerankRequest": {
            "query": query,
            "documents": documents,
            "top_n": top_n,
            "max_tokens_per_doc": max_tokens,
            "model": model,
            "instruction": instruction,
        },
        "TEIRerankRequest": {
            "query": query,
            "texts": {"array": documents["array"], "string": documents["string"]},
            "max_tokens_per_doc": max_tokens,
            "instruction": instruction,
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


def apply_limits(openapi: dict[str, Any], config: SearchConfig) -> dict[str, Any]:
    """``openapi`` (FastAPI's generated document) with ``request_limits(config)`` merged into its request
    bodies; returns it."""
    components = openapi.get("components", {}).get("schemas", {})
    for model, fields in request_limits(config).items():
        props = components[model]["properties"]
        for name, keywords in fields.items():
            _constrain(props[name], keywords)
    return openapi
