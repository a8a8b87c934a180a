"""What ``rag.eval`` evaluates: the library in this process, or a running service over HTTP.

Both answer one question per query: *given this query, mode and depth, what were stage 1's candidates and
what did stage 2 make of them?* as a ``rag.search.SearchResult``. The harness (``rag.eval.evaluate``) only
reads those, so the same metrics, report and chart come from either target, and a platform team measures what
it actually deployed (``rag eval --url``).

- ``local_target(pipeline)``: ``Pipeline.search``, the library's policy. Each query is embedded on its own,
  as ``/search`` embeds it (the Embedder runs ``embed_queries([query])``): the same vectors, so the same
  candidates, in both targets.
- ``service_target(client)``: ``POST /search/stream`` per query. Its ``dense`` event is stage 1's top_k in
  stage 1's order, and the harness asks for ``top_k == fetch_k``, so that event is every candidate; the
  ``reranked`` event is the reranked order, the ``done`` event the timings (``strategy`` included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from rag.errors import RagError
from rag.search import SearchResult

if TYPE_CHECKING:
    from rag.client import Client
    from rag.client.types import Mode
    from rag.pipeline import Pipeline

__all__ = ["EvalTarget", "SearchFn", "local_target", "service_target"]

# what a replica's /info adds to the model's own description (its configuration, batching knobs)
_REPLICA_KEYS = ("config", "user_config", "max_concurrent_batches", "admit_fraction")

# (query, k, rerank, collection, mode) -> both stages' result: fetch_k = top_k = k
SearchFn = Callable[[str, int, bool, str, str], SearchResult]


@dataclass(frozen=True)
class EvalTarget:
    """One system under evaluation: how to search it, and what it is (for the report)."""

    search: SearchFn
    where: str  # "in-process" or the service's URL
    embedder: dict[str, Any]  # the embedding model's description
    reranker: dict[str, Any] | None  # None: this target does not rerank (disabled)
    default_collection: str  # what a search without a collection searches


def local_target(pipeline: Pipeline) -> EvalTarget:
    """The library in this process (``Pipeline.search``)."""

    def search(query: str, k: int, rerank: bool, collection: str, mode: str) -> SearchResult:
        return pipeline.search(query, fetch_k=k, top_k=k, rerank=rerank, collection=collection, mode=mode)

    enabled = pipeline.reranker.enabled
    return EvalTarget(
        search,
        "in-process",
        pipeline.embedder.info(),
        pipeline.reranker.info() if enabled else None,
        pipeline.config.collection,
    )


def service_target(client: Client) -> EvalTarget:
    """A running service (``rag.client.Client``): one ``/search/stream`` call per query. Raises the
    ``rag.errors`` type of whatever the service answers instead (``StageUnavailable``: nothing listens)."""
    from rag.client import DenseEvent, DoneEvent, RerankedEvent

    stages = client.info()["stages"]
    about: dict[str, dict[str, Any]] = {}
    for stage in ("embedder", "reranker"):
        got = stages.get(stage) or {"error": "not in /info"}
        if "error" in got:
            raise RagError(f"{client.url}: GET /info has no {stage}: {got['error']}; is the service ready?")
        about[stage] = {k: v for k, v in got.items() if k not in _REPLICA_KEYS}
    enabled = about["reranker"].get("backend", "none") != "none"

    def search(query: str, k: int, rerank: bool, collection: str, mode: str) -> SearchResult:
        dense: DenseEvent | None = None
        reranked: RerankedEvent | None = None
        done: DoneEvent | None = None
        events = client.search_stream(
            query, fetch_k=k, top_k=k, rerank=rerank, collection=collection, mode=cast("Mode", mode)
        )
        for ev in events:
            if isinstance(ev, DenseEvent):
                dense = ev
            elif isinstance(ev, RerankedEvent):
                reranked = ev
            else:
                done = ev
        if dense is None or reranked is None or done is None:
            raise RagError(f"{client.url}: /search/stream ended before its done event (query {query!r})")
        if dense.candidates > len(dense.results):
            raise RagError(
                f"{client.url}: the dense event holds {len(dense.results)} of {dense.candidates} candidates; "
                "this harness needs a service that sends stage 1's top_k (top_k = fetch_k)"
            )
        timings = {n: float(v) for n, v in done.timings_ms.items() if not isinstance(v, str)}
        strategy = done.timings_ms.get("strategy")
        status = reranked.reranker
        return SearchResult(
            hits=list(reranked.results),
            candidates=list(dense.results),
            timings_ms=timings,
            reranked=status.reranked,
            reason=status.reason,
            detail=status.detail,
            strategy=strategy if isinstance(strategy, str) else None,
            reranker=status.model_dump(),
        )

    default = str(stages.get("search", {}).get("config", {}).get("collection", "default"))
    return EvalTarget(search, client.url, about["embedder"], about["reranker"] if enabled else None, default)
