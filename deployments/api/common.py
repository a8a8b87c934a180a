"""What the routes of every dialect share: the service they call, and the rerank routes' documents and usage.

Routes are plain functions with a ``service`` parameter filled by FastAPI (``Service``: the app's
``SearchService``), so a test can import a route and call it with any service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response

from deployments._service import RerankReply, SearchService
from rag.errors import InvalidInput

__all__ = ["Documents", "Service", "get_service", "order", "usage_headers"]


def get_service(request: Request) -> SearchService:
    """The app's service (``create_app`` puts it in ``app.state``)."""
    svc: SearchService = request.app.state.service
    return svc


Service = Annotated[SearchService, Depends(get_service)]


@dataclass(frozen=True)
class Documents:
    """The texts of a rerank request's documents and their ids (None where a document has none)."""

    texts: list[str]
    ids: list[str | int | None]

    @classmethod
    def parse(cls, docs: list[Any], field: str = "text") -> Documents:
        """String or object documents (``{id?, <field>}``); a repeated id is a 422."""
        texts: list[str] = []
        ids: list[str | int | None] = []
        seen: dict[str | int, int] = {}
        for i, d in enumerate(docs):
            if not isinstance(d, dict):
                texts.append(d)
                ids.append(None)
                continue
            text = d.get(field)
            if not isinstance(text, str):
                got = "missing" if text is None else type(text).__name__
                raise InvalidInput(
                    f"documents[{i}] must be a string or an object with a string {field!r} ({got})"
                )
            doc_id = d.get("id")
            if doc_id is not None:
                if not isinstance(doc_id, str | int) or isinstance(doc_id, bool):
                    raise InvalidInput(f"documents[{i}].id must be a string or an integer")
                if doc_id in seen:
                    raise InvalidInput(
                        f"documents[{i}].id {doc_id!r} repeats documents[{seen[doc_id]}].id: ids must be "
                        "unique within a request"
                    )
                seen[doc_id] = i
            texts.append(text)
            ids.append(doc_id)
        return cls(texts, ids)


def order(scores: list[float], top_n: int | None = None) -> list[int]:
    """Document indices, best first, cut to ``top_n`` (None: all)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])[: top_n or len(scores)]


def usage_headers(response: Response, reply: RerankReply) -> None:
    """TEI's usage headers (milliseconds, integers), from the Reranker's measurements: tokens the model
    read, total time in the ingress, time planning windows, waiting for a batch, the batches' model time;
    and pairs scored and answered by the cache."""
    r = reply.result
    if r.usage.tokens is not None:
        response.headers["x-compute-tokens"] = str(r.usage.tokens)
    response.headers["x-total-time"] = str(round(reply.total_ms))
    response.headers["x-tokenization-time"] = str(round(r.timings.tokenize_ms))
    response.headers["x-queue-time"] = str(round(r.timings.queue_ms))
    response.headers["x-inference-time"] = str(round(r.timings.inference_ms))
    response.headers["x-rerank-pairs"] = str(r.usage.pairs)
    response.headers["x-rerank-cache-hits"] = str(r.cache_hits)
