"""``Client`` and ``AsyncClient``: the library's API over HTTP. They differ only by ``await``.

Both build each call's request with ``rag.client._calls``, run it through the one retry policy of
``rag.client._retry`` (a generator; a blocking and an awaitable driver) and read the answer the same way.
Each holds one ``httpx`` connection pool, reused by every call; a ``Client`` may be shared by threads (it
keeps no per-call state; httpx's pool is thread-safe), an ``AsyncClient`` by the tasks of one event loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import httpx

from rag.client import _calls
from rag.client._errors import error_for_transport
from rag.client._retry import Call, RetryPolicy, Sleep, Step, exchange, run_async, run_sync
from rag.client.types import Mode, Readiness, RerankResult, SearchAnswer, SSEDecoder, StreamEvent
from rag.errors import ConfigError, StageTimeout, StageUnavailable

__all__ = ["AsyncClient", "Client"]

Filter = dict[str, Any]


def _user_agent() -> str:
    try:
        return f"rag-serve-client/{version('rag-serve')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
        return "rag-serve-client"


class _Base:
    """What both clients share: where, who, how long, how often."""

    def __init__(
        self, url: str | None, api_key: str | None, timeout_s: float, retry: RetryPolicy | None
    ) -> None:
        if url is None or api_key is None:
            from rag.settings import get_settings

            s = get_settings()
            url = s.client_url if url is None else url
            if api_key is None and s.api_key is not None:
                api_key = s.api_key.get_secret_value()
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(
                f"service URL {url!r}: use http://host:port or https://host (e.g. the ingress's)"
            )
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        self.url = str(url).rstrip("/")
        self.timeout_s = float(timeout_s)
        self.retry = retry or RetryPolicy()
        self._api_key = api_key or ""  # resolved: "" sends none
        self._headers = {"user-agent": _user_agent()}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._rng = random.Random()

    def _twin(self) -> dict[str, Any]:
        return {"api_key": self._api_key, "timeout_s": self.timeout_s, "retry": self.retry}

    def _policy(self, call: Call) -> Any:
        return exchange(call, self.retry, self.timeout_s, base_url=self.url, uniform=self._rng.uniform)

    def __repr__(self) -> str:  # never the key
        auth = "with an API key" if "authorization" in self._headers else "no API key"
        return f"{type(self).__name__}({self.url!r}, {auth})"


class Client(_Base):
    """The service over HTTP, with the library's shape (``rag.pipeline``): switching is an import change.

        >>> from rag.client import Client
        >>> with Client("http://127.0.0.1:8000") as rag:
        ...     hits = rag.retrieve_and_rerank("how do I parse a date?", fetch_k=100, top_k=8)

    ``url`` defaults to ``RAG_SERVICE_URL``, else the local ``rag serve`` (``RAG_SERVE_HOST``:``PORT``);
    ``api_key`` to ``RAG_API_KEY`` (sent as ``Authorization: Bearer``; ``""`` sends none). ``timeout_s``
    bounds each try, ``retry`` the retries and the whole call. Errors are the ``rag.errors`` types the
    library raises in-process. ``limits`` sizes the connection pool (httpx's default: 100 connections, 20
    kept alive); ``transport`` replaces httpx's (e.g. ``httpx.MockTransport`` in tests).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        limits: httpx.Limits | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout_s, retry)
        kw: dict[str, Any] = {"limits": limits} if limits is not None else {}
        self._http = httpx.Client(base_url=self.url, headers=self._headers, transport=transport, **kw)

    def _do(self, step: Step) -> httpx.Response | None:
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        call = step.call
        request = self._http.build_request(call.method, call.path, json=call.json, timeout=step.timeout_s)
        response = self._http.send(request, stream=call.stream)
        if call.stream and not response.is_success:  # the policy reads an error's body
            try:
                response.read()
            finally:
                response.close()
        return response

    def _call(self, call: Call) -> httpx.Response:
        return run_sync(self._policy(call), self._do)

    # -- the library's API ------------------------------------------------------------------------
    def search(
        self,
        query: str,
        *,
        fetch_k: int | None = None,
        top_k: int | None = None,
        rerank: bool = True,
        budget_ms: float | None = None,
        collection: str | None = None,
        filter: Filter | None = None,
        mode: Mode | None = None,
        rerank_model: str | None = None,
        instruction: str | None = None,
    ) -> SearchAnswer:
        """``POST /search``: both stages, the timings, and whether (and why not) stage 2 ran. Unset values
        take the service's defaults; ``mode`` (dense | lexical | hybrid) is sent only when given."""
        call = _calls.search(query, fetch_k=fetch_k, top_k=top_k, rerank=rerank, budget_ms=budget_ms,
                             collection=collection, filter=filter, mode=mode, rerank_model=rerank_model,
                             instruction=instruction)  # fmt: skip
        return _calls.read_search(self._call(call))

    def retrieve_and_rerank(
        self,
        query: str,
        *,
        fetch_k: int = 100,
        top_k: int = 8,
        collection: str | None = None,
        filter: Filter | None = None,
        budget_ms: float | None = None,
        mode: Mode | None = None,
        rerank_model: str | None = None,
        instruction: str | None = None,
    ) -> list[dict[str, Any]]:
        """``rag.pipeline.retrieve_and_rerank`` over HTTP: ``fetch_k`` candidates, reranked, the best
        ``top_k``."""
        return self.search(query, fetch_k=fetch_k, top_k=top_k, collection=collection, filter=filter,
                           budget_ms=budget_ms, mode=mode, rerank_model=rerank_model,
                           instruction=instruction).results  # fmt: skip

    def retrieve(
        self,
        query: str,
        k: int = 8,
        *,
        collection: str | None = None,
        filter: Filter | None = None,
        mode: Mode | None = None,
    ) -> list[dict[str, Any]]:
        """``rag.pipeline.retrieve`` over HTTP: stage 1 alone, ``score == dense_score``."""
        return self.search(query, fetch_k=k, top_k=k, rerank=False, collection=collection, filter=filter,
                           mode=mode).results  # fmt: skip

    def search_stream(
        self,
        query: str,
        *,
        fetch_k: int | None = None,
        top_k: int | None = None,
        rerank: bool = True,
        budget_ms: float | None = None,
        collection: str | None = None,
        filter: Filter | None = None,
        mode: Mode | None = None,
        rerank_model: str | None = None,
        instruction: str | None = None,
    ) -> Iterator[StreamEvent]:
        """``POST /search/stream``: a ``DenseEvent`` as soon as stage 1 is done, a ``RerankedEvent``, a
        ``DoneEvent``. The request goes out at the first ``next()``; it is retried only until the stream
        starts. Breaking out of the loop closes the connection."""
        call = _calls.search(query, fetch_k=fetch_k, top_k=top_k, rerank=rerank, budget_ms=budget_ms,
                             collection=collection, filter=filter, mode=mode, rerank_model=rerank_model,
                             instruction=instruction, stream=True)  # fmt: skip
        response = self._call(call)
        decoder = SSEDecoder()
        try:
            for line in response.iter_lines():
                if (raw := decoder.feed(line)) is not None and (ev := _calls.stream_event(*raw)) is not None:
                    yield ev
        except httpx.TransportError as e:
            raise error_for_transport(e, self.url, self.timeout_s) from e
        finally:
            response.close()

    def rerank(
        self,
        query: str,
        documents: Sequence[str | dict[str, Any]],
        *,
        top_n: int | None = None,
        max_tokens_per_doc: int | None = None,
        model: str | None = None,
        instruction: str | None = None,
    ) -> list[RerankResult]:
        """Score ``documents`` (strings or ``{"id", "text"}``) against ``query``; best first, ``top_n`` of
        them. Long documents are split into windows (``max_tokens_per_doc``); ``span`` says which won."""
        call = _calls.rerank(query, documents, top_n=top_n, max_tokens_per_doc=max_tokens_per_doc,
                             model=model, instruction=instruction)  # fmt: skip
        return _calls.read_rerank(self._call(call))

    def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """The query embeddings of ``texts`` (one text or several): L2-normalised vectors."""
        return _calls.read_embed(self._call(_calls.embed(texts)))

    def info(self) -> dict[str, Any]:
        """``GET /info``: the effective configuration of every stage (models, runtime, limits, versions)."""
        return self._call(_calls.INFO).json()

    def ready(self) -> Readiness:
        """``GET /readyz`` once (no retry): truthy when every part answers; unreachable is not ready."""
        try:
            return _calls.read_ready(self._call(_calls.READY))
        except (StageUnavailable, StageTimeout) as e:
            return Readiness(ready=False, reason=str(e))

    # -- lifecycle --------------------------------------------------------------------------------
    def to_async(self) -> AsyncClient:
        """An ``AsyncClient`` for the same service, key, timeout and retry policy (its own pool)."""
        return AsyncClient(self.url, **self._twin())

    def close(self) -> None:
        """Close the connection pool (the client cannot be used after)."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """``Client`` for asyncio: the same methods, awaited; ``search_stream`` is an async iterator.

    >>> async with AsyncClient("http://127.0.0.1:8000") as rag:
    ...     hits = await rag.retrieve_and_rerank("how do I parse a date?")
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: httpx.Limits | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout_s, retry)
        kw: dict[str, Any] = {"limits": limits} if limits is not None else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers, transport=transport, **kw)

    async def _do(self, step: Step) -> httpx.Response | None:
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        call = step.call
        request = self._http.build_request(call.method, call.path, json=call.json, timeout=step.timeout_s)
        response = await self._http.send(request, stream=call.stream)
        if call.stream and not response.is_success:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def _call(self, call: Call) -> httpx.Response:
        return await run_async(self._policy(call), self._do)

    async def search(
        self,
        query: str,
        *,
        fetch_k: int | None = None,
        top_k: int | None = None,
        rerank: bool = True,
        budget_ms: float | None = None,
        collection: str | None = None,
        filter: Filter | None = None,
        mode: Mode | None = None,
        rerank_model: str | None = None,
        instruction: str | None = None,
    ) -> SearchAnswer:
        """See ``Client.search``."""
        call = _calls.search(query, fetch_k=fetch_k, top_k=top_k, rerank=rerank, budget_ms=budget_ms,
                             collection=collection, filter=filter, mode=mode, rerank_model=rerank_model,
                             instruction=instruction)  # fmt: skip
        return _calls.read_search(await self._call(call))

    async def retrieve_and_rerank(
        self,
        query: str,
        *,
        fetch_k: int = 100,
        top_k: int = 8,
        collection: str | None = None,
        filter: Filter | None = None,
        budget_ms: float | None = None,
        mode: Mode | None = None,
        rerank_model: str | None = None,
        instruction: str | None = None,
    ) -> list[dict[str, Any]]:
        """See ``Client.retrieve_and_rerank``."""
        return (await self.search(query, fetch_k=fetch_k, top_k=top_k, collection=collection, filter=filter,
                                  budget_ms=budget_ms, mode=mode, rerank_model=rerank_model,
                                  instruction=instruction)).results  # fmt: skip

    async def retrieve(
        self,
        query: str,
        k: int = 8,
        *,
        collection: str | None = None,
        filter: Filter | None = None,
        mode: Mode | None = None,
    ) -> list[dict[str, Any]]:
        """See ``Client.retrieve``."""
        return (await self.search(query, fetch_k=k, top_k=k, rerank=False, collection=collection,
                                  filter=filter, mode=mode)).results  # fmt: skip

    async def search_stream(
        self,
        query: str,
        *,
        fetch_k: int | None = None,
        top_k: int | None = None,
        rerank: bool = True,
        budget_ms: float | None = None,
        collection: str | None = None,
        filter: Filter | None = None,
        mode: Mode | None = None,
        rerank_model: str | None = None,
        instruction: str | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """See ``Client.search_stream``; leave the loop early with ``contextlib.aclosing`` around it so the
        connection closes at once."""
        call = _calls.search(query, fetch_k=fetch_k, top_k=top_k, rerank=rerank, budget_ms=budget_ms,
                             collection=collection, filter=filter, mode=mode, rerank_model=rerank_model,
                             instruction=instruction, stream=True)  # fmt: skip
        response = await self._call(call)
        decoder = SSEDecoder()
        try:
            async for line in response.aiter_lines():
                if (raw := decoder.feed(line)) is not None and (ev := _calls.stream_event(*raw)) is not None:
                    yield ev
        except httpx.TransportError as e:
            raise error_for_transport(e, self.url, self.timeout_s) from e
        finally:
            await response.aclose()

    async def rerank(
        self,
        query: str,
        documents: Sequence[str | dict[str, Any]],
        *,
        top_n: int | None = None,
        max_tokens_per_doc: int | None = None,
        model: str | None = None,
        instruction: str | None = None,
    ) -> list[RerankResult]:
        """See ``Client.rerank``."""
        call = _calls.rerank(query, documents, top_n=top_n, max_tokens_per_doc=max_tokens_per_doc,
                             model=model, instruction=instruction)  # fmt: skip
        return _calls.read_rerank(await self._call(call))

    async def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """See ``Client.embed``."""
        return _calls.read_embed(await self._call(_calls.embed(texts)))

    async def info(self) -> dict[str, Any]:
        """See ``Client.info``."""
        return (await self._call(_calls.INFO)).json()

    async def ready(self) -> Readiness:
        """See ``Client.ready``."""
        try:
            return _calls.read_ready(await self._call(_calls.READY))
        except (StageUnavailable, StageTimeout) as e:
            return Readiness(ready=False, reason=str(e))

    def to_sync(self) -> Client:
        """A ``Client`` for the same service, key, timeout and retry policy (its own pool)."""
        return Client(self.url, **self._twin())

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
