"""Each API call's request and the reading of its answer, shared by ``Client`` and ``AsyncClient``.

Nothing here is validated twice: the service checks every value (and its 422 names the fix); the client
only leaves out what the caller did not set, so the service's defaults apply (and a field the service does
not have yet, like ``mode`` before hybrid search, is never sent unless asked for).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx

from rag.client._errors import error_for_body
from rag.client._retry import Call
from rag.client.types import STREAM_EVENTS, Readiness, RerankResult, SearchAnswer, StreamEvent

__all__ = [
    "INFO",
    "READY",
    "embed",
    "read_embed",
    "read_ready",
    "read_rerank",
    "read_search",
    "rerank",
    "search",
    "stream_event",
]

# Every route this client calls is read-only on the service, so every call is idempotent and retried
# (rag/client/_retry.py says on what). /readyz is not retried: a probe reports the present.
INFO = Call("GET", "/info")
READY = Call("GET", "/readyz", retry=False, answers=frozenset({503}))


def search(
    query: str,
    *,
    fetch_k: int | None = None,
    top_k: int | None = None,
    rerank: bool = True,
    budget_ms: float | None = None,
    collection: str | None = None,
    filter: dict[str, Any] | None = None,
    mode: str | None = None,
    rerank_model: str | None = None,
    instruction: str | None = None,
    stream: bool = False,
) -> Call:
    """``POST /search`` (or ``/search/stream``); unset values are left to the service's defaults."""
    body: dict[str, Any] = {"query": query, "rerank": rerank}
    optional = {
        "fetch_k": fetch_k,
        "top_k": top_k,
        "budget_ms": budget_ms,
        "collection": collection,
        "filter": filter,
        "mode": mode,
        "rerank_model": rerank_model,
        "instruction": instruction,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return Call("POST", "/search/stream" if stream else "/search", body, stream=stream)


def rerank(
    query: str,
    documents: Sequence[str | dict[str, Any]],
    *,
    top_n: int | None = None,
    max_tokens_per_doc: int | None = None,
    model: str | None = None,
    instruction: str | None = None,
) -> Call:
    """``POST /v2/rerank`` (Cohere v2's shape): documents are strings or ``{"id", "text"}`` objects;
    ``model`` a served rerank model (unset: the default)."""
    body: dict[str, Any] = {"query": query, "documents": list(documents)}
    if model is not None:
        body["model"] = model
    if instruction is not None:
        body["instruction"] = instruction
    if top_n is not None:
        body["top_n"] = top_n
    if max_tokens_per_doc is not None:
        body["max_tokens_per_doc"] = max_tokens_per_doc
    return Call("POST", "/v2/rerank", body)


def embed(texts: str | Sequence[str]) -> Call:
    """``POST /embed`` (TEI's shape): one vector per text."""
    return Call("POST", "/embed", {"inputs": [texts] if isinstance(texts, str) else list(texts)})


def read_search(response: httpx.Response) -> SearchAnswer:
    return SearchAnswer.model_validate(response.json())


def read_rerank(response: httpx.Response) -> list[RerankResult]:
    return [
        RerankResult.model_validate({**r, "score": r["relevance_score"]}) for r in response.json()["results"]
    ]


def read_embed(response: httpx.Response) -> list[list[float]]:
    return [[float(x) for x in v] for v in response.json()]


def read_ready(response: httpx.Response) -> Readiness:
    body = response.json()
    body = body if isinstance(body, dict) else {}
    ok = response.status_code == 200 and body.get("ready") is True
    parts = {k: v for k, v in body.items() if isinstance(v, dict)}
    return Readiness(ready=ok, reason=None if ok else body.get("error"), components=parts)


def stream_event(name: str, data: str) -> StreamEvent | None:
    """One Server-Sent Event as its typed object; an ``error`` event raises its ``rag.errors`` type; an event
    this client does not know is skipped (None)."""
    if name == "error":
        raise error_for_body(None, json.loads(data))
    cls = STREAM_EVENTS.get(name)
    return cls.model_validate(json.loads(data)) if cls is not None else None
