"""``build_app``'s typed arguments, and the ``user_config`` models of the batching deployments.

Settings flow one way: env / CLI -> ``rag.settings.Settings`` -> one typed slice per deployment
(``Settings.slice(stage)``, derived from the fields' stage tags). ``AppArgs`` is a Serve config's ``args:``:
any ``Settings`` field by name, validated by ``Settings`` itself, the rest read from the environment of
the process that builds the app (``serve run serve_config.yaml`` works with only ``RAG_DATABASE_URL`` set).
Deployments get plain pydantic slices and never read ``os.environ``.

The batching knobs are not here: they are ``user_config`` (``EmbedderUserConfig``, ``RerankerUserConfig``) so
they change through ``reconfigure()`` without restarting replicas.
"""

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from rag.settings import SECRETS, Settings

__all__ = ["AppArgs", "BatchUserConfig", "EmbedderUserConfig", "RerankerUserConfig"]

log = logging.getLogger("ray.serve")


def _accepted_keys() -> frozenset[str]:
    keys = set(Settings.model_fields)
    for info in Settings.model_fields.values():
        alias = info.validation_alias
        keys.update(c for c in getattr(alias, "choices", [alias]) if isinstance(c, str))
    return frozenset(keys)


class AppArgs(Settings):
    """``build_app``'s arguments: the ``args:`` of a Serve config, any ``Settings`` field by name.

    Serve validates the args dict with ``AppArgs.model_validate``, which reads no environment; the validator
    below builds ``Settings`` from it, so unset fields come from ``RAG_*`` as everywhere else.
    """

    model_config = SettingsConfigDict(env_prefix="RAG_", extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _with_environment(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unknown = sorted(set(data) - _accepted_keys())
        if unknown:
            raise ValueError(
                f"unknown app args {unknown}: every arg is a Settings field (the RAG_<NAME> variables, "
                "lower-case; see docs/serving.md)"
            )
        s = Settings(**data)
        out = {k: getattr(s, k) for k in s.model_fields_set}
        out["data_dir"] = Path(s.data_dir).expanduser().resolve()  # replicas run in Ray's working directory
        return out

    @classmethod
    def from_settings(cls, settings: Settings) -> "AppArgs":
        return cls.model_validate({k: getattr(settings, k) for k in settings.model_fields_set})

    def explicit(self) -> dict[str, Any]:
        """The explicitly set, non-secret fields as JSON values (for a Serve config's ``args:``; Ray logs
        those, so secrets reach the app through the environment instead)."""
        return self.model_dump(mode="json", include=self.model_fields_set - SECRETS)


class BatchUserConfig(BaseModel):
    """What every batching deployment's ``user_config`` holds: its ``@serve.batch`` knobs."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(1, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0)

    def apply(self, batch_method: Any, role: str) -> None:
        """Set the knobs of ``batch_method`` (a ``@serve.batch`` method) and log them."""
        batch_method.set_max_batch_size(self.max_batch_size)
        batch_method.set_batch_wait_timeout_s(self.batch_wait_timeout_s)
        log.info("%s user_config: %s", role, self.model_dump())


class EmbedderUserConfig(BatchUserConfig):
    """``user_config`` of the Embedder deployment (applied by ``reconfigure()``, no restart)."""

    max_batch_size: int = Field(32, ge=1, description="Queries per forward pass.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits to fill.")


class RerankerUserConfig(BatchUserConfig):
    """``user_config`` of the Reranker deployment (applied by ``reconfigure()``, no restart)."""

    max_batch_size: int = Field(16, ge=1, description="Requests merged into one batch (one forward pass).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill.")
    max_pairs_per_batch: int = Field(
        1600, ge=1, description="Cap on (query, document) pairs per batch: bounds memory on a GPU fraction."
    )
    inject_failure: bool = Field(False, description="Chaos/testing: every batch raises RerankerError.")
    inject_delay_ms: float = Field(0.0, ge=0, description="Chaos/testing: extra latency per batch.")
