"""The two-stage pipeline as a plain library: ``retrieve`` and ``retrieve_and_rerank``.

    >>> from rag.pipeline import retrieve_and_rerank
    >>> hits = retrieve_and_rerank("how do I parse a date?", fetch_k=100, top_k=8)
    >>> hits[0]["id"], hits[0]["source"], hits[0]["score"], hits[0]["dense_score"]

Each hit is a dict with at least ``id``, ``content``, ``source``, ``score`` (rerank score; the dense score
when stage 2 did not run) and ``dense_score`` (cosine similarity from stage 1).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rag.errors import InvalidInput
from rag.rerank import Reranker, make_reranker, rank
from rag.settings import Settings, get_settings

if TYPE_CHECKING:
    from rag.embed import Embedder
    from rag.store import Store

__all__ = [
    "Pipeline",
    "SearchResult",
    "default_pipeline",
    "retrieve",
    "retrieve_and_rerank",
    "validate_query",
    "validate_search",
]


def validate_query(query: object) -> str:
    if not isinstance(query, str) or not query.strip():
        raise InvalidInput("query must be a non-empty string (got an empty or whitespace-only query)")
    return query


def validate_search(query: object, fetch_k: object, top_k: object, max_fetch_k: int) -> None:
    """Check a search request; raises InvalidInput naming the value and the allowed range."""
    validate_query(query)
    if not isinstance(fetch_k, int) or isinstance(fetch_k, bool) or fetch_k < 1:
        raise InvalidInput(f"fetch_k must be a positive integer, got {fetch_k!r}")
    if fetch_k > max_fetch_k:
        raise InvalidInput(f"fetch_k={fetch_k} is above the maximum {max_fetch_k} (RAG_MAX_FETCH_K)")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise InvalidInput(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_k > fetch_k:
        raise InvalidInput(f"top_k={top_k} is larger than fetch_k={fetch_k}: ask for top_k <= fetch_k")


@dataclass
class SearchResult:
    hits: list[dict]
    timings_ms: dict[str, float]
    reranker: dict[str, Any]
    reranked: bool
    reason: str | None = None
    candidates: list[dict] = field(default_factory=list)


class Pipeline:
    """Embedder + store + reranker, each created on first use from ``settings`` unless given."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        embedder: Embedder | None = None,
        store: Store | None = None,
        reranker: Reranker | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self._embedder = embedder
        self._store = store
        self._reranker = reranker
        self._lock = threading.Lock()

    # -- lazily built parts -----------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                from rag.embed import Embedder

                s = self.settings
                self._embedder = Embedder(
                    s.embedding_model,
                    device=s.embedding_device,
                    dtype=s.embedding_dtype,
                    batch_size=s.embed_batch_size,
                    offline=s.offline,
                )
            return self._embedder

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                from rag.db import database_url
                from rag.store import Store

                s = self.settings
                self._store = Store(
                    database_url(s),
                    min_size=s.pool_min_size,
                    max_size=s.pool_max_size,
                    timeout_s=s.connect_timeout_s,
                    ef_search_min=s.hnsw_ef_search_min,
                    ef_search_factor=s.hnsw_ef_search_factor,
                    hnsw_m=s.hnsw_m,
                    hnsw_ef_construction=s.hnsw_ef_construction,
                )
            return self._store

    @property
    def reranker(self) -> Reranker:
        with self._lock:
            if self._reranker is None:
                self._reranker = make_reranker(self.settings)
            return self._reranker

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- stages ----------------------------------------------------------------------------------
    def retrieve(self, query: str, k: int = 8, *, collection: str | None = None) -> list[dict]:
        """Stage 1 only: the ``k`` nearest chunks, ``score == dense_score``."""
        validate_search(query, k, 1, self.settings.max_fetch_k)
        vec = self.embedder.embed_query(query)
        hits = self.store.search(collection or self.settings.collection, vec, k)
        return [{**h, "score": h["dense_score"]} for h in hits]

    def search(
        self,
        query: str,
        *,
        fetch_k: int | None = None,
        top_k: int | None = None,
        rerank: bool = True,
        collection: str | None = None,
    ) -> SearchResult:
        """Both stages, with per-stage timings and what the reranker was."""
        s = self.settings
        fetch_k = s.fetch_k if fetch_k is None else fetch_k
        top_k = s.top_k if top_k is None else top_k
        validate_search(query, fetch_k, top_k, s.max_fetch_k)
        coll = collection or s.collection
        self.store.collection_dim(coll)  # an unknown collection fails before any model loads
        t0 = time.perf_counter()
        vec = self.embedder.embed_query(query)
        t1 = time.perf_counter()
        candidates = self.store.search(coll, vec, fetch_k)
        t2 = time.perf_counter()
        reranker = self.reranker
        timings = {"embed": (t1 - t0) * 1e3, "retrieve": (t2 - t1) * 1e3, "rerank": 0.0}
        if not rerank or not reranker.enabled:
            hits = [{**c, "score": c["dense_score"]} for c in candidates[:top_k]]
            reason = "disabled" if not reranker.enabled else "not_requested"
            timings["total"] = (time.perf_counter() - t0) * 1e3
            return SearchResult(hits, timings, reranker.info(), False, reason, candidates)
        scores = reranker.score([(query, c["content"]) for c in candidates])
        hits = rank(candidates, scores, top_k)
        t3 = time.perf_counter()
        timings["rerank"] = (t3 - t2) * 1e3
        timings["total"] = (t3 - t0) * 1e3
        return SearchResult(hits, timings, reranker.info(), True, None, candidates)

    def retrieve_and_rerank(
        self, query: str, *, fetch_k: int = 100, top_k: int = 8, collection: str | None = None
    ) -> list[dict]:
        """Fetch ``fetch_k`` candidates from pgvector, rerank them, return the best ``top_k``."""
        return self.search(query, fetch_k=fetch_k, top_k=top_k, collection=collection).hits


_default: Pipeline | None = None
_default_lock = threading.Lock()


def default_pipeline() -> Pipeline:
    """The process-wide pipeline built from the environment's settings (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Pipeline(get_settings())
        return _default


def retrieve(query: str, k: int = 8, *, collection: str | None = None) -> list[dict]:
    """Stage 1 only with the default pipeline."""
    return default_pipeline().retrieve(query, k, collection=collection)


def retrieve_and_rerank(
    query: str, *, fetch_k: int = 100, top_k: int = 8, collection: str | None = None
) -> list[dict]:
    """Both stages with the default pipeline: ``fetch_k`` dense candidates, reranked, best ``top_k``."""
    return default_pipeline().retrieve_and_rerank(query, fetch_k=fetch_k, top_k=top_k, collection=collection)
