"""What the client's calls return: the service's answers as typed objects.

Hits stay the library's own dicts (``rag.pipeline``'s shape: ``id``, ``content``, ``source``, ``score``,
``dense_score``, ``doc_id``, ``chunk_index``, ``metadata``, and any key the service adds), so code written
against ``rag.pipeline`` reads them unchanged. Every model accepts fields it does not know (a newer service
may send more).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DenseEvent",
    "DoneEvent",
    "Mode",
    "Readiness",
    "RerankResult",
    "RerankedEvent",
    "RerankerStatus",
    "SSEDecoder",
    "SearchAnswer",
    "Span",
    "StreamEvent",
]

Hits = list[dict[str, Any]]
Mode = Literal["dense", "lexical", "hybrid"]  # /search's stage-1 mode (the service validates it)


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class RerankerStatus(_Answer):
    """What stage 2 is, and whether it ran for this request (``reason`` says why not)."""

    model: str | None = None
    backend: str | None = None
    device: str | None = None
    dtype: str | None = None
    trained: bool | None = Field(None, description="False: the offline stand-in; its ranking means nothing.")
    reranked: bool
    reason: str | None = Field(
        None, description="not_requested | disabled | no_candidates | budget | overloaded | reranker_error"
    )
    detail: str | None = None


class SearchAnswer(_Answer):
    """The whole ``POST /search`` answer."""

    query: str
    collection: str
    candidates: int = Field(description="Stage-1 candidates that were (or would have been) reranked.")
    results: Hits = Field(description="The library's hit dicts, best first.")
    timings_ms: dict[str, float | str] = Field(
        description="embed, retrieve, rerank, total (ms); strategy: the stage-1 plan that ran."
    )
    reranker: RerankerStatus


class DenseEvent(_Answer):
    """``/search/stream``'s first event: stage 1's top_k (dense order, ``score == dense_score``)."""

    event: Literal["dense"] = "dense"
    results: Hits
    candidates: int
    timings_ms: dict[str, float | str]


class RerankedEvent(_Answer):
    """The final top_k, and the reranker block (as ``SearchAnswer.reranker``)."""

    event: Literal["reranked"] = "reranked"
    results: Hits
    reranker: RerankerStatus


class DoneEvent(_Answer):
    """The last event: every stage's timings."""

    event: Literal["done"] = "done"
    timings_ms: dict[str, float | str]
    candidates: int


StreamEvent = DenseEvent | RerankedEvent | DoneEvent
STREAM_EVENTS: dict[str, type[DenseEvent] | type[RerankedEvent] | type[DoneEvent]] = {
    "dense": DenseEvent,
    "reranked": RerankedEvent,
    "done": DoneEvent,
}


class Span(_Answer):
    start: int
    end: int


class RerankResult(_Answer):
    """One document of a ``rerank`` answer (best first): ``documents[index]`` scored ``score``."""

    index: int
    score: float = Field(description="Relevance in [0, 1] (the cross-encoder's sigmoid).")
    id: str | int | None = Field(None, description="The document's id, when it was sent as {id, text}.")
    span: Span | None = Field(None, description="When the document was split: the best window's span.")
    windows: int | None = Field(None, description="Windows scored when the document was split.")


class Readiness(_Answer):
    """``GET /readyz``: true when every part answers; ``reason`` and ``components`` say which does not."""

    ready: bool
    reason: str | None = None
    components: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ready


class SSEDecoder:
    """Server-Sent Events, line by line (the WHATWG rules this service's stream uses): ``feed`` each line
    without its newline; a blank line ends an event and ``feed`` returns ``(event, data)``."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            out = (self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return out
        if line.startswith(":"):  # a comment (keep-alive)
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None
