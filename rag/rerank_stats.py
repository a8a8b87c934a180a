"""What the rerank engine counts: batching and scheduling statistics of one replica, and one batch's report.

``EngineStats`` is what the Reranker deployment's ``stats()`` returns (tests, benchmarks, debugging): batches,
the largest batch, recent batch sizes; requests and pairs requested, computed and dropped; what was refused
(cost cap, admission), cancelled or expired. ``BatchReport`` is what the engine tells its observer (the
deployment's metrics) after each batch. Thread-safe: batches run in worker threads.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any

from rag.rerank.base import ScoreTimings
from rag.score_cache import ScoreCache

__all__ = ["BatchReport", "EngineStats"]

RECENT = 64  # recent batches kept


@dataclass(frozen=True)
class BatchReport:
    """One batch as its observer sees it: items (request chunks), pairs, the backend's timings, the batch's
    wall time, each item's wait for the batch, and the score cache (None when off)."""

    items: int
    pairs: int
    timings: ScoreTimings
    batch_ms: float
    queue_ms: list[float]
    cache: ScoreCache | None


@dataclass
class _Counts:
    batches: int = 0
    items: int = 0
    pairs: int = 0  # pairs scored (computed or from the cache)
    requests: int = 0
    pairs_requested: int = 0
    pairs_dropped: int = 0  # of stopped requests: not delivered (the in-flight chunk may be scored)
    cancelled: int = 0
    expired: int = 0
    expired_items: int = 0
    refused_overloaded: int = 0
    refused_cost: int = 0
    max_batch_requests: int = 0
    max_batch_pairs: int = 0
    last_batch_ms: float | None = None


@dataclass
class EngineStats:
    """Counters since the last reset (see the module docstring)."""

    counts: _Counts = field(default_factory=_Counts)
    recent: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=RECENT))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, **increments: int) -> None:
        """Add to counters by name (``requests=1``, ``pairs_dropped=n``...)."""
        with self._lock:
            for name, n in increments.items():
                setattr(self.counts, name, getattr(self.counts, name) + n)

    def batch(self, items: int, pairs: int, batch_ms: float) -> None:
        with self._lock:
            c = self.counts
            c.batches += 1
            c.items += items
            c.pairs += pairs
            c.max_batch_requests = max(c.max_batch_requests, items)
            c.max_batch_pairs = max(c.max_batch_pairs, pairs)
            c.last_batch_ms = round(batch_ms, 2)
            self.recent.append((items, pairs))

    def as_dict(self, reset: bool = False) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {f.name: getattr(self.counts, f.name) for f in fields(_Counts)}
            out["recent_batches"] = [list(x) for x in self.recent]
            if reset:
                self.counts = _Counts()
                self.recent.clear()
        return out
