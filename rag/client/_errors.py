"""The service's error answers back to the ``rag.errors`` types: the exception a caller catches in-process.

The service answers every error with ``{"error": <what to fix>, "error_type": <kind>}`` and each
``rag.errors`` type carries its ``error_type``, so the table from kind to type is *derived* from
``rag.errors`` (a new error type maps back with no edit here). Where two types share a kind, the subclass
wins (``StageUnavailable`` over ``Retryable``: both ``unavailable``). An answer without our body (a proxy's
page, Ray's own plain-text 503 when the ingress's queue is full) falls back on its status; anything else is
a ``ServiceError`` that keeps the status and the kind (a 500 ``internal_error`` is a bug in the service).

Transport failures become ``rag.errors`` types too: no connection is ``StageUnavailable``, no answer in time
``StageTimeout`` (both ``Retryable``, as in-process).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from rag import errors
from rag.errors import (
    InvalidInput,
    Overloaded,
    RagError,
    Retryable,
    ServiceError,
    StageTimeout,
    StageUnavailable,
    Unauthenticated,
)

__all__ = ["ERROR_TYPES", "error_for_body", "error_for_response", "error_for_transport"]


def _error_types() -> dict[str, type[RagError]]:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, RagError)]
    table: dict[str, type[RagError]] = {}
    for cls in sorted(classes, key=lambda c: len(c.__mro__)):  # bases first: a subclass overrides its base
        table[cls.error_type] = cls
    return table


ERROR_TYPES: dict[str, type[RagError]] = _error_types()

# Only for answers that lack our error body (not from our ingress): what their status means.
_BY_STATUS: dict[int, type[RagError]] = {
    401: Unauthenticated,
    413: InvalidInput,  # a proxy's body limit
    422: InvalidInput,
    429: Overloaded,  # a rate limit in front of the service
    503: Overloaded,  # Ray Serve's proxy: the ingress's queue is full (plain text, Retry-After: 1)
}
_KEY_HINT = " (rag.client: pass api_key=..., or set RAG_API_KEY)"


def error_for_body(status: int | None, body: Any, retry_after: float | None = None) -> RagError:
    """The exception for an error body (``{"error", "error_type"}``, or anything else) of ``status``."""
    kind = body.get("error_type") if isinstance(body, dict) else None
    message = body.get("error") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message:
        text = body if isinstance(body, str) else json.dumps(body) if body is not None else ""
        message = f"HTTP {status}: {text.strip()[:500] or 'no details'}"
    cls = ERROR_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        cls = _BY_STATUS.get(status, ServiceError) if status is not None else ServiceError
    if cls is Unauthenticated:
        message += _KEY_HINT
    err: RagError = cls(message, retry_after or 1.0) if issubclass(cls, Retryable) else cls(message)
    err.status_code = status
    if isinstance(kind, str) and kind != err.error_type:
        err.error_type = kind  # a kind with no type of its own (not_found, internal_error, ...)
    return err


def error_for_response(
    status: int, headers: Mapping[str, str], content: bytes, retry_after: float | None = None
) -> RagError:
    """The exception for an HTTP error answer."""
    body: Any
    try:
        body = json.loads(content) if content else None
    except ValueError:
        body = content.decode("utf-8", "replace")
    return error_for_body(status, body, retry_after)


def error_for_transport(err: httpx.TransportError, base_url: str, timeout_s: float) -> RagError:
    """The exception for a request that got no answer."""
    what = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    if isinstance(err, httpx.ConnectError | httpx.ConnectTimeout):
        return StageUnavailable(
            f"cannot connect to the service at {base_url} ({what}): is it running (`rag serve`), and is "
            "the URL right?"
        )
    if isinstance(err, httpx.TimeoutException):
        return StageTimeout(
            f"the service at {base_url} did not answer within {timeout_s:.3g}s ({what}): pass a larger "
            "timeout_s, or a budget_ms for /search"
        )
    return StageUnavailable(f"the connection to the service at {base_url} failed ({what})")
