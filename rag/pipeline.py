"""The two-stage pipeline as a plain library: ``retrieve`` and ``retrieve_and_rerank``.

    >>> from rag.pipeline import retrieve_and_rerank
    >>> hits = retrieve_and_rerank("how do I parse a date?", fetch_k=100, top_k=8)
    >>> hits[0]["id"], hits[0]["source"], hits[0]["score"], hits[0]["dense_score"]

Each hit is a dict with at least ``id``, ``content``, ``source``, ``score`` (rerank score; the stage-1 score
when stage 2 did not run) and ``dense_score`` (cosine similarity from stage 1). ``mode`` picks stage 1:
``dense``, ``lexical`` or ``hybrid`` (default ``RAG_SEARCH_MODE``); the lexical and hybrid modes add
``lexical_rank`` and ``fused_score`` to each hit (``rag.store.hybrid``). The policy (validation, when to
rerank and when to degrade, ranking) is ``rag.search``'s, and stage 2 is ``rag.rerank_engine``'s
(windows, score cache, chunks), the same ones the Serve app runs.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from rag.rerank import RerankBackend, make_reranker
from rag.rerank_engine import RerankEngine, RerankOptions
from rag.search import (
    Embed,
    Rerank,
    Retrieve,
    SearchResult,
    Step,
    dense_hits,
    make_request,
    run_sync,
    two_stage,
)
from rag.settings import Settings, get_settings
from rag.validation import validate_search

if TYPE_CHECKING:
    from rag.embed import Embedder
    from rag.store import Store

__all__ = ["Pipeline", "SearchResult", "default_pipeline", "retrieve", "retrieve_and_rerank"]


class Pipeline:
    """Embedder + store + reranker, each created on first use from ``settings`` unless given."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        embedder: Embedder | None = None,
        store: Store | None = None,
        reranker: RerankBackend | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.config = self.settings.slice("search")
        self._embedder = embedder
        self._store = store
        self._reranker = reranker
        self._engine: RerankEngine | None = None
        self._lock = threading.Lock()

    # -- lazily built parts -----------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                from rag.embed import make_embedder

                self._embedder = make_embedder(self.settings.slice("embedder"))
            return self._embedder

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                from rag.db import database_url
                from rag.store import Store

                cfg = self.settings.slice("store")
                self._store = Store(database_url(self.settings), **cfg.store_kwargs(writer=True))
            return self._store

    @property
    def reranker(self) -> RerankBackend:
        """The rerank backend (built from the settings unless given)."""
        with self._lock:
            if self._reranker is None:
                self._reranker = make_reranker(self.settings.slice("reranker"))
            return self._reranker

    @property
    def engine(self) -> RerankEngine:
        """Stage 2: the rerank engine over ``reranker``, as a Reranker replica runs it."""
        backend = self.reranker
        with self._lock:
            if self._engine is None:
                self._engine = RerankEngine(backend, self.settings.slice("reranker"))
            return self._engine

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- stages ----------------------------------------------------------------------------------
    def _do(self, step: Step) -> Any:
        """Perform one stage call of the policy, in this process."""
        if isinstance(step, Embed):
            return self.embedder.embed_query(step.query)
        if isinstance(step, Retrieve):
            return self.store.search(
                step.collection, step.vector, step.k, filter=step.filter, query=step.query, mode=step.mode
            )
        if isinstance(step, Rerank):  # in-process: no timeout to apply, the call is ours
            return self.engine.rerank_sync(
                step.query, step.documents, RerankOptions(kind="candidates")
            ).scores
        raise TypeError(f"unknown step {step!r}")

    def retrieve(
        self,
        query: str,
        k: int = 8,
        *,
        collection: str | None = None,
        filter: Any = None,
        mode: str | None = None,
    ) -> list[dict]:
        """Stage 1 only: the ``k`` best chunks in ``mode``, ``score`` = the stage-1 score."""
        c = self.config
        validate_search(query, k, 1, max_fetch_k=c.max_fetch_k, max_chars=c.max_query_chars)
        res = self.search(
            query, fetch_k=k, top_k=k, rerank=False, collection=collection, filter=filter, mode=mode
        )
        return dense_hits(res.candidates, k)

    def search(
        self,
        query: str,
        *,
        fetch_k: int | None = None,
        top_k: int | None = None,
        rerank: bool = True,
        collection: str | None = None,
        filter: Any = None,
        budget_ms: float | None = None,
        vector: Any = None,
        mode: str | None = None,
    ) -> SearchResult:
        """Both stages, with per-stage timings, what the reranker was, and why it did not run if not.
        ``mode``: stage 1's (dense, lexical, hybrid; default ``RAG_SEARCH_MODE``)."""
        req = make_request(
            self.config,
            query,
            fetch_k=fetch_k,
            top_k=top_k,
            rerank=rerank,
            budget_ms=budget_ms,
            collection=collection,
            filter=_parse_filter(filter),
            vector=vector,
            mode=mode,
        )
        self.store.collection_dim(req.collection)  # an unknown collection fails before any model loads
        reranker = self.reranker if rerank else None
        enabled = reranker.enabled if reranker is not None else True
        policy = two_stage(
            req, reranker_enabled=enabled, rerank_timeout_s=None, strict=self.settings.strict_rerank
        )
        res = run_sync(policy, self._do)
        res.reranker = reranker.info() if reranker is not None else {}
        return res

    def retrieve_and_rerank(
        self,
        query: str,
        *,
        fetch_k: int = 100,
        top_k: int = 8,
        collection: str | None = None,
        filter: Any = None,
        mode: str | None = None,
    ) -> list[dict]:
        """Fetch ``fetch_k`` candidates (stage 1 in ``mode``), rerank them, return the best ``top_k``."""
        return self.search(
            query, fetch_k=fetch_k, top_k=top_k, collection=collection, filter=filter, mode=mode
        ).hits


def _parse_filter(obj: Any) -> Any:
    """A user filter (dict) -> the store's SearchFilter; None stays None."""
    if obj is None:
        return None
    from rag.store import parse_filter

    return parse_filter(obj)


_default: Pipeline | None = None
_default_lock = threading.Lock()


def default_pipeline() -> Pipeline:
    """The process-wide pipeline built from the environment's settings (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Pipeline(get_settings())
        return _default


def retrieve(
    query: str,
    k: int = 8,
    *,
    collection: str | None = None,
    filter: Any = None,
    mode: str | None = None,
) -> list[dict]:
    """Stage 1 only with the default pipeline."""
    return default_pipeline().retrieve(query, k, collection=collection, filter=filter, mode=mode)


def retrieve_and_rerank(
    query: str,
    *,
    fetch_k: int = 100,
    top_k: int = 8,
    collection: str | None = None,
    filter: Any = None,
    mode: str | None = None,
) -> list[dict]:
    """Both stages with the default pipeline: ``fetch_k`` candidates (stage 1 in ``mode``), reranked, the
    best ``top_k``."""
    return default_pipeline().retrieve_and_rerank(
        query, fetch_k=fetch_k, top_k=top_k, collection=collection, filter=filter, mode=mode
    )
