"""A LangChain retriever over the service: ``langchain_core``'s ``BaseRetriever``, sync and async.

    from rag.integrations.langchain import LangChainRetriever
    retriever = LangChainRetriever(url="http://127.0.0.1:8000", top_k=8)   # api_key=... or RAG_API_KEY
    docs = retriever.invoke("how do I parse a date?")                        # or await retriever.ainvoke(...)

Each ``Document`` is a hit: ``page_content`` its content, ``id`` its id, ``metadata`` the rest of the hit
(``id``, ``source``, ``score``, ``dense_score``, ``doc_id``, ``chunk_index``, the chunk's ``metadata``).
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, PrivateAttr, SecretStr

from rag.client import AsyncClient, Client, RetryPolicy
from rag.integrations import OwnedClients, hit_metadata, missing_extra

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise missing_extra("langchain", e) from e

__all__ = ["LangChainRetriever"]


class LangChainRetriever(BaseRetriever):
    """Retrieval and reranking by a rag-serve service, as a LangChain retriever.

    ``fetch_k`` candidates are reranked and the best ``top_k`` returned (``rerank=False``: stage 1 alone);
    ``collection``, ``filter``, ``mode`` and ``budget_ms`` go to ``/search`` as given. Pass ``client``
    (and/or ``async_client``) to share connection pools, or ``url`` and ``api_key`` (``timeout_s``,
    ``retry``) to have the retriever make them; the missing one of the pair is made like the given one.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    url: str | None = None
    api_key: SecretStr | None = None
    fetch_k: int = 100
    top_k: int = 8
    rerank: bool = True
    collection: str | None = None
    filter: dict[str, Any] | None = None
    mode: str | None = None
    budget_ms: float | None = None
    timeout_s: float = 60.0
    retry: RetryPolicy | None = None
    client: Client | None = None
    async_client: AsyncClient | None = None
    _owned: OwnedClients = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        self._owned = OwnedClients(
            self.client,
            self.async_client,
            lambda: Client(self.url, api_key=key, timeout_s=self.timeout_s, retry=self.retry),
        )
        self.client, self.async_client = self._owned.client, self._owned.async_client

    def _options(self) -> dict[str, Any]:
        return {"fetch_k": self.fetch_k, "top_k": self.top_k, "rerank": self.rerank,
                "collection": self.collection, "filter": self.filter, "mode": self.mode,
                "budget_ms": self.budget_ms}  # fmt: skip

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        assert self.client is not None  # set in model_post_init
        return [_document(h) for h in self.client.search(query, **self._options()).results]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        assert self.async_client is not None
        answer = await self.async_client.search(query, **self._options())
        return [_document(h) for h in answer.results]

    def close(self) -> None:
        """Close the sync client this retriever made (a client passed in stays open)."""
        self._owned.close()

    async def aclose(self) -> None:
        """Close both clients this retriever made."""
        await self._owned.aclose()


def _document(hit: dict[str, Any]) -> Document:
    return Document(page_content=hit["content"], id=str(hit["id"]), metadata=hit_metadata(hit))
