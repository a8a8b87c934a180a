"""The service over HTTP, with the library's shape: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

    from rag.client import Client                    # in-process: from rag.pipeline import ...
    rag = Client("http://rag.example.internal:8000")  # api_key=... or RAG_API_KEY
    hits = rag.retrieve_and_rerank("how do I parse a date?", fetch_k=100, top_k=8)

``retrieve`` and ``retrieve_and_rerank`` return ``rag.pipeline``'s hit dicts; ``search`` the whole
``/search`` answer; ``search_stream`` its events; ``rerank``, ``embed``, ``info`` and ``ready`` the other
routes. Errors are ``rag.errors`` types, as in-process. Retries: ``RetryPolicy`` (503 / 429 with
``Retry-After``, connections that failed; every call here is read-only, hence safe to repeat).
LangChain and LlamaIndex retrievers over it: ``rag.integrations``.
"""

from rag.client._client import AsyncClient, Client
from rag.client._retry import RetryPolicy
from rag.client.types import (
    DenseEvent,
    DoneEvent,
    Readiness,
    RerankedEvent,
    RerankerStatus,
    RerankResult,
    SearchAnswer,
    StreamEvent,
)

__all__ = [
    "AsyncClient",
    "Client",
    "DenseEvent",
    "DoneEvent",
    "Readiness",
    "RerankResult",
    "RerankedEvent",
    "RerankerStatus",
    "RetryPolicy",
    "SearchAnswer",
    "StreamEvent",
]
