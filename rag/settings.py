"""The one Settings object and the only module that reads environment variables.

Every knob has the prefix ``RAG_`` (``RAG_DATABASE_URL``, ``RAG_RERANKER``, ...). The Cohere key is also read
from ``CO_API_KEY``, the variable Cohere's own SDK uses.

Each field says where it is used: the stages that need it (``embedder``, ``store``, ``reranker``,
``search``) or, for a field only the local process uses, the reason (``local=``). The typed per-stage
configuration classes (``EmbedderConfig``, ``StoreConfig``, ``RerankerConfig``, ``SearchConfig``, in
``rag.stages``) declare those fields; importing them checks that each holds exactly the fields tagged with
its stage, so the tag stays the one rule of where a setting goes:

    >>> Settings(rerank_runtime="torch").slice("reranker").rerank_runtime
    'torch'

``tests/test_settings_reach.py`` checks that every field is tagged, and, on a live Serve app, that every
stage field reaches its replica (read back from ``GET /info``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rag.validation import SEARCH_MODES, SearchMode, validate_collection_name

if TYPE_CHECKING:  # defined in rag.stages, which builds them from Settings (see __getattr__ below)
    from rag.stages import EmbedderConfig, RerankerConfig, SearchConfig, StageConfig, StoreConfig

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "DEFAULT_RERANK_MODEL",
    "MODEL_NAME_RE",
    "SEARCH_MODES",
    "SECRETS",
    "STAGES",
    "EmbedderConfig",
    "RerankModel",
    "RerankerConfig",
    "SearchConfig",
    "SearchMode",
    "Settings",
    "StageConfig",
    "StoreConfig",
    "field_stages",
    "get_settings",
    "local_reason",
    "pick_rerank_model",
    "redact_url",
    "split_urls",
]

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_RERANK_MODEL = "cross-encoder/ms-marco-MiniLM-L-6-v2"

RerankerBackend = Literal["cross-encoder", "cohere", "llm", "none"]
Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Runtime = Literal["auto", "torch", "openvino"]
LexicalIndexKind = Literal["auto", "bm25", "fts"]
IndexType = Literal["hnsw", "halfvec", "binary", "diskann"]  # rag.store.indexes
# The vector index new collections get, and how many candidates a binary one re-ranks per result, chosen
# by the 1M-vector figures (docs/BENCHMARKS.md, "Vector index types"): binary x 16 is the one type with
# recall@100 >= 0.95 at a third of float32 HNSW's index memory. Used by Settings and the store's constructors.
DEFAULT_INDEX_TYPE: IndexType = "binary"
DEFAULT_BINARY_RERANK_FACTOR = 16.0
Screen = Literal["auto", "fp32", "bf16", "int8"]
Aggregation = Literal["max", "mean", "first"]

STAGES = ("embedder", "store", "reranker", "search")
MODEL_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"


class RerankModel(BaseModel):
    """One served rerank model: an entry of ``rerank_models`` (``RAG_RERANK_MODELS``, a JSON list, or a
    Serve config's ``args.rerank_models``). Unset fields keep the reranker settings' values; ``settings``
    sets any other reranker setting for this model alone (``{"rerank_dtype": "float32"}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(
        pattern=MODEL_NAME_RE,
        description="What requests name: `model` on the rerank routes, `rerank_model` on /search.",
    )
    model: str | None = Field(
        None,
        description="HF id or local folder (cross-encoder, llm), or Cohere's model name (cohere). "
        "Unset: rerank_model (cohere_model for cohere).",
    )
    backend: RerankerBackend = Field("cross-encoder", description="The backend that scores with it.")
    runtime: Runtime | None = Field(None, description="rerank_runtime for this model.")
    max_length: int | None = Field(None, ge=8, description="rerank_max_length for this model.")
    batch_size: int | None = Field(None, ge=1, description="rerank_batch_size for this model.")
    token_budget: int | None = Field(None, ge=512, description="rerank_token_budget for this model.")
    instruction: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="llm backend: the instruction used when a request sends none (rerank_instruction for "
        "this model; unset: the model card's).",
    )
    default: bool = Field(False, description="Used when a request names no model (exactly one is).")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="Other reranker settings for this model, by Settings field name."
    )

    def overrides(self) -> dict[str, Any]:
        """The reranker settings this entry sets (Settings field name -> value)."""
        named = {
            "reranker": self.backend,
            "cohere_model" if self.backend == "cohere" else "rerank_model": self.model,
            "rerank_runtime": self.runtime,
            "rerank_max_length": self.max_length,
            "rerank_batch_size": self.batch_size,
            "rerank_token_budget": self.token_budget,
            "rerank_instruction": self.instruction,
        }
        return {**{k: v for k, v in named.items() if v is not None}, **self.settings}


