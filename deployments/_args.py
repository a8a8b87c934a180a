"""Typed ``build_app`` arguments and the slice of them that each deployment gets.

Settings flow one way: env / CLI -> ``rag.settings.Settings`` -> ``AppArgs`` -> one slice per deployment.
``AppArgs`` takes its defaults (and its validation) from ``Settings``, so ``serve run serve_config.yaml``
works with only ``RAG_DATABASE_URL`` set; deployments get plain pydantic slices and never read ``os.environ``.

The batching knobs are not here: they are ``user_config`` (``EmbedderUserConfig``, ``RerankerUserConfig``) so
they change through ``reconfigure()`` without restarting replicas.
"""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from rag.settings import Device, DType, RerankerBackend, Settings

__all__ = [
    "AppArgs",
    "EmbedderArgs",
    "EmbedderUserConfig",
    "IngressArgs",
    "RerankerArgs",
    "RerankerUserConfig",
    "RetrieverArgs",
]

# AppArgs fields that mirror a Settings field of the same name (default and validation come from Settings).
FROM_SETTINGS = (
    "database_url",
    "data_dir",
    "collection",
    "pool_min_size",
    "pool_max_size",
    "connect_timeout_s",
    "hnsw_ef_search_min",
    "offline",
    "embedding_model",
    "embedding_device",
    "embedding_dtype",
    "embed_batch_size",
    "reranker",
    "rerank_model",
    "rerank_device",
    "rerank_dtype",
    "rerank_batch_size",
    "rerank_max_length",
    "rerank_token_budget",
    "rerank_threads",
    "cohere_api_key",
    "cohere_base_url",
    "cohere_model",
    "cohere_timeout_s",
    "cohere_max_retries",
    "fetch_k",
    "top_k",
    "max_fetch_k",
    "budget_ms",
    "strict_rerank",
    "request_timeout_s",
)


class _Slice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbedderArgs(_Slice):
    model: str
    device: Device = "auto"
    dtype: DType = "auto"
    batch_size: int = 64
    offline: bool = False


class RetrieverArgs(_Slice):
    database_url: str
    pool_min_size: int = 1
    pool_max_size: int = 8
    connect_timeout_s: float = 5.0
    ef_search_min: int = 40


class RerankerArgs(_Slice):
    backend: RerankerBackend = "cross-encoder"
    model: str
    model_cache: Path
    device: Device = "auto"
    dtype: DType = "auto"
    max_length: int = 512
    batch_size: int = 32
    token_budget: int = 8192
    threads: int = 0
    offline: bool = False
    cohere_api_key: SecretStr | None = None
    cohere_base_url: str | None = None
    cohere_model: str = "rerank-v3.5"
    cohere_timeout_s: float = 10.0
    cohere_max_retries: int = 2

    def build(self):  # -> rag.rerank.Reranker; loads the model
        from rag import rerank

        if self.backend == "none":
            return rerank.NoReranker()
        if self.backend == "cohere":
            key = self.cohere_api_key.get_secret_value() if self.cohere_api_key else None
            return rerank.CohereReranker(
                api_key=key,
                model=self.cohere_model,
                base_url=self.cohere_base_url,
                timeout_s=self.cohere_timeout_s,
                max_retries=self.cohere_max_retries,
            )
        return rerank.CrossEncoderReranker(
            self.model,
            cache_dir=self.model_cache,
            device=self.device,
            dtype=self.dtype,
            max_length=self.max_length,
            batch_size=self.batch_size,
            token_budget=self.token_budget,
            threads=self.threads,
            offline=self.offline,
        )


class IngressArgs(_Slice):
    collection: str = "default"
    fetch_k: int = 100
    top_k: int = 8
    max_fetch_k: int = 1000
    budget_ms: float | None = None
    strict_rerank: bool = False
    embed_timeout_s: float = 10.0
    retrieve_timeout_s: float = 10.0
    rerank_timeout_s: float = 30.0
    ready_timeout_s: float = 2.0
    max_body_bytes: int = 1 << 20
    max_documents: int = 1000
    max_query_chars: int = 4096
    max_embed_inputs: int = 64


