"""The typed configuration of each stage: what one Serve replica (or the library's part) is given.

``Settings.slice(stage)`` builds one of these from the fields tagged with ``stage``. The classes declare their
fields with types, so callers read ``config.rerank_max_length`` as an ``int`` without casts. Each field's
default, bounds and description are the Settings field's own (``_same``): only the type is written here,
and ``check_slices`` (run when this module is imported, and by tests/test_settings_reach.py) refuses a class
whose fields differ from the fields tagged with its stage, or whose types differ from Settings'. The tag in
rag/settings.py stays the one rule of where a setting goes; this module only spells out its type.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, SecretStr

from rag.settings import (
    STAGES,
    Aggregation,
    Device,
    DType,
    IndexType,
    LexicalIndexKind,
    RerankerBackend,
    RerankModel,
    Runtime,
    Screen,
    SearchMode,
    Settings,
    field_stages,
    pick_rerank_model,
    redact_url,
    split_urls,
)

if TYPE_CHECKING:  # rag.store imports psycopg; the slices stay importable without it
    from rag.store.hybrid import Fusion

__all__ = [
    "SLICES",
    "EmbedderConfig",
    "RerankerConfig",
    "SearchConfig",
    "StageConfig",
    "StoreConfig",
    "check_slices",
]


def _same(name: str) -> Any:
    """The Settings field ``name``'s default, bounds, aliases and description, for a slice's field."""
    return copy.copy(Settings.model_fields[name])


class StageConfig(BaseModel):
    """Base of the per-stage configuration objects: frozen, picklable, secrets redacted in ``public()``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    stage: ClassVar[str] = ""

    def public(self) -> dict[str, Any]:
        """The fields as JSON values with every secret redacted (for /info and logs)."""
        out = self.model_dump(mode="json")
        for name, value in out.items():
            if isinstance(getattr(self, name), SecretStr):
                out[name] = "***" if value else None
            elif name.endswith("_url") and isinstance(value, str):
                out[name] = redact_url(value)
            elif name.endswith("_urls") and isinstance(value, str):
                out[name] = ",".join(redact_url(u) for u in split_urls(value))
        return out

    def kwargs_for(self, fn: Callable[..., Any], prefix: str) -> dict[str, Any]:
        """The keyword arguments of ``fn`` that this configuration sets: parameter ``x`` takes the field
        ``<prefix>x``. A backend's factory is then one line, and a new setting reaches the backend by
        naming its parameter after it (``rerank_foo`` -> ``foo``)."""
        import inspect

        names = inspect.signature(fn).parameters
        return {n: getattr(self, prefix + n) for n in names if prefix + n in type(self).model_fields}


class ModelStage(StageConfig):
    """What every stage that loads a model uses: where models are cached, and whether to go online."""

    data_dir: Path = _same("data_dir")
    offline: bool = _same("offline")

    @property
    def model_cache(self) -> Path:
        return (Path(self.data_dir) / "models").resolve()


class EmbedderConfig(ModelStage):
    """What the Embedder uses of Settings."""

    stage: ClassVar[str] = "embedder"
    embedding_model: str = _same("embedding_model")
    embedding_device: Device = _same("embedding_device")
    embedding_dtype: DType = _same("embedding_dtype")
    embedding_runtime: Runtime = _same("embedding_runtime")
    embedding_threads: int = _same("embedding_threads")
    embed_batch_size: int = _same("embed_batch_size")


