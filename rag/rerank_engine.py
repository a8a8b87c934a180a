"""THE rerank front door: ``RerankEngine.rerank(query, documents, options) -> RerankResult``.

Modelled on text-embeddings-inference's ``Infer::predict`` (core/src/infer.rs): the engine holds one backend
(``rag.rerank``) and does everything around it, with no Ray:

- windows: a long document is split into windows that fit the model (``rag.longdoc``), scored, combined;
- the score cache: the backend sits behind a ``CachedReranker`` when ``rerank_cache`` is on;
- the cost cap: a request costing more than ``rerank_max_request_tokens`` is refused up front (422);
- admission, chunks and turns (``rag.rerank_schedule``): a request is refused at once when it would finish
  past its deadline, goes to the model one chunk at a time (a cancellation point each), and takes turns
  with the other requests;
- the batch body: one backend call per batch, and if that fails each item alone, so only the bad one fails;
- instructions (an LLM reranker's, ``RerankOptions.instruction``): checked up front, carried on each chunk,
  and passed per pair to the backend (and so into the score cache's key).

The library (``Pipeline``, ``rag eval``, ``rag query``) calls ``rerank_sync``; the Reranker deployment calls
``rerank`` and feeds the chunks through ``@serve.batch`` into ``run_batch``. Both run the same policy, a
generator that yields the steps it needs (windows, a turn, a chunk scored), as ``rag.search`` does, so the
library and the service score the same request the same way (driven by ``rag.search``'s ``run_sync`` and
``run_async``). The caller validates a request at its edge (``rag.validation``); the engine trusts its input.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from rag.errors import InvalidInput, RerankerError, StageTimeout
from rag.longdoc import MIN_WINDOW, Plan, windower_for
from rag.rerank.base import RerankBackend, Scores
from rag.rerank_schedule import Item, Part, Scheduler, Ticket
from rag.rerank_stats import BatchReport, EngineStats
from rag.score_cache import CachedReranker, cache_for
from rag.search import run_async, run_sync
from rag.stages import RerankerConfig
from rag.validation import ValidPairs

__all__ = ["RerankEngine", "RerankOptions", "RerankResult", "RerankTimings", "RerankUsage"]


@dataclass(frozen=True)
class RerankOptions:
    """How to rerank one request (everything but the query and the documents).

    ``kind``: ``"documents"`` (the rerank routes: long documents split into windows, the cost cap applies)
    or ``"candidates"`` (/search chunks: ``rerank_search_windows`` windows each, no cost cap).
    ``max_tokens_per_doc``: tokens of each document read (default and cap: ``rerank_max_tokens_per_doc``).
    ``truncate`` (TEI): None splits long documents; True scores the first window only; False refuses a
    document that does not fit the model with the query. ``deadline_s``: how long the caller waits.
    ``field``: the request's name for the documents, for error messages. ``instruction``: what an LLM
    reranker is told relevance means (None: the model's default; a backend without instructions refuses
    one, 422); part of the score cache's key.
    """

    kind: Literal["documents", "candidates"] = "documents"
    max_tokens_per_doc: int | None = None
    truncate: bool | None = None
    deadline_s: float | None = None
    field: str = "documents"
    instruction: str | None = None


@dataclass(frozen=True)
class RerankUsage:
    pairs: int  # (query, window) pairs scored: the unit of work
    tokens: int | None  # tokens of those pairs as the model reads them (None: the backend reads documents)


@dataclass(frozen=True)
class RerankTimings:
    tokenize_ms: float  # planning the windows
    queue_ms: float  # waiting for batches, summed over the request's chunks
    inference_ms: float  # the request's batches' compute time


@dataclass(frozen=True)
class RerankResult:
    """One score per document, in input order; the best window's character span where a document was split
    (None where not); windows scored per document; usage, timings and how many pairs the cache answered."""

    scores: list[float]
    spans: list[tuple[int, int] | None]
    windows: list[int]
    usage: RerankUsage
    timings: RerankTimings
    cache_hits: int


@dataclass(frozen=True)
class _Windows:  # the step: plan windows (tokenizer work: off the event loop)
    query: str
    documents: Sequence[str]
    options: RerankOptions


@dataclass(frozen=True)
class _Turn:  # the step: wait for the request's next turn; the answer is its chunk's size
    ticket: Ticket


@dataclass(frozen=True)
class _Chunk:  # the step: score one chunk (through the batch queue); the answer is a Part or its error
    item: Item


_Step = _Windows | _Turn | _Chunk
Submit = Callable[[Item], Awaitable[Part | BaseException]]


class RerankEngine:
    """One backend and everything around it (module docstring). ``submit``: how the async path sends a
    chunk to a batch (the Reranker deployment's ``@serve.batch`` method); default: ``run_batch`` alone."""

    def __init__(
        self, backend: RerankBackend, config: RerankerConfig, *, submit: Submit | None = None
    ) -> None:
        self.backend, self.config = backend, config
        self.cache = cache_for(backend, config)
        self.scorer: RerankBackend = backend if self.cache is None else CachedReranker(backend, self.cache)
        self.windower = windower_for(backend, config)
        self.scheduler = Scheduler(config.rerank_chunk_pairs, config.rerank_chunk_ms / 1e3)
        self.stats = EngineStats()
        self.request_cap, self.pair_cap = 16, 1 << 30  # the batch caps (the deployment's user_config)
        self.on_batch: Callable[[BatchReport], None] | None = None
        self._submit = submit or self._submit_alone
        self._batch_ids = itertools.count(1)

    @property
    def enabled(self) -> bool:
        return self.backend.enabled

    def set_batch_caps(self, max_batch_size: int, max_pairs_per_batch: int) -> None:
        """The caps of one batch: requests and pairs (the second also caps one request's chunk)."""
        self.request_cap, self.pair_cap = max_batch_size, max_pairs_per_batch
        self.scheduler.chunk_cap = max(1, min(max_pairs_per_batch, self.config.rerank_chunk_pairs))

    # -- the front door ------------------------------------------------------------------------------
    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        options: RerankOptions | None = None,
        *,
        instruction: str | None = None,
    ) -> RerankResult:
        """Rerank in an event loop: windows planned in a thread, chunks through ``submit``. ``instruction``
        (when not None) replaces ``options.instruction``."""

        async def do(step: _Step) -> Any:
            if isinstance(step, _Windows):
                return await asyncio.to_thread(self._plan, step)
            try:
                if isinstance(step, _Turn):
                    return await self.scheduler.turn(step.ticket)
                return await self._submit(step.item)
            except asyncio.CancelledError:  # the caller went away (disconnect, the ingress's timeout)
                self.stats.count(cancelled=1)
                raise

        policy = self._policy(query, documents, _with_instruction(options, instruction))
        try:
            return await run_async(policy, do)
        finally:
            policy.close()  # a cancelled request gives its place back at once

    def rerank_sync(
        self,
        query: str,
        documents: Sequence[str],
        options: RerankOptions | None = None,
        *,
        instruction: str | None = None,
    ) -> RerankResult:
        """Rerank in this thread: the same policy, each chunk scored by ``score_items`` alone."""

        def do(step: _Step) -> Any:
            if isinstance(step, _Windows):
                return self._plan(step)
            if isinstance(step, _Turn):
                return self.scheduler.size_alone(step.ticket)
            return self.score_items([step.item])[0]

        policy = self._policy(query, documents, _with_instruction(options, instruction))
        try:
            return run_sync(policy, do)
        finally:
            policy.close()

    # -- the policy ----------------------------------------------------------------------------------
    def _policy(
        self, query: str, documents: Sequence[str], opt: RerankOptions
    ) -> Generator[_Step, Any, RerankResult]:
        if not self.backend.enabled:
            raise RerankerError("reranking is disabled (RAG_RERANKER=none)")
        opt = self._check_instruction(opt)
        t0 = time.perf_counter()
        windows = self.config.rerank_search_windows
        split = opt.kind == "documents" or windows > 1
        plan: Plan | None = None
        if split and self.windower is not None and documents:
            plan = yield _Windows(query, documents, opt)
        tokenize_ms = (time.perf_counter() - t0) * 1e3
        if plan is not None and opt.kind == "documents":
            self._check_cost(plan)
        texts = plan.texts if plan is not None else list(documents)
        parts: list[Part] = []
        if texts:
            parts = yield from self._chunks(query, texts, opt.deadline_s, opt.instruction)
        scores = [s for p in parts for s in p.scores]
        batches = {p.batch: p.batch_ms for p in parts}
        timings = RerankTimings(tokenize_ms, sum(p.queue_ms for p in parts), sum(batches.values()))
        hits = sum(p.cache_hits for p in parts)
        if plan is None:  # one pair per document
            n = len(scores)
            return RerankResult(scores, [None] * n, [1] * n, RerankUsage(n, None), timings, hits)
        mode = self.config.rerank_long_documents
        docs = plan.combine(scores, mode)
        usage = RerankUsage(plan.n_pairs, plan.tokens)
        spans = [d.span for d in docs]
        return RerankResult([d.score for d in docs], spans, [d.windows for d in docs], usage, timings, hits)

    def _check_instruction(self, opt: RerankOptions) -> RerankOptions:
        """A request's instruction, checked: 422 for a backend that takes none, an empty one, or one that
        leaves no room for a document; the model's default itself becomes None (one cache entry)."""
        instr = opt.instruction
        if instr is None:
            return opt
        default = self.backend.default_instruction
        if default is None:
            name = self.backend.info().get("backend")
            raise InvalidInput(
                f"instruction is for LLM rerankers; this model ({name}) takes none: leave instruction out, "
                "or choose an LLM reranker model"
            )
        if not instr.strip():
            raise InvalidInput("instruction is empty: leave it out for the model's default instruction")
        if instr == default:
            return replace(opt, instruction=None)
        room = self.backend.max_length - self.backend.pair_overhead(instr)
        if room < MIN_WINDOW:
            raise InvalidInput(
                f"the instruction leaves {max(room, 0)} of the model's {self.backend.max_length} tokens for "
                f"the query and the document (at least {MIN_WINDOW} needed): shorten the instruction"
            )
        return opt

    def _plan(self, step: _Windows) -> Plan:
        assert self.windower is not None
        opt = step.options
        specials = self.backend.pair_overhead(opt.instruction)
        if opt.kind == "candidates":
            return self.windower.plan(
                step.query, step.documents, max_windows=self.config.rerank_search_windows, specials=specials
            )
        first = opt.truncate is True or self.config.rerank_long_documents == "first"
        return self.windower.plan(
            step.query,
            step.documents,
            max_tokens_per_doc=opt.max_tokens_per_doc,
            max_windows=1 if first else None,
            too_long="error" if opt.truncate is False else "split",
            field=opt.field,
            specials=specials,
        )

    def _check_cost(self, plan: Plan) -> None:
        """The per-request cost cap (tokens of all pairs, as the model reads them): 422 before any work."""
        cap = self.config.rerank_max_request_tokens
        if plan.tokens > cap:
            self.stats.count(refused_cost=1)
            raise InvalidInput(
                f"this rerank request would cost {plan.tokens} tokens ({plan.n_pairs} query-window pairs), "
                f"more than the per-request cap of {cap} tokens (RAG_RERANK_MAX_REQUEST_TOKENS): send fewer "
                "or shorter documents, lower max_tokens_per_doc, or split the request"
            )

    def _chunks(
        self, query: str, texts: list[str], deadline_s: float | None, instruction: str | None = None
    ) -> Generator[_Step, Any, list[Part]]:
        """Admission, then the pairs one chunk per turn; stops between chunks past ``deadline_s``."""
        n = len(texts)
        try:
            ticket = self.scheduler.admit(n, deadline_s)
        except Exception:
            self.stats.count(refused_overloaded=1)
            raise
        expires_at = time.perf_counter() + deadline_s if deadline_s is not None else None
        self.stats.count(requests=1, pairs_requested=n)
        parts: list[Part] = []
        done = 0
        try:
            while done < n:
                if expires_at is not None and time.perf_counter() >= expires_at:
                    self.stats.count(expired=1)
                    raise StageTimeout(
                        f"the rerank request passed its {deadline_s:g}s deadline after {done} of {n} pairs; "
                        "stopped (retry later, send fewer documents, or add Reranker replicas)",
                        retry_after_s=1.0,
                    )
                size = yield _Turn(ticket)
                chunk = tuple(texts[done : done + size])
                item = Item(
                    query,
                    chunk,
                    self.request_cap,
                    self.pair_cap,
                    time.perf_counter(),
                    expires_at,
                    ticket.id,
                    instruction,
                )
                part = yield _Chunk(item)
                if isinstance(part, BaseException):  # this request's own failure (see score_items)
                    raise part
                parts.append(part)
                done += len(chunk)
                self.scheduler.scored(ticket, len(chunk))
        finally:
            self.scheduler.finish(ticket)
            self.stats.count(pairs_dropped=n - done)
        return parts

    # -- batches -------------------------------------------------------------------------------------
    async def _submit_alone(self, item: Item) -> Part | BaseException:
        return (await self.run_batch([item]))[0]

    async def run_batch(
        self, items: list[Item], before: Callable[[], Awaitable[None]] | None = None
    ) -> list[Part | BaseException]:
        """One batch, in an event loop: a turn of the scheduler. Items past their deadline are dropped
        unscored; ``before`` runs first (the deployment's chaos knobs); the model runs in a thread."""
        start = time.perf_counter()
        self.scheduler.batch_started(items)
        try:
            out: list[Part | BaseException | None] = [None] * len(items)
            live = []
            for k, it in enumerate(items):
                if it.expires_at is not None and start >= it.expires_at:
                    self.stats.count(expired_items=1)
                    out[k] = StageTimeout(
                        "the rerank request passed its deadline while queued; not scored (retry later)",
                        retry_after_s=1.0,
                    )
                else:
                    live.append(k)
            if live:
                if before is not None:
                    await before()
                scored = await asyncio.to_thread(self.score_items, [items[k] for k in live], start)
                for k, part in zip(live, scored, strict=True):
                    out[k] = part
            return [p for p in out if p is not None]
        finally:
            self.scheduler.batch_finished()

    def score_items(self, items: list[Item], start: float | None = None) -> list[Part | BaseException]:
        """Score a batch in one backend call; if that fails, each item alone, so only the bad one fails.
        Blocking (a worker thread in the service). ``start``: when the batch started (default: now)."""
        start = time.perf_counter() if start is None else start
        try:
            return list(self._score(items, start))
        except Exception:
            if len(items) == 1:
                raise
        out: list[Part | BaseException] = []
        for it in items:
            try:
                out.extend(self._score([it], time.perf_counter()))
            except Exception as e:
                out.append(e)
        return out

    def _score(self, items: list[Item], start: float) -> list[Part]:
        pairs = ValidPairs((it.query, d) for it in items for d in it.documents)
        batch = next(self._batch_ids)
        try:
            if all(it.instruction is None for it in items):
                scores = self.scorer.score(pairs)
            else:  # items of several requests: each pair under its own request's instruction
                scores = self.scorer.score(pairs, [it.instruction for it in items for _ in it.documents])
        except RerankerError:
            raise
        except Exception as e:
            raise RerankerError(f"reranker failed: {type(e).__name__}: {e}") from e
        if len(scores) != len(pairs):
            raise RerankerError(f"reranker returned {len(scores)} scores for {len(pairs)} pairs")
        batch_ms = (time.perf_counter() - start) * 1e3
        queued = [(start - it.enqueued_at) * 1e3 for it in items]
        self._record(items, scores, queued, batch_ms)
        out, i = [], 0
        for it, q_ms in zip(items, queued, strict=True):
            k = len(it.documents)
            out.append(Part(scores[i : i + k], q_ms, batch, batch_ms, sum(scores.cached[i : i + k])))
            i += k
        return out

    def _record(self, items: list[Item], scores: Scores, queued: list[float], batch_ms: float) -> None:
        t = scores.timings
        self.scheduler.observe(
            len(scores) - t.cache_hits, batch_ms / 1e3, (t.tokenize_ms + t.inference_ms) / 1e3
        )
        self.stats.batch(len(items), len(scores), batch_ms)
        if self.on_batch is not None:
            self.on_batch(BatchReport(len(items), len(scores), t, batch_ms, queued, self.cache))

    # -- what it is ----------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The backend's facts and the engine's configuration (GET /info; no secrets)."""
        c = self.config
        return {
            **self.backend.info(),
            "score_cache": self.cache.info() if self.cache is not None else {"enabled": False},
            "long_documents": {
                "aggregation": c.rerank_long_documents,
                "max_tokens_per_doc": c.rerank_max_tokens_per_doc,
                "window_overlap": c.rerank_window_overlap,
                "search_windows": c.rerank_search_windows,
                "split": self.windower is not None,
            },
            "chunk_pairs": c.rerank_chunk_pairs,
            "chunk_ms": c.rerank_chunk_ms,
            "max_request_tokens": c.rerank_max_request_tokens,
            "config": c.public(),
        }


def _with_instruction(options: RerankOptions | None, instruction: str | None) -> RerankOptions:
    opt = options or RerankOptions()
    return opt if instruction is None else replace(opt, instruction=instruction)
