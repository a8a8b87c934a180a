"""One exception hierarchy for the whole project.

Every error a user can cause or meet carries a message that says what to fix. The HTTP layer maps these
types to status codes through a single table (``deployments/api/errors.py``); the CLI prints ``str(err)``.
"""

from __future__ import annotations

__all__ = [
    "BodyTooLarge",
    "CollectionError",
    "ConfigError",
    "DimensionMismatch",
    "IngestError",
    "InvalidInput",
    "ModelError",
    "ModelUnavailable",
    "Overloaded",
    "RagError",
    "RerankerError",
    "Retryable",
    "ServiceError",
    "StageTimeout",
    "StageUnavailable",
    "StoreUnavailable",
    "Unauthenticated",
    "UnknownModel",
]


class RagError(Exception):
    """Base class: everything this project raises on purpose."""

    error_type = "rag_error"
    status_code: int | None = None  # the HTTP status it arrived with, when rag.client raised it


class Unauthenticated(RagError):
    """No API key, or not one of the configured keys (401)."""

    error_type = "unauthenticated"


class InvalidInput(RagError, ValueError):
    """The request or argument is wrong; the message says which value and what is allowed."""

    error_type = "invalid_input"


class BodyTooLarge(InvalidInput):
    """The request body is larger than ``RAG_MAX_BODY_BYTES``."""

    error_type = "body_too_large"


class UnknownModel(InvalidInput):
    """A request named a rerank model the service does not serve (the message lists the served names)."""

    error_type = "unknown_model"


class ConfigError(RagError):
    """A setting is missing or inconsistent (e.g. a Cohere key for the cohere backend)."""

    error_type = "config_error"


class CollectionError(InvalidInput):
    """A collection name is invalid or the collection does not exist."""

    error_type = "collection_error"


class DimensionMismatch(InvalidInput):
    """The embedding model's dimension differs from the one the collection was built with."""

    error_type = "dimension_mismatch"


class IngestError(RagError):
    """A path could not be read or holds nothing ingestible."""

    error_type = "ingest_error"


class Retryable(RagError):
    """The service cannot answer now; the same request may succeed after ``retry_after_s`` (503)."""

    error_type = "unavailable"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple:  # keep retry_after_s through pickling (Ray ships errors between processes)
        return (type(self), (str(self), self.retry_after_s))


class Overloaded(Retryable):
    """Refused at once: too much work is queued (a full queue, the reranker's admission)."""

    error_type = "overloaded"


class StageTimeout(Retryable):
    """A stage did not answer within its timeout."""

    error_type = "timeout"


class StageUnavailable(Retryable):
    """A stage has no live replica (starting, restarting or gone)."""

    error_type = "unavailable"


class StoreUnavailable(RagError):
    """The database cannot be reached or lacks pgvector."""

    error_type = "store_unavailable"


class ModelError(RagError):
    """A model could not be loaded or failed to run."""

    error_type = "model_error"


class RerankerError(ModelError):
    """Stage 2 failed (model error, Cohere API error or timeout)."""

    error_type = "reranker_error"


class ModelUnavailable(RerankerError):
    """One served rerank model could not be loaded; the others keep serving, and a later request retries."""

    error_type = "model_unavailable"


class ServiceError(RagError):
    """The service answered with an error no type above describes: a bug there (500 ``internal_error``), an
    unknown route (404), a proxy's error page. ``rag.client`` raises it with the answer's ``status_code`` and
    ``error_type``; the service itself never raises it."""

    error_type = "service_error"