class StoreConfig(StageConfig):
    """What the Retriever (and the library's store) uses of Settings."""

    stage: ClassVar[str] = "store"
    database_url: str | None = _same("database_url")
    database_read_urls: str | None = _same("database_read_urls")
    read_replica_max_lag_s: float = _same("read_replica_max_lag_s")
    read_replica_probe_s: float = _same("read_replica_probe_s")
    pool_min_size: int = _same("pool_min_size")
    pool_max_size: int = _same("pool_max_size")
    connect_timeout_s: float = _same("connect_timeout_s")
    hnsw_m: int = _same("hnsw_m")
    hnsw_ef_construction: int = _same("hnsw_ef_construction")
    hnsw_ef_search_min: int = _same("hnsw_ef_search_min")
    hnsw_ef_search_factor: float = _same("hnsw_ef_search_factor")
    index_type: IndexType = _same("index_type")
    binary_rerank_factor: float = _same("binary_rerank_factor")
    lexical_index: LexicalIndexKind = _same("lexical_index")
    text_search_config: str = _same("text_search_config")
    fusion_rrf_k: int = _same("fusion_rrf_k")
    fusion_depth_factor: float = _same("fusion_depth_factor")
    fusion_depth_min: int = _same("fusion_depth_min")
    fusion_dense_weight: float = _same("fusion_dense_weight")
    fusion_lexical_weight: float = _same("fusion_lexical_weight")

    def ef_search_rule(self) -> str:
        return (
            f"ef_search = min(1000, max({self.hnsw_ef_search_min}, k, "
            f"floor(k x {self.hnsw_ef_search_factor:g})))"
        )

    def store_kwargs(self, *, writer: bool = False) -> dict[str, Any]:
        """Keyword arguments of ``rag.store.Store`` (``writer``) or ``AsyncStore`` (search only)."""
        kw: dict[str, Any] = {
            "min_size": self.pool_min_size,
            "max_size": self.pool_max_size,
            "timeout_s": self.connect_timeout_s,
            "ef_search_min": self.hnsw_ef_search_min,
            "ef_search_factor": self.hnsw_ef_search_factor,
            "binary_rerank_factor": self.binary_rerank_factor,
            "fusion": self.fusion(),
        }
        if writer:
            kw.update(
                hnsw_m=self.hnsw_m,
                hnsw_ef_construction=self.hnsw_ef_construction,
                index_type=self.index_type,
                lexical_index=self.lexical_index,
                text_search_config=self.text_search_config,
            )
        return kw

    def read_urls(self) -> list[str]:
        """The read replicas' URLs (``database_read_urls``; empty: every search goes to the primary)."""
        return split_urls(self.database_read_urls)

    def fusion(self) -> Fusion:
        """The hybrid fusion settings as ``rag.store.hybrid.Fusion``."""
        from rag.store.hybrid import Fusion

        return Fusion(
            k=self.fusion_rrf_k,
            dense_weight=self.fusion_dense_weight,
            lexical_weight=self.fusion_lexical_weight,
            depth_factor=self.fusion_depth_factor,
            depth_min=self.fusion_depth_min,
        )


class RerankerConfig(ModelStage):
    """What the Reranker (the rerank engine and its backend) uses of Settings."""

    stage: ClassVar[str] = "reranker"
    reranker: RerankerBackend = _same("reranker")
    rerank_models: list[RerankModel] = _same("rerank_models")
    rerank_models_per_replica: int = _same("rerank_models_per_replica")
    rerank_model: str = _same("rerank_model")
    rerank_device: Device = _same("rerank_device")
    rerank_dtype: DType = _same("rerank_dtype")
    rerank_batch_size: int = _same("rerank_batch_size")
    rerank_max_length: int = _same("rerank_max_length")
    rerank_token_budget: int = _same("rerank_token_budget")
    rerank_threads: int = _same("rerank_threads")
    rerank_runtime: Runtime = _same("rerank_runtime")
    rerank_refine_top: int = _same("rerank_refine_top")
    rerank_refine_margin: float = _same("rerank_refine_margin")
    rerank_screen: Screen = _same("rerank_screen")
    rerank_ir_dir: Path | None = _same("rerank_ir_dir")
    rerank_long_documents: Aggregation = _same("rerank_long_documents")
    rerank_max_tokens_per_doc: int = _same("rerank_max_tokens_per_doc")
    rerank_window_overlap: int = _same("rerank_window_overlap")
    rerank_search_windows: int = _same("rerank_search_windows")
    rerank_chunk_pairs: int = _same("rerank_chunk_pairs")
    rerank_chunk_ms: float = _same("rerank_chunk_ms")
    rerank_max_request_tokens: int = _same("rerank_max_request_tokens")
    rerank_instruction: str | None = _same("rerank_instruction")
    rerank_cache: bool = _same("rerank_cache")
    rerank_cache_entries: int = _same("rerank_cache_entries")
    rerank_cache_bytes: int = _same("rerank_cache_bytes")
    cohere_api_key: SecretStr | None = _same("cohere_api_key")
    cohere_base_url: str | None = _same("cohere_base_url")
    cohere_model: str = _same("cohere_model")
    cohere_timeout_s: float = _same("cohere_timeout_s")
    cohere_max_retries: int = _same("cohere_max_retries")

    def served_models(self) -> list[RerankModel]:
        """The served rerank models: ``rerank_models``, or else the one model these settings describe (the
        default, named after its model; requests' model names are then ignored)."""
        if self.rerank_models:
            return list(self.rerank_models)
        name = {"cohere": self.cohere_model, "none": "none"}.get(self.reranker, self.rerank_model)
        # not validated: a local path is a fine name here, since nobody routes by it
        return [RerankModel.model_construct(name=name, backend=self.reranker, default=True)]

    @property
    def default_model(self) -> str:
        """The name of the model a request without one gets."""
        models = self.served_models()
        return next((m.name for m in models if m.default), models[0].name)

    def model_configs(self) -> dict[str, RerankerConfig]:
        """Each served model's own configuration: these settings with its entry's overrides."""
        return {m.name: self.for_model(m) for m in self.served_models()}

    def for_model(self, entry: RerankModel) -> RerankerConfig:
        """This configuration with ``entry``'s settings applied (what ``make_reranker`` gets for it)."""
        over = entry.overrides()
        fields = type(self).model_fields
        unknown = sorted(set(over) - set(fields))
        if unknown:
            known = sorted(n for n in fields if n.startswith(("rerank_", "cohere_")) and n != "rerank_models")
            raise ValueError(
                f"rerank model {entry.name!r}: {unknown} are not reranker settings; its settings may set "
                f"{known}"
            )
        try:
            return type(self).model_validate({**self.model_dump(), **over, "rerank_models": []})
        except ValueError as e:  # pydantic's ValidationError: say which entry
            raise ValueError(f"rerank model {entry.name!r}: {e}") from None


