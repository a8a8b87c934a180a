"""The one exception -> HTTP status table, and the JSON error response every route answers with.

Routes raise (``rag.errors`` types, FastAPI's validation errors, Starlette's 404/405); ``ERROR_TABLE`` is the
one place that maps an exception type to an HTTP status, and ``ERRORS`` derives each route's OpenAPI
``responses`` from it, so the spec lists what the service sends. Every row is exercised by
tests/test_serve_errors.py.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import metrics
from deployments._schemas import ErrorBody
from rag.errors import (
    ConfigError,
    InvalidInput,
    ModelError,
    RagError,
    Retryable,
    StoreUnavailable,
    Unauthenticated,
)

__all__ = ["ERRORS", "ERROR_TABLE", "error_response", "handle"]

log = logging.getLogger("ray.serve")


# The one exception -> HTTP status table. First matching row wins (isinstance); the third column says whether
# the response carries Retry-After.
ERROR_TABLE: tuple[tuple[type[Exception], int | None, bool], ...] = (
    (Unauthenticated, 401, False),  # RAG_API_KEYS set, and no or an unknown `Authorization: Bearer` key
    (RequestValidationError, 422, False),  # wrong JSON types, missing fields, non-string documents
    (InvalidInput, 422, False),  # bad values: empty query, k out of range, too many documents, big body,
    #                              unknown collection (CollectionError), wrong dimension (DimensionMismatch)
    (Retryable, 503, True),  # Overloaded (queue full, admission), StageTimeout, StageUnavailable
    (StoreUnavailable, 503, True),  # database unreachable
    (ModelError, 503, True),  # model failure, incl. RerankerError on /v2/rerank, /rerank, strict /search
    (ConfigError, 500, False),  # the server is misconfigured (e.g. cohere backend without a key)
    (StarletteHTTPException, None, False),  # unknown route (404), wrong method (405): their own status
    (Exception, 500, False),  # anything else is a bug
)

# What each status of ERROR_TABLE means to a client. The routes' OpenAPI `responses` are derived from the
# table (status; Retry-After where its third column says so), so the spec lists what the service sends.
_STATUS_TEXT = {
    401: "Missing or unknown API key (only when RAG_API_KEYS is set); carries WWW-Authenticate.",
    422: "Invalid request (malformed JSON included): the message says what to fix.",
    503: "Overloaded, timed out, or a dependency is down; see Retry-After.",
    500: "A bug, or the server is misconfigured (config_error).",
}
_RETRY_AFTER = {"schema": {"type": "integer", "minimum": 1}, "description": "Seconds to wait, then retry."}


def _route_errors() -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for _, status, retry in ERROR_TABLE:
        if status is None or status in out:
            continue
        out[status] = {"model": ErrorBody, "description": _STATUS_TEXT[status]}
        if retry:
            out[status]["headers"] = {"Retry-After": {**_RETRY_AFTER, "required": True}}
        if status == 401:
            out[status]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}}
    return out


ERRORS = _route_errors()


def _as_table_error(exc: BaseException) -> BaseException:
    """FastAPI's own 400 for a body it cannot decode (not UTF-8 JSON text) is malformed JSON like any other:
    an InvalidInput, so the table answers 422 as for `{not json`."""
    if isinstance(exc, StarletteHTTPException) and exc.status_code == 400:
        cause = exc.__cause__
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        return InvalidInput(f"the request body is not valid JSON text{why}: send UTF-8 encoded JSON")
    return exc


def _lookup(exc: BaseException) -> tuple[int, bool]:
    for cls, status, retry in ERROR_TABLE:
        if isinstance(exc, cls):
            if status is None and isinstance(exc, StarletteHTTPException):  # the row of its own status
                return exc.status_code, retry
            return status or 500, retry
    return 500, False


def _error_type(exc: BaseException, status: int) -> str:
    if isinstance(exc, RagError):
        return exc.error_type
    if isinstance(exc, RequestValidationError):
        return "invalid_input"
    if isinstance(exc, StarletteHTTPException):
        return {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    return "internal_error"


def _message(exc: BaseException) -> str:
    if isinstance(exc, RequestValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ())[1:]) or "body"
            got = f" (got {e['input']!r})" if e.get("type") in ("literal_error", "enum") else ""
            parts.append(f"{loc}: {e.get('msg')}{got}")
        return "invalid request: " + "; ".join(parts)
    if isinstance(exc, StarletteHTTPException):
        return str(exc.detail)
    if isinstance(exc, RagError):
        return str(exc)
    return f"internal error ({type(exc).__name__}): this is a bug in the service, please report it"


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON error response for ``exc`` according to ERROR_TABLE."""
    exc = _as_table_error(exc)
    status, retry = _lookup(exc)
    if status >= 500 and not isinstance(exc, RagError):
        log.error("unhandled error", exc_info=exc)
    if not metrics.from_stage(exc) and status >= 500:
        metrics.get("rag_errors_total").inc(tags={"stage": "ingress", "error_type": _error_type(exc, status)})
    headers = None
    if retry:
        after = exc.retry_after_s if isinstance(exc, Retryable) else 1.0
        headers = {"Retry-After": str(max(1, math.ceil(after or 1.0)))}
    if isinstance(exc, Unauthenticated):
        headers = {"WWW-Authenticate": 'Bearer realm="rag-serve"'}
    if isinstance(exc, StarletteHTTPException) and exc.headers:  # 405's Allow (RFC 9110)
        headers = dict(exc.headers)
    body = {"error": _message(exc), "error_type": _error_type(exc, status)}
    return JSONResponse(body, status_code=status, headers=headers)


async def handle(_: Request, exc: Exception) -> JSONResponse:
    """The exception handler of every ERROR_TABLE row."""
    return error_response(exc)
