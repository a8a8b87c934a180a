"""The HTTP API (FastAPI; OpenAPI at ``/docs``): one module per dialect, one app over a ``SearchService``.

===============  ==========================================================================================
module           routes
===============  ==========================================================================================
``api.search``   ``POST /search``, ``POST /search/stream`` (SSE), ``GET /healthz``, ``/info``, ``/readyz``
``api.cohere``   ``POST /v2/rerank`` (Cohere v2)
``api.jina``     ``POST /v1/rerank`` (Cohere v1 and Jina, one body)
``api.tei``      ``POST /rerank``, ``POST /embed`` (text-embeddings-inference)
``api.openai``   ``POST /v1/embeddings`` (OpenAI)
``api.errors``   the one exception -> status table and the JSON error body
``api.auth``     API keys and the body bound (ASGI middleware)
===============  ==========================================================================================

Each route parses its request (pydantic), makes one call to the service (which validates, once, with
``rag.validation``), and returns what a builder on its response model makes of the answer. Routes are
module-level functions that take the service as a parameter, so tests can import and call them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI

from deployments._schemas import apply_limits
from deployments._service import SearchService
from deployments.api import cohere, jina, openai, search, tei
from deployments.api.auth import Guard
from deployments.api.errors import ERROR_TABLE, handle

__all__ = ["App", "create_app"]

ROUTERS = (search.router, cohere.router, jina.router, tei.router, openai.router, search.probes)


class App(FastAPI):
    """FastAPI, whose OpenAPI document states the limits this service was configured with."""

    def __init__(self, service: SearchService, **kw: Any) -> None:
        super().__init__(**kw)
        self.state.service = service

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = apply_limits(super().openapi(), self.state.service.config)
        return self.openapi_schema


def create_app(service: SearchService) -> FastAPI:
    """The FastAPI app over ``service`` (a SearchService with real or fake handles)."""
    try:
        ver = version("rag-serve")
    except PackageNotFoundError:
        ver = "0"
    app = App(
        service,
        title="rag-serve",
        version=ver,
        description="Two-stage retrieval: pgvector candidates, cross-encoder rerank. Errors are "
        '`{"error": ..., "error_type": ...}`; 503s carry `Retry-After`.',
    )
    for exc_type, _, _ in ERROR_TABLE:
        app.add_exception_handler(exc_type, handle)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(
        Guard, max_body_bytes=service.config.max_body_bytes, api_keys=service.config.api_key_list()
    )
    return app
