"""Ingress deployment: the HTTP API (``deployments.api``) over the Embedder, Retriever and Reranker.

The deployment holds the ``SearchService`` (the stage calls) built from the handles it was bound with;
Serve asks it for its FastAPI app once the constructor ran (``_ray_compat.late_bound_ingress``).
``create_app`` and the error table are importable from here as before.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments._ray_compat import late_bound_ingress
from deployments._service import SearchService
from deployments.api import create_app
from deployments.api.auth import auth_line
from deployments.api.errors import ERROR_TABLE, error_response
from rag.stages import SearchConfig

__all__ = ["ERROR_TABLE", "Ingress", "create_app", "error_response"]

log = logging.getLogger("ray.serve")


@serve.deployment(name="Ingress", max_ongoing_requests=100, ray_actor_options={"num_cpus": 0.25})
@late_bound_ingress
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

    def build_asgi_app(self) -> FastAPI:
        return create_app(self.service)
