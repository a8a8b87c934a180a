"""The one Settings object. This is the only module that reads environment variables.

Every knob has the prefix ``RAG_`` (``RAG_DATABASE_URL``, ``RAG_RERANKER``, ...). The Cohere key is also read
from ``CO_API_KEY``, the variable Cohere's own SDK uses.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_EMBEDDING_MODEL", "DEFAULT_RERANK_MODEL", "Settings", "get_settings"]

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_RERANK_MODEL = "cross-encoder/ms-marco-MiniLM-L-6-v2"

RerankerBackend = Literal["cross-encoder", "cohere", "none"]
Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Runtime = Literal["auto", "torch", "openvino"]


class Settings(BaseSettings):
    """Configuration for the library, the CLI and the Serve app (env prefix ``RAG_``)."""

    model_config = SettingsConfigDict(env_prefix="RAG_", extra="ignore", populate_by_name=True)

    # --- storage -------------------------------------------------------------------------------
    database_url: str | None = Field(
        None, description="PostgreSQL URL with pgvector. Unset: the embedded server in data_dir/pgdata."
    )
    data_dir: Path = Field(Path(".rag"), description="Project-local state: embedded database, model cache.")
    collection: str = Field("default", description="Collection that ingest/query/serve/eval use.")
    pool_min_size: int = Field(1, ge=0)
    pool_max_size: int = Field(8, ge=1)
    connect_timeout_s: float = Field(5.0, gt=0)
    hnsw_m: int = Field(16, ge=2, le=100)
    hnsw_ef_construction: int = Field(64, ge=4, le=1000)
    hnsw_ef_search_min: int = Field(
        40, ge=1, le=1000, description="ef_search floor; a query of k uses max(this, k * factor)."
    )
    hnsw_ef_search_factor: float = Field(
        1.5, ge=1.0, le=10.0, description="ef_search = k x this: the recall margin over k (1.0 = exactly k)."
    )

    # --- models --------------------------------------------------------------------------------
    offline: bool = Field(
        False,
        validation_alias=AliasChoices("RAG_OFFLINE", "HF_HUB_OFFLINE"),
        description="Never contact the Hugging Face hub (also honours HF_HUB_OFFLINE).",
    )
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    embedding_device: Device = "auto"
    embedding_dtype: DType = "auto"
    embed_batch_size: int = Field(64, ge=1)

    reranker: RerankerBackend = "cross-encoder"
    rerank_model: str = DEFAULT_RERANK_MODEL
    rerank_device: Device = "auto"
    rerank_dtype: DType = "auto"
    rerank_batch_size: int = Field(32, ge=1, description="Pairs per forward pass (fp32 reference path).")
    rerank_max_length: int = Field(512, ge=8, le=512)
    rerank_token_budget: int = Field(
        8192, ge=512, description="Fast path: padded tokens per forward pass (batch x longest pair)."
    )
    rerank_threads: int = Field(0, ge=0, description="torch threads for reranking; 0 = the CPUs we may use.")
    rerank_runtime: Runtime = Field(
        "auto", description="Fast-path runtime: openvino (CPU), torch, or auto (openvino when installed)."
    )
    rerank_refine_top: int = Field(
        8, ge=0, description="Fast path: rescore each query's best N pairs in fp32 after bf16/fp16 (0: off)."
    )
    rerank_refine_margin: float = Field(
        0.1, ge=0, description="Also rescore pairs within this many logits of the N-th best (then adaptive)."
    )

    cohere_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("CO_API_KEY", "RAG_COHERE_API_KEY")
    )
    cohere_base_url: str | None = Field(None, description="Cohere API base URL (unset: Cohere's own).")
    cohere_model: str = "rerank-v3.5"
    cohere_timeout_s: float = Field(10.0, gt=0)
    cohere_max_retries: int = Field(2, ge=0)

    # --- retrieval defaults ----------------------------------------------------------------------
    fetch_k: int = Field(100, ge=1)
    top_k: int = Field(8, ge=1)
    max_fetch_k: int = Field(
        1000, ge=1, le=1000, description="Upper bound on fetch_k (pgvector caps at 1000)."
    )

    # --- ingest ----------------------------------------------------------------------------------
    chunk_tokens: int = Field(256, ge=16, le=512, description="Chunk size in embedding-model tokens.")
    chunk_overlap: int = Field(32, ge=0, description="Tokens shared by consecutive chunks.")
    ingest_batch_docs: int = Field(64, ge=1, description="Documents written per transaction.")

    # --- serving ---------------------------------------------------------------------------------
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(8000, ge=1, le=65535)
    metrics_port: int = Field(8080, ge=1, le=65535)
    budget_ms: float | None = Field(None, gt=0, description="Default latency budget per /search request.")
    strict_rerank: bool = Field(False, description="Fail /search when the reranker fails, not degrade.")
    request_timeout_s: float = Field(30.0, gt=0)

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, v: str) -> str:
        from rag.errors import validate_collection_name

        return validate_collection_name(v)

    @field_validator("database_url")
    @classmethod
    def _empty_url_is_unset(cls, v: str | None) -> str | None:
        return v or None

    @property
    def pgdata(self) -> Path:
        return (self.data_dir / "pgdata").resolve()

    @property
    def model_cache(self) -> Path:
        return (self.data_dir / "models").resolve()

    def with_overrides(self, **kw: object) -> Settings:
        """A copy with the non-None keyword arguments applied (CLI flags)."""
        upd = {k: v for k, v in kw.items() if v is not None}
        return self.model_validate({**self.model_dump(), **upd}) if upd else self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
