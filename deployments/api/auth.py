"""API keys and the request body bound: the ASGI middleware in front of every route.

``Authorization: Bearer <key>`` (what the Cohere, OpenAI and Jina clients send) with one of RAG_API_KEYS,
compared in constant time; ``/healthz`` and ``/readyz`` stay open for probes; no key configured means open,
and ``auth_line`` says so at start-up. A body larger than RAG_MAX_BODY_BYTES is a 422 before it is parsed.
The middleware also counts every request by route and status (``rag_requests_total``).
"""

from __future__ import annotations

import hmac
from typing import Any

from deployments import metrics
from deployments.api.errors import error_response
from rag.errors import BodyTooLarge, Unauthenticated
from rag.stages import SearchConfig

__all__ = ["KNOWN_ROUTES", "OPEN_ROUTES", "Guard", "auth_line", "key_matches"]

KNOWN_ROUTES = frozenset(
    {
        "/search",
        "/search/stream",
        "/v2/rerank",
        "/v1/rerank",
        "/rerank",
        "/embed",
        "/v1/embeddings",
        "/healthz",
        "/readyz",
        "/info",
        "/docs",
        "/openapi.json",
    }
)
OPEN_ROUTES = frozenset({"/healthz", "/readyz"})  # probes work without a key
# What each status of ERROR_TABLE means to a client. The routes' OpenAPI `responses` are derived from the


def _bearer(scope: dict) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme is case-insensitive)."""
    for k, v in scope.get("headers", []):
        if k == b"authorization":
            scheme, _, token = v.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def key_matches(token: str | None, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit on a match)."""
    if token is None:
        return False
    given = token.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found


class Guard:
    """ASGI middleware: API keys (401), the body bound (422 past ``max_body_bytes``), request counts."""

    def __init__(self, app: Any, max_body_bytes: int, api_keys: list[str]) -> None:
        self.app, self.max_body_bytes, self.api_keys = app, max_body_bytes, api_keys

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in KNOWN_ROUTES else "other"
        status = {"code": 500}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_keys and path not in OPEN_ROUTES and not key_matches(_bearer(scope), self.api_keys):
                metrics.get("rag_auth_failures_total").inc(tags={"route": route})
                await error_response(
                    Unauthenticated(
                        "missing or unknown API key: send `Authorization: Bearer <key>` with one of the "
                        "service's keys (RAG_API_KEYS)"
                    )
                )(scope, receive, counting_send)
                return None
            body = await self._read_body(scope, receive)
            if body is None:
                limit = self.max_body_bytes
                await error_response(
                    BodyTooLarge(
                        f"request body is larger than {limit} bytes: send fewer or shorter documents"
                    )
                )(scope, receive, counting_send)
                return None
            sent = False

            async def replay() -> dict:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, counting_send)
        finally:
            metrics.get("rag_requests_total").inc(tags={"route": route, "status": str(status["code"])})

    async def _read_body(self, scope: dict, receive: Any) -> bytes | None:
        """The whole body, or None as soon as it is known to exceed the limit."""
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.max_body_bytes:
                return None
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            more = msg.get("more_body", False)
        return b"".join(chunks)


def auth_line(config: SearchConfig) -> str:
    """The one start-up line that says whether the API needs a key."""
    n = len(config.api_key_list())
    if n:
        return f"authentication: on ({n} API key{'s' if n > 1 else ''}; /healthz and /readyz stay open)"
    return "authentication: OFF (RAG_API_KEYS unset): every route is open to anyone who can reach the port"
