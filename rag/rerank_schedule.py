"""Who gets the rerank model next: admission, chunk sizes, and the order chunks join a batch.

A request's (query, window) pairs go to the model one chunk at a time; between chunks it may be stopped
(cancelled, or past its deadline) and other requests take their turn. ``Scheduler`` decides:

- **admission**: a request that would finish after ``ADMIT_FRACTION`` of its caller's deadline, judged from
  the pairs ahead of it and this replica's measured pairs/s, is refused at once (``Overloaded``) instead of
  being computed for a caller that has gone;
- **chunk size by time**: one round (one batch) aims at ``chunk_s`` seconds of the model's compute at its
  measured pairs/s (``budget``: the backend's own time, so a batch's fixed costs cannot shrink the chunks
  ever further), and no request's chunk exceeds ``chunk_cap`` pairs (``rerank_chunk_pairs``, and the
  batch's pair cap). A request of at most ``WHOLE_PAIRS`` pairs is one chunk: splitting it would only add
  rounds to its own wait;
- **order**: while a batch runs, requests wait for their next turn; when it ends, every waiting request gets
  a chunk, fewest remaining pairs first. Small requests take what they need; a large one gets what is left
  of the round's budget, but at least a quarter of it, so it never stalls. A small request therefore waits
  for about one round (the batch in progress) instead of for a large request's next chunk too.

The async turns (``turn``) belong to one event loop (a Serve replica's); ``size_alone`` serves a caller that
scores its chunks itself, one after the other (the library). Bookkeeping is thread-safe.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from rag.errors import Overloaded

__all__ = [
    "ADMIT_FRACTION",
    "WHOLE_PAIRS",
    "Item",
    "Part",
    "Scheduler",
    "Ticket",
    "admission_wait_s",
    "batch_cost",
    "fair_pairs_ahead",
]

# Admit a request only if its estimated finish is within this fraction of the caller's deadline: the rate is
# an estimate from past batches, and other processes on the node (stage 1 under load) can slow the next down.
ADMIT_FRACTION = 0.8
WHOLE_PAIRS = 32  # a request this small is scored in one chunk (a /search of fetch_k <= 32, say)
MIN_SHARE = 0.25  # of a round's budget: the least a large request gets per round while small ones go first
RATE_ALPHA = 0.3  # weight of the newest batch in the pairs/s estimate


@dataclass(frozen=True)
class Item:
    """One queued unit of work: a query and (a chunk of) its documents, and the batch caps it joins with."""

    query: str
    documents: tuple[str, ...]
    request_cap: int
    pair_cap: int
    enqueued_at: float
    expires_at: float | None = None  # perf_counter() after which the caller no longer waits
    ticket: int = -1  # the request it belongs to
    instruction: str | None = None  # an LLM reranker's instruction (None: the model's default)


@dataclass(frozen=True)
class Part:
    """What one item got back from its batch."""

    scores: list[float]
    queue_ms: float  # from joining the batch queue to the batch starting
    batch: int  # which batch (a request's items may share one)
    batch_ms: float  # the batch's compute time (shared by everything in it)
    cache_hits: int


def batch_cost(items: Sequence[Item]) -> int:
    """> request_cap iff the batch holds more than request_cap items or more than pair_cap pairs.

    Ray's ``batch_size_fn`` compares one number with ``max_batch_size`` (= ``request_cap``), so both bounds
    are folded into one cost."""
    if not items:
        return 0
    request_cap, pair_cap = items[-1].request_cap, items[-1].pair_cap
    pairs = sum(len(i.documents) for i in items)
    return max(len(items), -(-pairs * request_cap // pair_cap))


def admission_wait_s(pending_pairs: int, pairs: int, pairs_per_s: float | None) -> float | None:
    """Seconds until a request of ``pairs`` would finish behind ``pending_pairs`` (None: no estimate yet)."""
    if not pairs_per_s or pending_pairs <= 0:
        return None  # idle, or nothing measured yet: always admitted
    return (pending_pairs + pairs) / pairs_per_s


def fair_pairs_ahead(remaining: list[int], pairs: int, chunk: int) -> int:
    """Pairs scored before a new request of ``pairs`` finishes, when every active request (``remaining``
    pairs each) contributes up to ``chunk`` pairs per round: at most as many rounds of each as it needs."""
    rounds_pairs = -(-pairs // chunk) * chunk
    return sum(min(r, rounds_pairs) for r in remaining)


def _slow_first(old: float | None, rate: float) -> float:
    """min(newest, EWMA): an estimate that follows a slowdown at once and a speed-up gradually."""
    ewma = rate if old is None else RATE_ALPHA * rate + (1 - RATE_ALPHA) * old
    return min(rate, ewma)


@dataclass(eq=False)
class Ticket:
    """An admitted request: its pairs not yet scored, and those granted to a batch that has not started."""

    id: int
    pairs: int
    remaining: int
    granted: int = 0
    waiting: asyncio.Future[int] | None = field(default=None, repr=False)


class Scheduler:
    """Admission, chunk sizes and turns for one model replica (see the module docstring)."""

    def __init__(self, chunk_cap: int, chunk_s: float) -> None:
        self.chunk_cap = max(1, chunk_cap)
        self.chunk_s = chunk_s
        self.pairs_per_s: float | None = None  # per batch, wall time (what callers wait): admission
        self.compute_pairs_per_s: float | None = None  # per batch, the model's own time: chunk sizes
        self.active: dict[int, Ticket] = {}
        self._ids = itertools.count()
        self._waiting: list[Ticket] = []
        self._running = 0  # batches executing now
        self._round = 0  # pairs granted to batches that have not started
        self._lock = threading.Lock()

    @property
    def running(self) -> int:
        """Batches executing now."""
        return self._running

    # -- sizes ---------------------------------------------------------------------------------------
    def budget(self) -> int:
        """Pairs of one round: ``chunk_s`` of compute at the measured rate (the chunk cap until measured)."""
        if not self.compute_pairs_per_s or self.chunk_s <= 0:
            return self.chunk_cap
        return max(1, round(self.compute_pairs_per_s * self.chunk_s))

    def _share(self, t: Ticket, room: int) -> int:
        whole = min(WHOLE_PAIRS, self.chunk_cap)
        if t.remaining <= whole:
            return t.remaining
        least = max(1, int(self.budget() * MIN_SHARE))
        return max(1, min(t.remaining, self.chunk_cap, max(room, least)))

    def size_alone(self, t: Ticket) -> int:
        """The next chunk of a request that has the model to itself."""
        with self._lock:
            return self._share(t, self.budget())

    def observe(self, computed_pairs: int, seconds: float, compute_seconds: float | None = None) -> None:
        """A batch computed ``computed_pairs`` (cache hits excluded) in ``seconds`` of wall time, of which
        the model took ``compute_seconds`` (default: all). Rates go down at once when a batch ran slower,
        up gradually."""
        if seconds <= 0 or computed_pairs <= 0:
            return
        compute = seconds if compute_seconds is None or compute_seconds <= 0 else compute_seconds
        with self._lock:
            self.pairs_per_s = _slow_first(self.pairs_per_s, computed_pairs / seconds)
            self.compute_pairs_per_s = _slow_first(self.compute_pairs_per_s, computed_pairs / compute)

    # -- requests ------------------------------------------------------------------------------------
    def admit(self, pairs: int, deadline_s: float | None) -> Ticket:
        """A ticket for a request of ``pairs``, or Overloaded when it would finish past its deadline."""
        with self._lock:
            step = max(1, min(self.budget(), self.chunk_cap))
            ahead = fair_pairs_ahead([t.remaining for t in self.active.values()], pairs, step)
            wait_s = admission_wait_s(ahead, pairs, self.pairs_per_s)
            if deadline_s is not None and wait_s is not None and wait_s > ADMIT_FRACTION * deadline_s:
                raise Overloaded(
                    f"the reranker is busy: this request would finish in about {wait_s:.1f}s "
                    f"({ahead} pairs ahead at {self.pairs_per_s:.0f} pairs/s), later than "
                    f"{ADMIT_FRACTION:.0%} of its {deadline_s:g}s deadline; retry later, or add Reranker "
                    "replicas",
                    retry_after_s=max(1.0, round(wait_s - deadline_s, 1)),
                )
            t = Ticket(next(self._ids), pairs, pairs)
            self.active[t.id] = t
            return t

    def scored(self, t: Ticket, pairs: int) -> None:
        with self._lock:
            t.remaining -= pairs

    def finish(self, t: Ticket) -> None:
        """The request ended (done, failed, cancelled, expired): its grants go back to the round."""
        with self._lock:
            self.active.pop(t.id, None)
            self._round -= t.granted
            t.granted = 0
            if t in self._waiting:
                self._waiting.remove(t)

    def pending_pairs(self) -> int:
        with self._lock:
            return sum(t.remaining for t in self.active.values())

    # -- turns (one event loop) ----------------------------------------------------------------------
    async def turn(self, t: Ticket) -> int:
        """Wait for ``t``'s next turn (none while no batch runs); the answer is its chunk's size."""
        with self._lock:
            if self._running == 0:
                return self._grant(t, self.budget())
            t.waiting = asyncio.get_running_loop().create_future()
            self._waiting.append(t)
        return await t.waiting

    def _grant(self, t: Ticket, budget: int) -> int:
        n = self._share(t, budget - self._round)
        self._round += n
        t.granted += n
        return n

    def batch_started(self, items: Sequence[Item]) -> None:
        with self._lock:
            self._running += 1
            for it in items:
                t = self.active.get(it.ticket)
                if t is not None:
                    n = min(t.granted, len(it.documents))
                    t.granted -= n
                    self._round -= n

    def batch_finished(self) -> None:
        """The batch ended: every waiting request gets its next chunk, fewest remaining pairs first."""
        with self._lock:
            self._running -= 1
            if self._running > 0:
                return
            budget = self.budget()
            waiting, self._waiting = sorted(self._waiting, key=lambda t: (t.remaining, t.id)), []
            for t in waiting:
                fut, t.waiting = t.waiting, None
                if fut is not None and not fut.done():
                    fut.set_result(self._grant(t, budget))
