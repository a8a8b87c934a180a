"""A LlamaIndex retriever over the service: ``llama_index.core``'s ``BaseRetriever`` (``retrieve`` and
``aretrieve``), returning ``NodeWithScore``.

    from rag.integrations.llamaindex import LlamaIndexRetriever
    retriever = LlamaIndexRetriever(url="http://127.0.0.1:8000", top_k=8)  # api_key=... or RAG_API_KEY
    nodes = retriever.retrieve("how do I parse a date?")                    # [NodeWithScore], best first

Each node is a hit: a ``TextNode`` with the hit's id and content, its ``doc_id`` as the source document
(``ref_doc_id``), and the rest of the hit as metadata; ``score`` is the hit's score. Only ``source`` of that
metadata goes into what an LLM or an embedding model reads of the node: scores and ids stay out of prompts.
"""

from __future__ import annotations

from typing import Any

from rag.client import AsyncClient, Client, RetryPolicy
from rag.integrations import OwnedClients, hit_metadata, missing_extra

try:
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.schema import (
        NodeRelationship,
        NodeWithScore,
        QueryBundle,
        RelatedNodeInfo,
        TextNode,
    )
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise missing_extra("llamaindex", e) from e

__all__ = ["LlamaIndexRetriever"]


class LlamaIndexRetriever(BaseRetriever):
    """Retrieval and reranking by a rag-serve service, as a LlamaIndex retriever (see the module docstring).

    The options are ``LangChainRetriever``'s: ``fetch_k``, ``top_k``, ``rerank``, ``collection``, ``filter``,
    ``mode``, ``budget_ms``; ``client`` / ``async_client`` or ``url`` / ``api_key``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        fetch_k: int = 100,
        top_k: int = 8,
        rerank: bool = True,
        collection: str | None = None,
        filter: dict[str, Any] | None = None,
        mode: str | None = None,
        budget_ms: float | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        client: Client | None = None,
        async_client: AsyncClient | None = None,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(callback_manager=callback_manager, verbose=verbose)
        self.options: dict[str, Any] = {"fetch_k": fetch_k, "top_k": top_k, "rerank": rerank,
                                        "collection": collection, "filter": filter, "mode": mode,
                                        "budget_ms": budget_ms}  # fmt: skip
        self._owned = OwnedClients(
            client, async_client, lambda: Client(url, api_key=api_key, timeout_s=timeout_s, retry=retry)
        )
        self.client, self.async_client = self._owned.client, self._owned.async_client

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [_node(h) for h in self.client.search(query_bundle.query_str, **self.options).results]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        answer = await self.async_client.search(query_bundle.query_str, **self.options)
        return [_node(h) for h in answer.results]

    def close(self) -> None:
        """Close the sync client this retriever made (a client passed in stays open)."""
        self._owned.close()

    async def aclose(self) -> None:
        """Close both clients this retriever made."""
        await self._owned.aclose()


def _node(hit: dict[str, Any]) -> NodeWithScore:
    meta = hit_metadata(hit)
    hidden = [k for k in meta if k != "source"]  # scores and ids are not text for a model to read
    node = TextNode(
        id_=str(hit["id"]),
        text=hit["content"],
        metadata=meta,
        excluded_llm_metadata_keys=hidden,
        excluded_embed_metadata_keys=hidden,
    )
    if hit.get("doc_id") is not None:
        node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=str(hit["doc_id"]))
    return NodeWithScore(node=node, score=hit["score"])