def check_rerank_models(models: list[RerankModel]) -> None:
    """Unique names and exactly one default (a single entry is the default without saying so)."""
    names = [m.name for m in models]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"rerank_models: the names {repeated} repeat; give every model its own name")
    defaults = [m.name for m in models if m.default]
    if len(models) > 1 and len(defaults) != 1:
        got = f"{len(defaults)} are ({defaults})" if defaults else "none is"
        raise ValueError(
            f'rerank_models: exactly one model must be "default": true, {got}; mark the one that requests '
            "without a model get"
        )


def pick_rerank_model(models: list[RerankModel], name: str | None) -> str:
    """The served model a request's ``name`` selects: the default when None; "" when ``rerank_models`` is
    unset (one model, whatever a request names: the behaviour before several models). An unknown name is a
    422 (``UnknownModel``) that lists the served names."""
    from rag.errors import UnknownModel

    if not models:
        return ""
    if name is None or name == "":
        return next((m.name for m in models if m.default), models[0].name)
    if any(m.name == name for m in models):
        return name
    served = ", ".join(m.name for m in models)
    raise UnknownModel(
        f"unknown rerank model {name!r}: this service serves {served} (GET /v1/models lists them); "
        "name one of them, or leave the model out for the default"
    )


def _f(default: Any, *stages: str, local: str | None = None, **kw: Any) -> Any:
    """A Settings field used by ``stages`` (or, with ``local=reason``, only by the local process)."""
    assert stages or local, "a field is used by a stage or is process-local (with the reason)"
    assert all(s in STAGES for s in stages), stages
    extra = {"stages": list(stages)} if stages else {"local": local}
    return Field(default, json_schema_extra=extra, **kw)


# Never written into a Serve config, a log line or /info: they travel through the environment. (api_key is the
# client's own key: never the service's, and never put into a Serve config by `rag serve` either.)
SECRETS = frozenset({"database_url", "database_read_urls", "cohere_api_key", "api_keys", "api_key"})

_CLI = "used by the CLI process only (rag ingest / rag db), never by a Serve replica"
_LAUNCH = "bound by `rag serve` itself when it starts Ray and the HTTP proxy"
_CLIENT = "read by the Python client (rag.client) in the caller's process, never by the service"


