"""The rerank score cache: an LRU of (query, document) scores, bounded in entries and in bytes.

Key: the scoring model's identity (backend, model id and revision, dtype, runtime, max_length: whatever
changes a score), the query text, and a 128-bit BLAKE2b hash of the document text (the window text for
split documents) and of the instruction when the pair has one (an LLM reranker's; ``rag.rerank.llm``).
Value: the score the backend returned for that pair. ``CachedReranker`` wraps any
``rag.rerank.RerankBackend`` and is one itself: a call looks every pair up, sends only the pairs it lacks
(deduplicated) to the wrapped backend in one call, and stores their scores.

A cached score is the score the pair got when it was computed. In float32 that is the pair's score in any
batch. With the bf16 screen + fp32 refine fast path, a pair outside its query's head in that batch keeps
its bf16 score; a request identical to the one that filled the cache gets exactly the same scores (the
fidelity test), one that mixes cached and new pairs of a query can differ from an uncached call by the
bf16 error (~1e-2 logits) on pairs that were not in the head when first scored.

Sizes are estimates: ``ENTRY_OVERHEAD`` bytes of Python objects per entry plus the query's UTF-8 bytes
(counted per entry although entries of one request share the string) plus the 16-byte digest.

Pure Python; no ray. One cache per rerank engine, so per Reranker replica (thread-safe).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from rag.errors import RerankerError
from rag.rerank.base import RerankBackend, Scores, ScoreTimings
from rag.settings import Settings
from rag.stages import RerankerConfig
from rag.validation import Pair, ValidPairs, validate_pairs

__all__ = ["ENTRY_OVERHEAD", "CachedReranker", "ScoreCache", "cache_for", "model_key", "with_cache"]

# OrderedDict node, key tuple, bytes digest, value tuple and float (CPython 3.11): an estimate per entry
ENTRY_OVERHEAD = 200


def model_key(info: dict[str, Any]) -> str:
    """What identifies a scoring function, from a reranker's ``info()``."""
    parts = ("backend", "model", "revision", "dtype", "runtime", "max_length", "refine_top", "refine_margin")
    return "|".join(f"{k}={info.get(k)}" for k in parts)


class ScoreCache:
    """LRU of pair scores, at most ``max_entries`` entries and ``max_bytes`` (estimated) bytes."""

    def __init__(self, max_entries: int, max_bytes: int, *, namespace: str = "") -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("the score cache needs max_entries >= 1 and max_bytes >= 1")
        self.max_entries, self.max_bytes = int(max_entries), int(max_bytes)
        self.namespace = namespace.encode()
        self._data: OrderedDict[tuple[str, bytes], tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def key(self, query: str, document: str, instruction: str | None = None) -> tuple[str, bytes]:
        h = hashlib.blake2b(self.namespace, digest_size=16)
        if instruction is not None:  # length-prefixed: no (instruction, document) split collides with another
            raw = instruction.encode("utf-8", "surrogatepass")
            h.update(b"\x01" + len(raw).to_bytes(8, "little") + raw)
        h.update(b"\x00")
        h.update(document.encode("utf-8", "surrogatepass"))
        return (query, h.digest())

    def get_many(self, keys: Sequence[tuple[str, bytes]]) -> list[float | None]:
        out: list[float | None] = []
        with self._lock:
            for k in keys:
                v = self._data.get(k)
                if v is None:
                    self.misses += 1
                    out.append(None)
                else:
                    self._data.move_to_end(k)
                    self.hits += 1
                    out.append(v[0])
        return out

    def put_many(self, items: Sequence[tuple[tuple[str, bytes], float]]) -> None:
        with self._lock:
            for k, score in items:
                size = ENTRY_OVERHEAD + len(k[0].encode("utf-8", "surrogatepass")) + len(k[1])
                if size > self.max_bytes:
                    continue
                old = self._data.pop(k, None)
                if old is not None:
                    self.bytes -= old[1]
                self._data[k] = (float(score), size)
                self.bytes += size
                while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
                    _, (_, s) = self._data.popitem(last=False)
                    self.bytes -= s
                    self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def info(self) -> dict[str, Any]:
        """The bound and the current state (GET /info)."""
        with self._lock:
            looked = self.hits + self.misses
            return {
                "enabled": True,
                "max_entries": self.max_entries,
                "max_bytes": self.max_bytes,
                "entries": len(self._data),
                "bytes": self.bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "hit_rate": round(self.hits / looked, 4) if looked else None,
                "key": "(model and revision, query text, BLAKE2b-128 of the document text)",
            }


class CachedReranker:
    """A backend that answers pairs from a ``ScoreCache`` and computes only the ones it lacks with ``inner``
    (the rerank engine holds its backend this way when ``rerank_cache`` is on)."""

    def __init__(self, inner: RerankBackend, cache: ScoreCache) -> None:
        self.inner, self.cache = inner, cache
        self.enabled = inner.enabled
        self.tokenizer, self.max_length = inner.tokenizer, inner.max_length

    @property
    def default_instruction(self) -> str | None:
        return self.inner.default_instruction

    def pair_overhead(self, instruction: str | None) -> int:
        return self.inner.pair_overhead(instruction)

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    def score(self, pairs: Sequence[Pair], instructions: Sequence[str | None] | None = None) -> Scores:
        """Scores of ``pairs``; ``cached`` says which came from the cache, ``timings`` counts hits/misses.
        ``instructions`` (one per pair) are part of the key, and reach the backend only when given."""
        pairs = validate_pairs(pairs)  # before anything is looked up or stored
        if instructions is not None and len(instructions) != len(pairs):
            raise RerankerError(f"{len(instructions)} instructions for {len(pairs)} pairs")
        instr = list(instructions) if instructions is not None else [None] * len(pairs)
        t0 = time.perf_counter()
        keys = [self.cache.key(q, d, i) for (q, d), i in zip(pairs, instr, strict=True)]
        found = self.cache.get_many(keys)
        todo: dict[tuple[str, bytes], int] = {}
        for i, v in enumerate(found):
            if v is None:
                todo.setdefault(keys[i], i)
        lookup_ms = (time.perf_counter() - t0) * 1e3
        computed: dict[tuple[str, bytes], float] = {}
        timings = ScoreTimings()
        if todo:
            miss = ValidPairs(pairs[i] for i in todo.values())
            if instructions is None:
                got = self.inner.score(miss)
            else:
                got = self.inner.score(miss, [instr[i] for i in todo.values()])
            if len(got) != len(miss):
                raise RerankerError(f"reranker returned {len(got)} scores for {len(miss)} pairs")
            computed = dict(zip(todo, got, strict=True))
            self.cache.put_many(list(computed.items()))
            timings = got.timings
        hit = [v is not None for v in found]
        out = [v if v is not None else computed[k] for k, v in zip(keys, found, strict=True)]
        return Scores(out, timings.with_cache(len(pairs), sum(hit), lookup_ms), hit)


def cache_for(backend: RerankBackend, cfg: RerankerConfig | Settings) -> ScoreCache | None:
    """A ``ScoreCache`` for ``backend``'s scores sized by ``cfg``; None when ``rerank_cache`` is off or the
    backend is disabled."""
    if not cfg.rerank_cache or not backend.enabled:
        return None
    return ScoreCache(cfg.rerank_cache_entries, cfg.rerank_cache_bytes, namespace=model_key(backend.info()))


def with_cache(backend: RerankBackend, cfg: RerankerConfig | Settings) -> RerankBackend:
    """``backend`` behind its ``cache_for`` cache (itself when there is none)."""
    cache = cache_for(backend, cfg)
    return backend if cache is None else CachedReranker(backend, cache)