class SearchConfig(StageConfig):
    """What the Ingress (and the library's search policy) uses of Settings."""

    stage: ClassVar[str] = "search"
    collection: str = _same("collection")
    reranker: RerankerBackend = _same("reranker")
    rerank_max_tokens_per_doc: int = _same("rerank_max_tokens_per_doc")
    rerank_models: list[RerankModel] = _same("rerank_models")
    fetch_k: int = _same("fetch_k")
    search_mode: SearchMode = _same("search_mode")
    top_k: int = _same("top_k")
    max_fetch_k: int = _same("max_fetch_k")
    max_query_chars: int = _same("max_query_chars")
    max_documents: int | None = _same("max_documents")
    max_embed_inputs: int = _same("max_embed_inputs")
    max_body_bytes: int = _same("max_body_bytes")
    budget_ms: float | None = _same("budget_ms")
    strict_rerank: bool = _same("strict_rerank")
    request_timeout_s: float = _same("request_timeout_s")
    rerank_timeout_s: float | None = _same("rerank_timeout_s")
    embed_timeout_s: float = _same("embed_timeout_s")
    retrieve_timeout_s: float = _same("retrieve_timeout_s")
    ready_timeout_s: float = _same("ready_timeout_s")
    api_keys: SecretStr | None = _same("api_keys")

    def pick_model(self, name: str | None) -> str:
        """The served model a request's ``name`` selects ("" when ``rerank_models`` is unset: the Reranker's
        one model); an unknown name is a 422 listing the served names."""
        return pick_rerank_model(self.rerank_models, name)

    @property
    def takes_instructions(self) -> bool:
        """Whether any served model reads an instruction (the llm backend); the others answer 422."""
        backends = [m.backend for m in self.rerank_models] or [self.reranker]
        return "llm" in backends

    def api_key_list(self) -> list[str]:
        """The configured API keys (empty: authentication is off)."""
        keys = self.api_keys
        return [k.strip() for k in keys.get_secret_value().split(",") if k.strip()] if keys else []

    @property
    def rerank_wait_s(self) -> float:
        """How long the ingress waits for the Reranker."""
        return float(self.rerank_timeout_s or self.request_timeout_s)

    @property
    def documents_limit(self) -> int:
        return int(self.max_documents or self.max_fetch_k)


SLICES: dict[str, type[StageConfig]] = {
    "embedder": EmbedderConfig,
    "store": StoreConfig,
    "reranker": RerankerConfig,
    "search": SearchConfig,
}


def check_slices() -> None:
    """Each slice class holds exactly the Settings fields tagged with its stage, with Settings' types."""
    problems = []
    for stage in STAGES:
        cls = SLICES[stage]
        tagged = {n for n in Settings.model_fields if stage in field_stages(n)}
        have = set(cls.model_fields)
        if tagged - have:
            problems.append(f"{cls.__name__} lacks {sorted(tagged - have)} (tagged {stage!r} in Settings)")
        if have - tagged:
            problems.append(f"{cls.__name__} has {sorted(have - tagged)}, not tagged {stage!r} in Settings")
        for name in have & tagged:
            want, got = Settings.model_fields[name].annotation, cls.model_fields[name].annotation
            if got != want:
                problems.append(f"{cls.__name__}.{name} is {got}, Settings.{name} is {want}")
    if problems:
        raise TypeError(
            "rag/stages.py disagrees with the stage tags in rag/settings.py: "
            + "; ".join(problems)
            + ". Declare each tagged field in its stage's class with Settings' type (= _same(name))."
        )


check_slices()
