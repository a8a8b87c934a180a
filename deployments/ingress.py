"""Ingress deployment: the HTTP API (FastAPI, OpenAPI at ``/docs``) over the Embedder, Retriever and Reranker.

Routes: ``POST /search``, ``POST /search/stream`` (SSE), ``POST /v2/rerank`` (Cohere v2; ``/v1/rerank`` for
Cohere v1 and Jina clients), ``POST /rerank`` (TEI), ``POST /embed`` (TEI), ``POST /v1/embeddings`` (OpenAI),
``GET /healthz``, ``GET /readyz``, ``GET /info`` (the effective configuration of every stage).

Errors: routes raise; ``ERROR_TABLE`` below is the one place that maps an exception type to an HTTP status.
"""

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import metrics
from deployments._schemas import (
    CohereRerankRequest,
    CohereRerankResponse,
    CohereV1RerankRequest,
    EmbedRequest,
    ErrorBody,
    OpenAIEmbeddingsRequest,
    OpenAIEmbeddingsResponse,
    SearchRequest,
    SearchResponse,
    TEIRank,
    TEIRerankRequest,
    V1RerankResponse,
    apply_limits,
)
from deployments._service import SearchService, logit
from rag.errors import (
    BodyTooLarge,
    ConfigError,
    InvalidInput,
    ModelError,
    RagError,
    Retryable,
    StoreUnavailable,
    Unauthenticated,
)
from rag.search import Dense
from rag.settings import SearchConfig

__all__ = ["ERROR_TABLE", "Ingress", "create_app", "error_response"]

log = logging.getLogger("ray.serve")


