"""Retrievers for LangChain and LlamaIndex over ``rag.client``, each an optional extra, imported on use:

    pip install 'rag-serve[langchain]'     # from rag.integrations.langchain import LangChainRetriever
    pip install 'rag-serve[llamaindex]'    # from rag.integrations.llamaindex import LlamaIndexRetriever

Both call ``/search`` (``retrieve_and_rerank``'s shape: ``fetch_k`` candidates, reranked, best ``top_k``)
and pass ``collection``, ``filter``, ``mode`` and ``budget_ms`` through. ``hit_metadata`` is what both
attach to each document: the library's hit dict without its ``content``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rag.client import AsyncClient, Client

__all__ = ["LangChainRetriever", "LlamaIndexRetriever", "OwnedClients", "hit_metadata", "missing_extra"]

_LAZY = {"LangChainRetriever": "langchain", "LlamaIndexRetriever": "llamaindex"}


def hit_metadata(hit: dict[str, Any]) -> dict[str, Any]:
    """A hit's metadata for a framework's document: every key of the hit but ``content`` (``id``, ``source``,
    ``score``, ``dense_score``, ``doc_id``, ``chunk_index``, and the chunk's own ``metadata``, nested so that
    none of its keys can shadow ours)."""
    return {k: v for k, v in hit.items() if k != "content"}


class OwnedClients:
    """A retriever's sync and async clients: the ones given, the missing one of the pair made like the other
    (a sync one from ``make()`` when neither is given). ``close``/``aclose`` close only what was made here."""

    def __init__(
        self, client: Client | None, async_client: AsyncClient | None, make: Callable[[], Client]
    ) -> None:
        self._sync_made = self._async_made = False
        if client is None:
            client = async_client.to_sync() if async_client is not None else make()
            self._sync_made = True
        if async_client is None:
            async_client = client.to_async()
            self._async_made = True
        self.client, self.async_client = client, async_client

    def close(self) -> None:
        if self._sync_made:
            self.client.close()

    async def aclose(self) -> None:
        self.close()
        if self._async_made:
            await self.async_client.aclose()


def missing_extra(extra: str, err: ImportError) -> ImportError:
    return ImportError(f"{err.name or extra} is not installed: pip install 'rag-serve[{extra}]'")


def __getattr__(name: str) -> Any:  # the framework is imported only when its retriever is asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"rag.integrations.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
