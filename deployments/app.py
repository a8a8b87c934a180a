"""``build_app(args)``: the Serve application graph, the ``import_path`` of ``serve_config*.yaml``.

    applications:
      - import_path: deployments.app:build_app
        args: {collection: default, rerank_dtype: auto}     # any Settings field; the rest from RAG_* env

Each deployment is bound with only its slice of the settings (``Settings.slice``). Deployment options
(replicas, autoscaling, ``user_config``, ``ray_actor_options``) come from the config file's ``deployments:``.
"""

# No `from __future__ import annotations` here: Serve inspects build_app's annotation to validate the args
# dict into AppArgs, and needs the class, not a string.

from ray.serve import Application

from deployments._args import AppArgs
from deployments.embedder import Embedder
from deployments.ingress import Ingress
from deployments.reranker import Reranker
from deployments.retriever import Retriever

__all__ = ["AppArgs", "build_app"]


def build_app(args: AppArgs) -> Application:
    """Ingress(Embedder, Retriever, Reranker), each with the slice of the settings it needs."""
    if isinstance(args, dict):  # called directly from Python rather than by Serve
        args = AppArgs.model_validate(args)
    s = args
    url = s.database_url
    if url is None:
        from rag.db import database_url

        # The embedded server of data_dir, if it is running; a clear StoreUnavailable otherwise.
        url = database_url(s, start=False)
    return Ingress.bind(
        Embedder.bind(s.slice("embedder")),
        Retriever.bind(s.slice("store", database_url=url)),
        Reranker.bind(s.slice("reranker")),
        s.slice("search"),
    )