# The one exception -> HTTP status table. First matching row wins (isinstance); the third column says whether
# the response carries Retry-After. Every row is exercised by tests/test_serve_errors.py.
ERROR_TABLE: tuple[tuple[type[BaseException], int | None, bool], ...] = (
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

_KNOWN_ROUTES = frozenset(
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


_ERRORS = _route_errors()


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
            return (status if status is not None else exc.status_code), retry  # type: ignore[attr-defined]
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
            parts.append(f"{loc}: {e.get('msg')}")
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
    if not getattr(exc, "rag_stage", None) and status >= 500:
        metrics.get("rag_errors_total").inc(tags={"stage": "ingress", "error_type": _error_type(exc, status)})
    headers = None
    if retry:
        headers = {"Retry-After": str(max(1, math.ceil(getattr(exc, "retry_after_s", 1.0) or 1.0)))}
    if isinstance(exc, Unauthenticated):
        headers = {"WWW-Authenticate": 'Bearer realm="rag-serve"'}
    if isinstance(exc, StarletteHTTPException) and exc.headers:  # 405's Allow (RFC 9110)
        headers = dict(exc.headers)
    body = {"error": _message(exc), "error_type": _error_type(exc, status)}
    return JSONResponse(body, status_code=status, headers=headers)


async def _handle(_: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


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


class _Guard:
    """ASGI middleware: API keys (401), the body bound (422 past ``max_body_bytes``), request counts."""

    def __init__(self, app: Any, max_body_bytes: int, api_keys: list[str]) -> None:
        self.app, self.max_body_bytes, self.api_keys = app, max_body_bytes, api_keys

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in _KNOWN_ROUTES else "other"
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


def _usage_headers(response: Response, out: dict[str, Any]) -> None:
    """TEI's usage headers (milliseconds, integers), from the Reranker's measurements: tokens the model
    read, total time in the ingress, time waiting for a batch, the batch's model time; and cache hits."""
    if out.get("tokens") is not None:
        response.headers["x-compute-tokens"] = str(int(out["tokens"]))
    response.headers["x-total-time"] = str(round(out.get("total_ms", 0.0)))
    response.headers["x-tokenization-time"] = str(round(out.get("tokenize_ms", 0.0)))
    response.headers["x-queue-time"] = str(round(out.get("queue_ms", 0.0)))
    response.headers["x-inference-time"] = str(round(out.get("inference_ms", 0.0)))
    response.headers["x-rerank-pairs"] = str(int(out.get("pairs") or 0))
    response.headers["x-rerank-cache-hits"] = str(int(out.get("cache_hits") or 0))


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


def create_app(service: SearchService) -> FastAPI:
    """The FastAPI app over ``service`` (a SearchService with real or fake handles)."""
    try:
        from importlib.metadata import version

        ver = version("rag-serve")
    except Exception:
        ver = "0"
    app = FastAPI(
        title="rag-serve",
        version=ver,
        description="Two-stage retrieval: pgvector candidates, cross-encoder rerank. Errors are "
        '`{"error": ..., "error_type": ...}`; 503s carry `Retry-After`.',
    )
    for exc_type, _, _ in ERROR_TABLE:
        app.add_exception_handler(exc_type, _handle)
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:  # FastAPI's document, with the limits this service was configured with
        if app.openapi_schema is None:
            app.openapi_schema = apply_limits(generate_openapi(), service.config)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(
        _Guard, max_body_bytes=service.config.max_body_bytes, api_keys=service.config.api_key_list()
    )

    def _request(req: SearchRequest) -> Any:
        return service.search_request(
            query=req.query,
            fetch_k=req.fetch_k,
            top_k=req.top_k,
            rerank=req.rerank,
            budget_ms=req.budget_ms,
            collection=req.collection,
            filter=req.filter,
        )

    @app.post("/search", response_model=SearchResponse, responses=_ERRORS)
    async def search(req: SearchRequest) -> dict[str, Any]:
        """Both stages: `fetch_k` dense candidates, reranked, best `top_k`; per-stage timings."""
        return await service.search(_request(req))

    @app.post("/search/stream", responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS})
    async def search_stream(req: SearchRequest) -> StreamingResponse:
        """Server-Sent Events: `dense` (stage-1 top_k) as soon as it is known, `reranked`, then `done`."""
        r = _request(req)
        dense: asyncio.Future[Dense] = asyncio.get_running_loop().create_future()

        async def on_dense(d: Dense) -> None:
            dense.set_result(d)

        task = asyncio.create_task(service.search(r, on_dense))
        await asyncio.wait({task, dense}, return_when=asyncio.FIRST_COMPLETED)
        if not dense.done():  # stage 1 failed: the error gets its proper status, before any event
            dense.cancel()
            return task.result()  # raises
        d = dense.result()

        async def events() -> AsyncIterator[str]:
            timings = {k: round(v, 3) for k, v in d.timings_ms.items() if k != "rerank"}
            try:
                yield _sse("dense", {"results": d.hits, "candidates": d.candidates, "timings_ms": timings})
                try:
                    out = await task
                except Exception as e:  # strict_rerank: report in-band, the status line is already sent
                    resp = error_response(e)
                    yield _sse("error", json.loads(bytes(resp.body)))
                    return
                yield _sse("reranked", {"results": out["results"], "reranker": out["reranker"]})
                yield _sse("done", {"timings_ms": out["timings_ms"], "candidates": out["candidates"]})
            finally:
                if not task.done():  # the client went away: stop waiting for stage 2
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v2/rerank", response_model=CohereRerankResponse, response_model_exclude_none=True,
              responses=_ERRORS)  # fmt: skip
    async def cohere_rerank_v2(req: CohereRerankRequest, response: Response) -> dict[str, Any]:
        """Cohere Rerank v2 (`cohere.ClientV2(base_url=...)`, LangChain's CohereRerank). Documents may be
        `{id?, text}` objects; long documents are split (`max_tokens_per_doc`); usage in `meta`, headers."""
        texts, ids = _documents(req.documents)
        out = await _rerank(req.query, texts, req.max_tokens_per_doc, None, response)
        results = _results(out, texts, ids, req.top_n, req.return_documents)
        return {"id": str(uuid.uuid4()), "results": results, "meta": await _meta(out, "2")}

    @app.post("/v1/rerank", response_model=V1RerankResponse, response_model_exclude_none=True,
              responses=_ERRORS)  # fmt: skip
    async def rerank_v1(req: CohereV1RerankRequest, response: Response) -> dict[str, Any]:
        """Cohere Rerank v1 (`cohere.Client`, LlamaIndex's CohereRerank) and Jina Rerank (LlamaIndex's and
        LangChain's JinaRerank, vLLM's shape): one body carries both (`id`, `meta`; `model`, `usage`)."""
        texts, ids = _documents(req.documents, (req.rank_fields or ["text"])[0])
        out = await _rerank(req.query, texts, req.max_tokens_per_doc, None, response)
        return_docs = req.return_documents
        if return_docs is None:  # Jina returns the documents unless told not to; Cohere v1 does not
            return_docs = (req.model or "").lower().startswith("jina")
        results = _results(out, texts, ids, req.top_n, return_docs)
        info = await service.reranker_info()
        return {
            "id": str(uuid.uuid4()),
            "model": req.model or info.get("model"),
            "results": results,
            "meta": await _meta(out, "1"),
            "usage": {"total_tokens": out.get("tokens") or 0, "prompt_tokens": out.get("tokens") or 0},
        }

    def _documents(docs: list[Any], field: str = "text") -> tuple[list[str], list[Any]]:
        """Texts and ids (None where not given) of string or object documents; repeated ids are a 422."""
        texts, ids, seen = [], [], {}
        for i, d in enumerate(docs):
            if isinstance(d, dict):
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
                            f"documents[{i}].id {doc_id!r} repeats documents[{seen[doc_id]}].id: ids must "
                            "be unique within a request"
                        )
                    seen[doc_id] = i
                texts.append(text)
                ids.append(doc_id)
            else:
                texts.append(d)
                ids.append(None)
        return texts, ids

    async def _rerank(
        query: str,
        texts: list[str],
        max_tokens: int | None,
        truncate: bool | None,
        response: Response,
        field: str = "documents",
    ) -> dict[str, Any]:
        out = await service.rerank_documents(
            query, texts, max_tokens_per_doc=max_tokens, truncate=truncate, field=field
        )
        _usage_headers(response, out)
        return out

    def _results(
        out: dict[str, Any], texts: list[str], ids: list[Any], top_n: int | None, return_docs: bool
    ) -> list[dict[str, Any]]:
        limit = service.config.documents_limit
        if top_n is not None and not 1 <= top_n <= limit:
            raise InvalidInput(f"top_n must be between 1 and {limit}, got {top_n}")
        scores = out["scores"]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: top_n or len(scores)]
        results = []
        for i in order:
            r: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if ids[i] is not None:
                r["id"] = ids[i]
            if return_docs:
                r["document"] = {"text": texts[i]}
            if out["spans"][i] is not None:
                r["span"] = {"start": out["spans"][i][0], "end": out["spans"][i][1]}
                r["windows"] = out["windows"][i]
            results.append(r)
        return results

    async def _meta(out: dict[str, Any], version: str) -> dict[str, Any]:
        pairs = int(out.get("pairs") or 0)
        meta: dict[str, Any] = {
            "api_version": {"version": version},
            # Cohere: a search unit is one query over up to 100 documents; split documents count per chunk
            "billed_units": {"search_units": max(1, -(-pairs // 100))},
        }
        if out.get("tokens") is not None:
            meta["tokens"] = {"input_tokens": int(out["tokens"]), "output_tokens": 0}
        info = await service.reranker_info()
        if info.get("trained") is False:
            meta["warnings"] = [
                f"reranker {info.get('model')} is the offline stand-in: scores are not meaningful"
            ]
        return meta

    @app.post("/rerank", response_model=list[TEIRank], response_model_exclude_none=True, responses=_ERRORS)
    async def tei_rerank(req: TEIRerankRequest, response: Response) -> list[dict[str, Any]]:
        """TEI rerank: `{query, texts}` -> `[{index, score}]`, best first; TEI's usage headers.
        `truncate: false` is TEI's 422 for a text that does not fit; unset, long texts are split."""
        out = await _rerank(req.query, req.texts, req.max_tokens_per_doc, req.truncate, response, "texts")
        scores = out["scores"]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        res = []
        for i in order:
            r: dict[str, Any] = {"index": i, "score": logit(scores[i]) if req.raw_scores else scores[i]}
            if req.return_text:
                r["text"] = req.texts[i]
            if out["spans"][i] is not None:
                r["span"] = {"start": out["spans"][i][0], "end": out["spans"][i][1]}
            res.append(r)
        return res

    @app.post("/embed", response_model=list[list[float]], responses=_ERRORS)
    async def embed(req: EmbedRequest) -> list[list[float]]:
        """TEI embed: `{inputs: str | [str]}` -> one L2-normalised vector per input."""
        texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
        return await service.embed(texts)

    @app.post("/v1/embeddings", response_model=OpenAIEmbeddingsResponse, responses=_ERRORS)
    async def openai_embeddings(req: OpenAIEmbeddingsRequest) -> dict[str, Any]:
        """OpenAI embeddings (`openai.OpenAI(base_url=".../v1").embeddings.create`): `input` a text or a
        list, `encoding_format` float or base64 (little-endian float32); `usage` in embedder tokens."""
        texts = [req.input] if isinstance(req.input, str) else req.input
        vecs, tokens, info = await service.embed_with_usage(texts)
        dim = int(info.get("dim") or (len(vecs[0]) if vecs else 0))
        if req.dimensions is not None and req.dimensions != dim:
            raise InvalidInput(
                f"dimensions={req.dimensions}: the served model {info.get('model')} has {dim} dimensions "
                "and cannot shorten them; leave dimensions out"
            )
        data = []
        for i, v in enumerate(vecs):
            arr = np.asarray(v, dtype="<f4")
            emb: Any = (
                base64.b64encode(arr.tobytes()).decode()
                if req.encoding_format == "base64"
                else [float(x) for x in arr]
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        total = sum(tokens)
        return {
            "object": "list",
            "data": data,
            "model": str(info.get("model") or req.model or ""),
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The ingress process is alive (no dependency checked)."""
        return {"status": "ok"}

    @app.get("/info", responses={401: _ERRORS[401]})
    async def info() -> dict[str, Any]:
        """The effective configuration of every stage as its replica holds it (models, runtime, limits,
        batch knobs, database versions); no secrets."""
        return await service.info()

    @app.get(
        "/readyz", responses={503: {"model": ErrorBody, "description": "Not ready; the reason says why."}}
    )
    async def readyz() -> JSONResponse:
        """Models loaded and the database reachable; else 503 with the reason."""
        ok, detail = await service.ready()
        if ok:
            return JSONResponse({"ready": True, **detail})
        reasons = "; ".join(f"{k}: {v['reason']}" for k, v in detail.items() if not v["ready"])
        return JSONResponse(
            {"error": f"not ready: {reasons}", "error_type": "not_ready", **detail},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    return app


@serve.deployment(name="Ingress", max_ongoing_requests=100, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Ingress:
    """Composes the other deployments through their DeploymentHandles."""

    def __init__(
        self,
        embedder: DeploymentHandle,
        retriever: DeploymentHandle,
        reranker: DeploymentHandle,
        config: SearchConfig,
    ) -> None:
        self.service = SearchService(embedder, retriever, reranker, config)
        metrics.export_zeros()  # the error and skip counters read 0, not "No data", before the first error
        log.info(auth_line(config))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service)