class Settings(BaseSettings):
    """Configuration for the library, the CLI and the Serve app (env prefix ``RAG_``)."""

    model_config = SettingsConfigDict(env_prefix="RAG_", extra="ignore", populate_by_name=True)

    # --- storage -------------------------------------------------------------------------------
    database_url: str | None = _f(
        None,
        "store",
        description="PostgreSQL URL with pgvector. Unset: the embedded server in data_dir/pgdata.",
    )
    database_read_urls: str | None = _f(
        None,
        "store",
        description="Hot standbys (streaming replicas) of database_url, comma separated: the Retriever "
        "spreads searches across them; ingest, attach, the registry and migrations use database_url "
        "only. Unset: every search goes to database_url.",
    )
    read_replica_max_lag_s: float = _f(
        30.0,
        "store",
        gt=0,
        description="A standby more than this many seconds behind the primary (replay lag) takes no searches "
        "until it catches up; a search on a standby sees writes at most about this late.",
    )
    read_replica_probe_s: float = _f(
        1.0,
        "store",
        gt=0,
        description="How often each Retriever replica checks each standby's health and lag (seconds).",
    )
    data_dir: Path = _f(
        Path(".rag"),
        "embedder",
        "reranker",
        description="Project-local state: embedded database (pgdata/), model cache (models/).",
    )
    collection: str = _f("default", "search", description="Collection that ingest/query/serve/eval use.")
    pool_min_size: int = _f(1, "store", ge=0, description="Connections each pool keeps open.")
    pool_max_size: int = _f(
        8, "store", ge=1, description="Most connections per pool (per Retriever replica)."
    )
    connect_timeout_s: float = _f(5.0, "store", gt=0, description="Wait for a pooled connection (seconds).")
    hnsw_m: int = _f(16, "store", ge=2, le=100, description="HNSW graph degree of new collections' indexes.")
    hnsw_ef_construction: int = _f(64, "store", ge=4, le=1000, description="HNSW build-time candidate list.")
    hnsw_ef_search_min: int = _f(
        40, "store", ge=1, le=1000, description="ef_search floor; a query of k uses max(this, k * factor)."
    )
    hnsw_ef_search_factor: float = _f(
        1.5,
        "store",
        ge=1.0,
        le=10.0,
        description="ef_search = k x this: the recall margin over k (1.0 = exactly k).",
    )
    # -- vector index types (rag.store.indexes; docs/BENCHMARKS.md, index types) --
    index_type: IndexType = _f(
        DEFAULT_INDEX_TYPE,
        "store",
        description="Vector index new collections get: binary (bit HNSW + re-rank by the full vectors: "
        "1/6 of hnsw's index memory), hnsw (float32), halfvec (half-precision HNSW), diskann "
        "(pgvectorscale). Existing collections keep theirs.",
    )
    binary_rerank_factor: float = _f(
        DEFAULT_BINARY_RERANK_FACTOR,
        "store",
        ge=1.0,
        le=100.0,
        description="A binary index fetches k x this candidates by Hamming distance, re-ranked by the full "
        "vectors (at most 4000). 16: recall@100 0.966 on 1M vectors; 8: 0.906; 4: 0.760.",
    )
    lexical_index: LexicalIndexKind = _f(
        "auto",
        "store",
        description="Lexical index new collections get: bm25 (pg_textsearch), fts (tsvector + GIN, on every "
        "PostgreSQL); auto = bm25 where the server has pg_textsearch, else fts.",
    )
    text_search_config: str = _f(
        "english",
        "store",
        pattern=r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$",
        description="PostgreSQL text search configuration (stemming, stop words) of new lexical indexes, "
        "and of an attached tsvector column whose configuration cannot be read from its definition.",
    )
    # hybrid fusion (docs/retrieval.md: how the defaults were chosen)
    fusion_rrf_k: int = _f(
        60,
        "store",
        ge=1,
        description="Reciprocal rank fusion's k: a row scores sum(weight / (k + rank)) over the sides "
        "(dense, lexical) that returned it.",
    )
    fusion_depth_factor: float = _f(
        2.0,
        "store",
        ge=1.0,
        le=10.0,
        description="Hybrid: each side fetches max(fusion_depth_min, k x this) rows (at most 1000) before "
        "fusing them down to k.",
    )
    fusion_depth_min: int = _f(
        50, "store", ge=1, le=1000, description="Hybrid: the fewest rows each side fetches."
    )
    fusion_dense_weight: float = _f(1.0, "store", ge=0.0, description="Hybrid: RRF weight of the dense side.")
    fusion_lexical_weight: float = _f(
        1.0, "store", ge=0.0, description="Hybrid: RRF weight of the lexical side."
    )

    # --- models --------------------------------------------------------------------------------
    offline: bool = _f(
        False,
        "embedder",
        "reranker",
        validation_alias=AliasChoices("offline", "RAG_OFFLINE", "HF_HUB_OFFLINE"),
        description="Never contact the Hugging Face hub (also honours HF_HUB_OFFLINE).",
    )
    embedding_model: str = _f(DEFAULT_EMBEDDING_MODEL, "embedder", description="HF id or local folder.")
    embedding_device: Device = _f("auto", "embedder")
    embedding_dtype: DType = _f("auto", "embedder")
    embedding_runtime: Runtime = _f(
        "auto", "embedder", description="openvino (CPU), torch, or auto (openvino when installed)."
    )
    embedding_threads: int = _f(0, "embedder", ge=0, description="Embedder threads; 0 = the CPUs we may use.")
    embed_batch_size: int = _f(64, "embedder", ge=1, description="Texts per forward pass (plain path).")

    reranker: RerankerBackend = _f(
        "cross-encoder",
        "reranker",
        "search",  # the ingress's OpenAPI schema says whether an instruction is taken
        description="Stage-2 backend.",
    )
    rerank_models: list[RerankModel] = _f(
        [],
        "reranker",
        "search",  # the ingress resolves a request's model name (422 for an unknown one)
        description="Several rerank models served at once (JSON list of {name, model, backend, runtime, "
        "max_length, batch_size, token_budget, instruction, default, settings}), chosen per request by "
        "`model` (`rerank_model` on /search). Unset: one model from the reranker settings, and a "
        "request's model name is ignored (docs/serving.md: several models).",
    )
    rerank_models_per_replica: int = _f(
        2,
        "reranker",
        ge=1,
        description="Models one Reranker replica holds loaded at most (Ray Serve multiplexing): loading "
        "another evicts the least recently used. Bounded by the replica's memory (docs/serving.md).",
    )
    rerank_model: str = _f(DEFAULT_RERANK_MODEL, "reranker", description="HF id or local folder.")
    rerank_device: Device = _f("auto", "reranker")
    rerank_dtype: DType = _f("auto", "reranker")
    rerank_batch_size: int = _f(
        32, "reranker", ge=1, description="Pairs per forward pass (fp32 reference path)."
    )
    rerank_max_length: int = _f(512, "reranker", ge=8, le=512, description="Tokens per (query, document).")
    rerank_token_budget: int = _f(
        8192,
        "reranker",
        ge=512,
        description="Fast path: padded tokens per forward pass (batch x longest pair).",
    )
    rerank_threads: int = _f(0, "reranker", ge=0, description="Reranker threads; 0 = the CPUs we may use.")
    rerank_runtime: Runtime = _f(
        "auto",
        "reranker",
        description="Fast-path runtime: openvino (CPU), torch, or auto (openvino when installed).",
    )
    rerank_refine_top: int = _f(
        8, "reranker", ge=0, description="Fast path: rescore each query's best N pairs in fp32 (0: off)."
    )
    rerank_refine_margin: float = _f(
        0.1, "reranker", ge=0, description="Also rescore pairs within this many logits of the N-th best."
    )
    rerank_screen: Screen = _f(
        "auto",
        "reranker",
        description="Fast path's screen of all pairs (the refine stays fp32): int8 (OpenVINO + NNCF "
        "quantized copy), bf16, fp32; auto = int8 when it measures faster than the float screen here.",
    )
    rerank_ir_dir: Path | None = _f(
        None,
        "reranker",
        description="Read-only prebuilt OpenVINO IR cache (the image's, float and int8); the rest is built "
        "under data_dir/models.",
    )
    rerank_long_documents: Aggregation = _f(
        "max",
        "reranker",
        description="Rerank routes: a document longer than the model's window is split into overlapping "
        "windows; its score is the max (or mean) of theirs, or the first window's only (truncation).",
    )
    rerank_max_tokens_per_doc: int = _f(
        4096,
        "reranker",
        "search",  # the ingress's OpenAPI schema states the cap
        ge=1,
        description="Tokens of each document read at most (Cohere's max_tokens_per_doc default and cap).",
    )
    rerank_window_overlap: int = _f(
        64, "reranker", ge=0, description="Tokens shared by consecutive windows of a long document."
    )
    rerank_search_windows: int = _f(
        1,
        "reranker",
        ge=1,
        description="Windows scored per /search candidate (chunks): 1 = the first window (truncation).",
    )
    # fair rerank capacity: a request's pairs go through the batch queue in chunks (a cancellation point each)
    rerank_chunk_pairs: int = _f(
        128,
        "reranker",
        ge=1,
        description="Pairs one request contributes to a batch at most (rerank_chunk_ms sizes chunks below "
        "it); larger requests take turns with the others chunk by chunk, and stop between chunks when "
        "cancelled or past their deadline.",
    )
    rerank_chunk_ms: float = _f(
        250.0,
        "reranker",
        ge=0,
        description="Target compute time of one request's chunk, from the replica's measured pairs/s: a "
        "small request waits at most about this long behind a large one (0: rerank_chunk_pairs only).",
    )
    rerank_max_request_tokens: int = _f(
        1 << 20,
        "reranker",
        ge=1,
        description="Rerank routes: most tokens (all of a request's (query, window) pairs, as the model "
        "reads them) one request may cost; a larger request gets a 422 naming this cap.",
    )
    rerank_instruction: str | None = _f(
        None,
        "reranker",
        description="LLM reranker (reranker=llm): the default instruction (unset: the model's).",
    )
    rerank_cache: bool = _f(True, "reranker", description="Cache rerank scores in each Reranker replica.")
    rerank_cache_entries: int = _f(
        200_000, "reranker", ge=1, description="Score cache bound: entries per Reranker replica."
    )
    rerank_cache_bytes: int = _f(
        64 << 20, "reranker", ge=4096, description="Score cache bound: estimated bytes per Reranker replica."
    )

    cohere_api_key: SecretStr | None = _f(
        None,
        "reranker",
        validation_alias=AliasChoices("cohere_api_key", "CO_API_KEY", "RAG_COHERE_API_KEY"),
        description="Key for RAG_RERANKER=cohere (never logged, never in /info).",
    )
    cohere_base_url: str | None = _f(None, "reranker", description="Cohere API base URL (unset: Cohere's).")
    cohere_model: str = _f("rerank-v3.5", "reranker")
    cohere_timeout_s: float = _f(10.0, "reranker", gt=0)
    cohere_max_retries: int = _f(2, "reranker", ge=0)

    # --- retrieval defaults and limits -----------------------------------------------------------
    fetch_k: int = _f(100, "search", ge=1, description="Default stage-1 candidates.")
    search_mode: SearchMode = _f(
        "hybrid",
        "search",
        description="Default stage-1 mode: dense (pgvector), lexical (BM25 or full-text search) or hybrid "
        "(both, fused by RRF in one SQL statement); chosen on Cranfield (docs/retrieval.md).",
    )
    top_k: int = _f(8, "search", ge=1, description="Default results returned.")
    max_fetch_k: int = _f(
        1000, "search", ge=1, le=1000, description="Upper bound on fetch_k (pgvector caps at 1000)."
    )
    max_query_chars: int = _f(4096, "search", ge=1, description="Longest query (or text) accepted.")
    max_documents: int | None = _f(
        None, "search", ge=1, description="Most documents per rerank request (unset: max_fetch_k)."
    )
    max_embed_inputs: int = _f(64, "search", ge=1, description="Most inputs per embed request.")
    max_body_bytes: int = _f(1 << 20, "search", ge=1024, description="Larger request bodies get a 422.")

    # --- ingest ----------------------------------------------------------------------------------
    chunk_tokens: int = _f(256, local=_CLI, ge=16, le=512, description="Chunk size in embedding tokens.")
    chunk_overlap: int = _f(32, local=_CLI, ge=0, description="Tokens shared by consecutive chunks.")
    ingest_batch_docs: int = _f(64, local=_CLI, ge=1, description="Documents written per transaction.")

    # --- serving ---------------------------------------------------------------------------------
    serve_host: str = _f("127.0.0.1", local=_LAUNCH, description="Address the HTTP proxy binds.")
    serve_port: int = _f(8000, local=_LAUNCH, ge=1, le=65535, description="Port of the HTTP API.")
    metrics_port: int = _f(8080, local=_LAUNCH, ge=1, le=65535, description="Ray's metrics export port.")
    budget_ms: float | None = _f(None, "search", gt=0, description="Default latency budget per /search.")
    strict_rerank: bool = _f(
        False, "search", description="Fail /search when the reranker fails, not degrade."
    )
    request_timeout_s: float = _f(
        30.0,
        "search",
        gt=0,
        description="A request's longest wait for stage 2 unless rerank_timeout_s is set.",
    )
    rerank_timeout_s: float | None = _f(
        None, "search", gt=0, description="Ingress -> Reranker call timeout (unset: request_timeout_s)."
    )
    embed_timeout_s: float = _f(10.0, "search", gt=0, description="Ingress -> Embedder call timeout.")
    retrieve_timeout_s: float = _f(10.0, "search", gt=0, description="Ingress -> Retriever call timeout.")
    ready_timeout_s: float = _f(2.0, "search", gt=0, description="Per-component timeout of GET /readyz.")
    api_keys: SecretStr | None = _f(
        None,
        "search",
        description="Comma-separated API keys. Set: every route but /healthz and /readyz needs "
        "`Authorization: Bearer <key>`. Unset: the service is open (and says so at start-up).",
    )

    # --- the Python client (rag.client) ------------------------------------------------------------
    api_key: SecretStr | None = _f(
        None,
        local=_CLIENT,
        description="The key rag.client.Client / AsyncClient send as `Authorization: Bearer <key>` when "
        "none is passed (one of the service's RAG_API_KEYS).",
    )
    service_url: str | None = _f(
        None,
        local=_CLIENT,
        description="The service rag.client talks to when no URL is passed (unset: "
        "http://<serve_host>:<serve_port>, where `rag serve` listens).",
    )

    @model_validator(mode="after")
    def _served_models(self) -> Settings:
        """rerank_models: unique names, one default, and each entry a valid reranker configuration."""
        check_rerank_models(self.rerank_models)
        if self.rerank_models:
            self.slice("reranker").model_configs()  # each entry's settings, checked now
        return self

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, v: str) -> str:
        return validate_collection_name(v)

    @field_validator("database_url", "database_read_urls")
    @classmethod
    def _empty_url_is_unset(cls, v: str | None) -> str | None:
        return v or None

    @staticmethod
    def in_environment(name: str) -> bool:
        """Whether the field ``name`` is set by this process's environment (``RAG_<NAME>`` or an alias)."""
        info = Settings.model_fields[name]
        names = [f"RAG_{name.upper()}"]
        alias = info.validation_alias
        names += [c for c in getattr(alias, "choices", [alias]) if isinstance(c, str) and c.isupper()]
        return any(os.environ.get(n) for n in names)

    @property
    def pgdata(self) -> Path:
        return (self.data_dir / "pgdata").resolve()

    @property
    def model_cache(self) -> Path:
        return (self.data_dir / "models").resolve()

    @property
    def client_url(self) -> str:
        """Where rag.client connects when no URL is passed: ``service_url``, else the local ``rag serve``."""
        if self.service_url:
            return self.service_url.rstrip("/")
        host = "127.0.0.1" if self.serve_host in ("", "0.0.0.0", "::") else self.serve_host
        return f"http://[{host}]:{self.serve_port}" if ":" in host else f"http://{host}:{self.serve_port}"

    def with_overrides(self, **kw: object) -> Settings:
        """A copy with the non-None keyword arguments applied (CLI flags)."""
        upd = {k: v for k, v in kw.items() if v is not None}
        if not upd:
            return self
        data = {k: getattr(self, k) for k in self.model_fields_set}
        return type(self)(**{**data, **upd})

    @overload
    def slice(self, stage: Literal["embedder"], **override: Any) -> EmbedderConfig: ...
    @overload
    def slice(self, stage: Literal["store"], **override: Any) -> StoreConfig: ...
    @overload
    def slice(self, stage: Literal["reranker"], **override: Any) -> RerankerConfig: ...
    @overload
    def slice(self, stage: Literal["search"], **override: Any) -> SearchConfig: ...
    def slice(self, stage: str, **override: Any) -> StageConfig:
        """The typed configuration of one stage: the fields tagged with it (``override`` replaces some)."""
        from rag.stages import SLICES

        cls = SLICES[stage]
        values = {name: getattr(self, name) for name in cls.model_fields}
        return cls.model_validate({**values, **override})


def field_stages(name: str) -> tuple[str, ...]:
    """The stages a Settings field is tagged with (empty for process-local fields)."""
    extra = Settings.model_fields[name].json_schema_extra or {}
    return tuple(extra.get("stages", ())) if isinstance(extra, dict) else ()


def local_reason(name: str) -> str | None:
    """Why a Settings field is process-local, or None for a stage field."""
    extra = Settings.model_fields[name].json_schema_extra or {}
    return extra.get("local") if isinstance(extra, dict) else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()


def split_urls(urls: str | None) -> list[str]:
    """``"url1, url2"`` -> ``["url1", "url2"]`` (a comma-separated list of URLs; None or blanks: none)."""
    return [u.strip() for u in (urls or "").split(",") if u.strip()]


def redact_url(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db`` (logs, /info, errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


_STAGE_CLASSES = frozenset({"EmbedderConfig", "RerankerConfig", "SearchConfig", "StageConfig", "StoreConfig"})


def __getattr__(name: str) -> Any:
    """The stage configuration classes, importable from here as before: they live in ``rag.stages``, which
    imports this module to build them, so they are looked up on first use rather than imported here."""
    if name in _STAGE_CLASSES:
        import rag.stages

        return getattr(rag.stages, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