class AppArgs(BaseModel):
    """``build_app``'s arguments: the ``args:`` of a Serve config. Unset fields come from ``Settings``."""

    model_config = ConfigDict(extra="forbid")

    # Mirrors of Settings (see FROM_SETTINGS); filled and validated by Settings in _through_settings.
    database_url: str | None = Field(None, description="PostgreSQL URL; unset: the running embedded server.")
    data_dir: Path = Path(".rag")
    collection: str = "default"
    pool_min_size: int = 1
    pool_max_size: int = 8
    connect_timeout_s: float = 5.0
    hnsw_ef_search_min: int = 40
    offline: bool = False
    embedding_model: str = ""
    embedding_device: Device = "auto"
    embedding_dtype: DType = "auto"
    embed_batch_size: int = 64
    reranker: RerankerBackend = "cross-encoder"
    rerank_model: str = ""
    rerank_device: Device = "auto"
    rerank_dtype: DType = "auto"
    rerank_batch_size: int = 32
    rerank_max_length: int = 512
    rerank_token_budget: int = 8192
    rerank_threads: int = 0
    cohere_api_key: SecretStr | None = None
    cohere_base_url: str | None = None
    cohere_model: str = "rerank-v3.5"
    cohere_timeout_s: float = 10.0
    cohere_max_retries: int = 2
    fetch_k: int = 100
    top_k: int = 8
    max_fetch_k: int = 1000
    budget_ms: float | None = None
    strict_rerank: bool = False
    request_timeout_s: float = 30.0

    # Serving only (not in Settings).
    embed_timeout_s: float = Field(10.0, gt=0, description="Ingress -> Embedder handle-call timeout.")
    retrieve_timeout_s: float = Field(10.0, gt=0, description="Ingress -> Retriever handle-call timeout.")
    rerank_timeout_s: float | None = Field(
        None, gt=0, description="Ingress -> Reranker handle-call timeout (unset: request_timeout_s)."
    )
    ready_timeout_s: float = Field(2.0, gt=0, description="Per-component timeout of GET /readyz.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get a 422.")
    max_documents: int | None = Field(
        None, ge=1, description="Most documents per /v2/rerank or /rerank request (unset: max_fetch_k)."
    )
    max_query_chars: int = Field(4096, ge=1, description="Longest query accepted.")
    max_embed_inputs: int = Field(64, ge=1, description="Most inputs per POST /embed.")

    @model_validator(mode="before")
    @classmethod
    def _through_settings(cls, data: Any) -> Any:
        """Fill unset Settings mirrors from ``Settings`` (env + defaults) and validate set ones with it."""
        if isinstance(data, AppArgs):
            return data
        data = dict(data or {})
        given = {k: data[k] for k in FROM_SETTINGS if k in data}
        s = Settings(**given)
        for k in FROM_SETTINGS:
            data[k] = getattr(s, k)
        data["data_dir"] = Path(s.data_dir).expanduser().resolve()
        return data

    @classmethod
    def from_settings(cls, settings: Settings, **extra: Any) -> "AppArgs":
        """AppArgs from an existing Settings object (CLI flags applied), plus serving-only fields."""
        return cls.model_validate({**{k: getattr(settings, k) for k in FROM_SETTINGS}, **extra})

    def explicit(self) -> dict[str, Any]:
        """The non-secret fields, as plain JSON values (for a Serve config's ``args:``)."""
        out = self.model_dump(mode="json", exclude={"cohere_api_key"})
        return out

    # -- slices ------------------------------------------------------------------------------------
    def embedder_args(self) -> EmbedderArgs:
        return EmbedderArgs(
            model=self.embedding_model,
            device=self.embedding_device,
            dtype=self.embedding_dtype,
            batch_size=self.embed_batch_size,
            offline=self.offline,
        )

    def retriever_args(self, database_url: str) -> RetrieverArgs:
        return RetrieverArgs(
            database_url=database_url,
            pool_min_size=self.pool_min_size,
            pool_max_size=self.pool_max_size,
            connect_timeout_s=self.connect_timeout_s,
            ef_search_min=self.hnsw_ef_search_min,
        )

    def reranker_args(self) -> RerankerArgs:
        return RerankerArgs(
            backend=self.reranker,
            model=self.rerank_model,
            model_cache=(self.data_dir / "models").resolve(),
            device=self.rerank_device,
            dtype=self.rerank_dtype,
            max_length=self.rerank_max_length,
            batch_size=self.rerank_batch_size,
            token_budget=self.rerank_token_budget,
            threads=self.rerank_threads,
            offline=self.offline,
            cohere_api_key=self.cohere_api_key,
            cohere_base_url=self.cohere_base_url,
            cohere_model=self.cohere_model,
            cohere_timeout_s=self.cohere_timeout_s,
            cohere_max_retries=self.cohere_max_retries,
        )

    def ingress_args(self) -> IngressArgs:
        return IngressArgs(
            collection=self.collection,
            fetch_k=self.fetch_k,
            top_k=self.top_k,
            max_fetch_k=self.max_fetch_k,
            budget_ms=self.budget_ms,
            strict_rerank=self.strict_rerank,
            embed_timeout_s=self.embed_timeout_s,
            retrieve_timeout_s=self.retrieve_timeout_s,
            rerank_timeout_s=self.rerank_timeout_s or self.request_timeout_s,
            ready_timeout_s=self.ready_timeout_s,
            max_body_bytes=self.max_body_bytes,
            max_documents=self.max_documents or self.max_fetch_k,
            max_query_chars=self.max_query_chars,
            max_embed_inputs=self.max_embed_inputs,
        )


class EmbedderUserConfig(BaseModel):
    """``user_config`` of the Embedder deployment (applied by ``reconfigure()``, no restart)."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(32, ge=1, description="Queries per forward pass.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits to fill.")


class RerankerUserConfig(BaseModel):
    """``user_config`` of the Reranker deployment (applied by ``reconfigure()``, no restart)."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(16, ge=1, description="Requests merged into one batch (one forward pass).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill.")
    max_pairs_per_batch: int = Field(
        1600, ge=1, description="Cap on (query, document) pairs per batch: bounds memory on a GPU fraction."
    )
    inject_failure: bool = Field(False, description="Chaos/testing: every batch raises RerankerError.")
    inject_delay_ms: float = Field(0.0, ge=0, description="Chaos/testing: extra latency per batch.")
