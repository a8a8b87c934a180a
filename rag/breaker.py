"""A circuit breaker: opened by a failure that says a dependency is gone, closed by whoever probes it.

While open, callers skip the dependency at once (the ingress refuses a stage's calls,
``deployments._breaker.Breaker``; the store sends a read replica's searches to the primary,
``rag.store.replicas``) instead of each waiting for its own timeout. Opening and closing are logged once
per outage, with how long it lasted. The breaker holds no timer: its owner probes the dependency and closes
it (the ingress every ``PROBE_EVERY_S``, the replica set every ``read_replica_probe_s``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = ["Breaker"]


@dataclass
class Breaker:
    """One dependency's breaker. Open: ``error`` says why (``reason(err)`` of the failure that opened it)."""

    name: str
    error: BaseException | None = None
    opened_at: float = 0.0
    probe: asyncio.Task | None = field(default=None, repr=False)
    log: ClassVar[logging.Logger] = logging.getLogger("rag.breaker")

    @property
    def is_open(self) -> bool:
        return self.error is not None

    @property
    def label(self) -> str:
        """How log lines name the dependency."""
        return self.name

    def reason(self, err: BaseException) -> BaseException:
        """The error kept while open (a subclass may translate ``err``)."""
        return err

    def open(self, err: BaseException) -> None:
        """Open (or, already open, keep the time it opened and take ``err`` as the latest reason)."""
        if not self.is_open:
            self.opened_at = time.monotonic()
            self.log.warning("%s: circuit open (%s)", self.label, err)
        self.error = self.reason(err)

    def close(self) -> None:
        if self.is_open:
            self.log.warning("%s: circuit closed after %.1fs", self.label, time.monotonic() - self.opened_at)
        self.error = None
