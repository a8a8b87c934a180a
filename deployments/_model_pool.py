"""The Reranker replica's models: one ``RerankEngine`` per served model, loaded on demand and evicted LRU.

Ray Serve's model multiplexing holds the engines: ``serve.multiplexed(max_num_models_per_replica=N)`` wraps
the loader, so a replica keeps at most ``rerank_models_per_replica`` models and evicts the least recently
used one to load another, and the ingress sends each request with ``handle.options(multiplexed_model_id=
name)`` so Serve's router prefers a replica that already holds the model. The replica reads the name with
``serve.get_multiplexed_model_id()`` (``deployments.reranker``).

Each served model has its own ``@serve.batch`` queue (``serve.batch`` applied to a per-model function, made
once per name), so a batch never mixes two models and each engine's scheduler paces its own batches. The
queue's function takes each item with a weak reference to the engine that issued it: an evicted engine is
freed once its last request ends, and a batch that meets two loads of one model (a reload while requests
were in flight) scores each engine's items with that engine. Every batch's model names are logged
(``batch_models``), which is how tests/test_multimodel.py shows that no batch mixed two.

A model that fails to load raises ``ModelUnavailable`` naming it (503 on the rerank routes, dense order on
/search); Ray does not cache the failure, so the next request for it loads again. The other models keep
serving: loads run in a thread, and requests for a loaded model never wait for Ray's load lock.

Outside a Serve replica (tests that run the deployment class in this process) there is no multiplexer: the
engines live in a dict, without eviction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ray import serve

from deployments import metrics
from deployments._args import RerankerUserConfig
from rag.errors import ModelUnavailable, RagError
from rag.rerank import make_reranker
from rag.rerank_engine import RerankEngine
from rag.rerank_schedule import Item, Part, batch_cost
from rag.settings import RerankModel, pick_rerank_model
from rag.stages import RerankerConfig

__all__ = ["MAX_CONCURRENT_BATCHES", "Loaded", "ModelPool"]

log = logging.getLogger("ray.serve")

# Config rule: max_ongoing_requests >= max_batch_size * MAX_CONCURRENT_BATCHES (2x leaves room to fill).
MAX_CONCURRENT_BATCHES = 1
BATCH_LOG = 2000  # batches remembered for stats()


class Loaded:
    """One loaded model: its engine and how long loading it took. Ray's multiplexer calls ``__del__`` when
    it evicts the model (its documented unload hook); so does Python when the last reference goes."""

    def __init__(self, name: str, engine: RerankEngine, load_s: float, on_evict: Callable[[Loaded], None]):
        self.name, self.engine, self.load_s = name, engine, load_s
        self._on_evict: Callable[[Loaded], None] | None = on_evict

    def __del__(self) -> None:
        on_evict, self._on_evict = self._on_evict, None
        if on_evict is not None:
            on_evict(self)


Before = Callable[[], Awaitable[None]]


class ModelPool:
    """The served models of one Reranker replica (module docstring)."""

    def __init__(self, config: RerankerConfig, user_config: RerankerUserConfig, before_batch: Before) -> None:
        self.entries: dict[str, RerankModel] = {m.name: m for m in config.served_models()}
        self.configs = config.model_configs()
        self.default = config.default_model
        self.strict = bool(config.rerank_models)  # unset: one model, whatever a request names
        self.user_config = user_config
        self.before_batch = before_batch
        self.loaded: dict[str, Loaded] = {}  # what this replica holds now (the multiplexer evicts)
        self.batch_models: deque[tuple[str, ...]] = deque(maxlen=BATCH_LOG)
        self.loads: dict[str, int] = dict.fromkeys(self.entries, 0)
        self._batchers: dict[str, Any] = {}
        self._multiplexed = _multiplexer(self._load, config.rerank_models_per_replica)
        self.max_loaded = config.rerank_models_per_replica if self._multiplexed is not None else None
        metrics.export_model_zeros(list(self.entries))
        # The default model is loaded now, so the replica is ready with it; the multiplexer takes it over
        # at its first request (until then it is simply held here).
        self._preloaded: Loaded | None = self._build(self.default)

    # -- which model ---------------------------------------------------------------------------------
    def name_of(self, requested: str | None) -> str:
        """The served model a request's name selects (the ingress already checked; this is the replica's
        own check, with the same 422)."""
        if not self.strict:
            return self.default
        return pick_rerank_model(list(self.entries.values()), requested)

    async def get(self, requested: str | None) -> Loaded:
        """The loaded model ``requested`` names (loading it, and evicting the LRU one, when needed)."""
        name = self.name_of(requested)
        if self._multiplexed is None:
            if name not in self.loaded:
                self.loaded[name] = await self._load(name)
            return self.loaded[name]
        if self._preloaded is not None:  # hand the start-up model to the multiplexer's LRU first
            await self._multiplexed(self._preloaded.name)
        return await self._multiplexed(name)

    def held(self) -> list[str]:
        """The names of the models this replica holds now."""
        names = set(self.loaded)
        if self._preloaded is not None:
            names.add(self._preloaded.name)
        return sorted(names)

    def engines(self) -> list[RerankEngine]:
        """Every engine this replica holds now (the preloaded default included)."""
        held = {id(x): x for x in self.loaded.values()}
        if self._preloaded is not None:
            held[id(self._preloaded)] = self._preloaded
        return [x.engine for x in held.values()]

    def peek(self, name: str) -> RerankEngine | None:
        """The engine of ``name`` when this replica holds it (no load, no LRU update)."""
        if self._preloaded is not None and self._preloaded.name == name:
            return self._preloaded.engine
        x = self.loaded.get(name)
        return x.engine if x is not None else None

    # -- loading -------------------------------------------------------------------------------------
    async def _load(self, name: str) -> Loaded:
        pre = self._preloaded
        if pre is not None and pre.name == name:
            self._preloaded = None
            self.loaded[name] = pre
            return pre
        loaded = await asyncio.to_thread(self._build, name)
        self.loaded[name] = loaded
        return loaded

    def _build(self, name: str) -> Loaded:
        """Load one model (blocking): its backend, its engine, its batch queue."""
        cfg = self.configs[name]
        t0 = time.perf_counter()
        try:
            backend = make_reranker(cfg)
        except Exception as e:
            metrics.model_load(name, ok=False)
            log.error("rerank model %r failed to load: %s", name, e)
            raise ModelUnavailable(
                f"rerank model {name!r} could not be loaded ({type(e).__name__}: {e}); the other models "
                "keep serving, and the next request for this one tries again"
            ) from e
        batcher = self._batcher(name)
        holder: list[weakref.ReferenceType[RerankEngine]] = []

        def submit(item: Item) -> Awaitable[Part | BaseException]:
            return batcher(item, holder[0])

        engine = RerankEngine(backend, cfg, submit=submit)
        holder.append(weakref.ref(engine))
        engine.on_batch = functools.partial(metrics.record_rerank_batch, model=name)
        u = self.user_config
        engine.set_batch_caps(u.max_batch_size, u.max_pairs_per_batch)
        load_s = time.perf_counter() - t0
        self.loads[name] += 1
        metrics.model_load(name, ok=True, seconds=load_s)
        metrics.model_info("reranker", {**backend.info(), "name": name})
        log.info("rerank model %r loaded in %.2fs", name, load_s)
        return Loaded(name, engine, load_s, self._evicted)

    def _evicted(self, loaded: Loaded) -> None:
        if self.loaded.get(loaded.name) is loaded:
            del self.loaded[loaded.name]
            with contextlib.suppress(Exception):  # at interpreter exit the metrics may be gone already
                metrics.model_unloaded(loaded.name)
                log.info("rerank model %r unloaded", loaded.name)

    # -- batches -------------------------------------------------------------------------------------
    def _batcher(self, name: str) -> Any:
        """The ``@serve.batch`` function of model ``name`` (one per name, reused across reloads)."""
        if name in self._batchers:
            return self._batchers[name]
        u = self.user_config

        async def score_batch(
            items: list[Item], engines: list[weakref.ReferenceType[RerankEngine]]
        ) -> list[Part | BaseException]:
            return await self._run_batch(name, items, engines)

        score_batch.__name__ = f"score_batch[{name}]"  # Serve's batch metrics' function_name
        batcher = serve.batch(
            max_batch_size=u.max_batch_size,
            batch_wait_timeout_s=u.batch_wait_timeout_s,
            max_concurrent_batches=MAX_CONCURRENT_BATCHES,
            batch_size_fn=batch_cost,
        )(score_batch)
        self._batchers[name] = batcher
        return batcher

    async def _run_batch(
        self, name: str, items: list[Item], refs: list[weakref.ReferenceType[RerankEngine]]
    ) -> list[Part | BaseException]:
        engines = [r() for r in refs]
        self.batch_models.append(tuple(sorted({self._name_of_engine(e, name) for e in engines})))
        groups: dict[int, list[int]] = {}
        for k, e in enumerate(engines):
            groups.setdefault(id(e), []).append(k)
        out: list[Part | BaseException | None] = [None] * len(items)
        for ks in groups.values():
            engine = engines[ks[0]]
            if engine is None:  # cannot happen: a waiting request holds its engine
                for k in ks:
                    out[k] = RagError(f"rerank model {name!r} was unloaded")
                continue
            for k, part in zip(ks, await engine.run_batch([items[k] for k in ks], before=self.before_batch),
                               strict=True):  # fmt: skip
                out[k] = part
        return [p if p is not None else RagError("unscored") for p in out]

    def _model_of(self, name: str) -> str:
        cfg = self.configs[name]
        return cfg.cohere_model if cfg.reranker == "cohere" else cfg.rerank_model

    def _name_of_engine(self, engine: RerankEngine | None, fallback: str) -> str:
        for n, cfg in self.configs.items():
            if engine is not None and engine.config is cfg:
                return n
        return fallback

    def reconfigure(self, user_config: RerankerUserConfig) -> None:
        """New batch knobs for every model's queue and engine (now and for later loads)."""
        self.user_config = user_config
        for name, batcher in self._batchers.items():
            user_config.apply(batcher, f"reranker[{name}]")
        for engine in self.engines():
            engine.set_batch_caps(user_config.max_batch_size, user_config.max_pairs_per_batch)

    # -- what it holds -------------------------------------------------------------------------------
    def pending_pairs(self) -> int:
        """Pairs admitted and not yet scored, over every model this replica holds (autoscaling)."""
        return sum(e.scheduler.pending_pairs() for e in self.engines())

    def describe(self) -> list[dict[str, Any]]:
        """Each served model: its entry, whether this replica holds it, and the last load time."""
        out = []
        for name, entry in self.entries.items():
            engine = self.peek(name)
            loaded = engine is not None
            d: dict[str, Any] = {
                "name": name,
                "default": name == self.default,
                "backend": entry.backend,
                "model": entry.model or self._model_of(name),
                "loaded": loaded,
                "loads": self.loads[name],
            }
            if entry.instruction is not None:
                d["instruction"] = entry.instruction
            if engine is not None:
                d["card"] = engine.backend.info()
            out.append(d)
        return out


def _multiplexer(load: Callable[[str], Awaitable[Loaded]], per_replica: int) -> Any:
    """``load`` wrapped by ``serve.multiplexed`` (an LRU of ``per_replica`` models), or None outside a
    Serve replica, where the multiplexer cannot run."""
    try:
        serve.get_replica_context()
    except Exception:  # RayServeException: not in a replica (the class run in-process by a test)
        return None

    async def load_model(model_id: str) -> Loaded:  # a plain function: Ray keeps its LRU on it
        return await load(model_id)

    return serve.multiplexed(max_num_models_per_replica=per_replica)(load_model)
