"""The ingress's calls to the other deployments: timeouts, cancellation, Ray's failures, circuit breakers.

Every handle call goes through ``StageCalls.call``: it has a timeout, cancels the request when the timeout
fires, and turns Ray's own failures (queue full, replica gone, timeout) into ``rag.errors`` types that the
ingress's one error table (``deployments.api.errors``) maps to HTTP statuses.

Each stage has a ``Breaker`` (``deployments._breaker``): a failure that says the stage has no live replica
(Ray's actor-died and unavailable errors; for embed and retrieve also a timeout; for retrieve a database that
cannot be reached) opens it, and while it is open calls to that stage fail at once (``StageUnavailable``, or
the database's own ``StoreUnavailable``) instead of queueing in Serve's router until a new replica is up. The
search policy hears that as any other rerank failure (dense order, ``reason="reranker_error"``); embed and
retrieve answer 503 + Retry-After. A background probe (the stage's ``ready()``, every ``PROBE_EVERY_S``)
closes it. Serve's router does not fail a request while a deployment has no replica, it holds it until a new
one is up, so a call still pending reads its handle's router every ``WATCH_EVERY_S`` (empty once a call to
the dead replica failed: at once) and, past ``SUSPECT_AFTER_S``, asks the controller too (``serve.status``,
shared for ``STATUS_MAX_AGE_S``: it sees a death only at its next health check); no live replica opens the
breaker and fails that call too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments._breaker import (
    PROBE_EVERY_S,
    STATUS_MAX_AGE_S,
    SUSPECT_AFTER_S,
    WATCH_EVERY_S,
    Breaker,
    looks_dead,
    routable_replicas,
    running_replicas,
)
from rag.errors import Overloaded, RagError, StageTimeout, StageUnavailable, StoreUnavailable

__all__ = ["STAGES", "StageCalls", "as_rag_error"]

log = logging.getLogger("ray.serve")

STAGES = ("embed", "retrieve", "rerank")


def as_rag_error(stage: str, err: BaseException, timeout_s: float) -> BaseException:
    """Ray's failures -> rag.errors types; a RagError raised in a replica -> that error itself."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
        RequestCancelledError,
    )

    if isinstance(err, RayTaskError) and isinstance(getattr(err, "cause", None), BaseException):
        cause = err.cause
        if isinstance(cause, RagError | BackPressureError):
            err = cause
    if isinstance(err, RagError):
        return err
    if isinstance(err, asyncio.TimeoutError | TimeoutError):
        return StageTimeout(
            f"the {stage} stage did not answer within {timeout_s:g}s: the service is overloaded, retry later",
            retry_after_s=1.0,
        )
    if isinstance(err, BackPressureError):
        return Overloaded(
            f"the {stage} stage's queue is full ({err.message}): retry later",
            retry_after_s=err.retry_after_s or 1.0,
        )
    if isinstance(
        err, DeploymentUnavailableError | ReplicaUnavailableError | RayActorError | RequestCancelledError
    ):
        return StageUnavailable(f"the {stage} stage is unavailable ({type(err).__name__}): retry later")
    return err  # a bug: the error table answers 500


class StageCalls:
    """Handle calls to the three stages (DeploymentHandles, or fakes with the same methods in tests)."""

    def __init__(
        self,
        embedder: DeploymentHandle,
        retriever: DeploymentHandle,
        reranker: DeploymentHandle,
        ready_s: float,
    ) -> None:
        self.embedder, self.retriever, self.reranker = embedder, retriever, reranker
        self.ready_s = ready_s  # the timeout of ready() probes and of controller questions
        self.breakers = {stage: Breaker(stage) for stage in STAGES}
        self._running: dict[tuple[str, str], int] = {}
        self._running_at = 0.0
        self._running_lock = asyncio.Lock()

    # -- circuit breakers --------------------------------------------------------------------------
    def _probe_target(self, stage: str) -> DeploymentHandle:
        return {"embed": self.embedder, "retrieve": self.retriever, "rerank": self.reranker}[stage]

    def _trip(self, stage: str, err: BaseException) -> None:
        b = self.breakers.get(stage)
        if b is None:
            return
        b.open(err)
        if b.probe is None or b.probe.done():
            b.probe = asyncio.get_running_loop().create_task(self._probe(b))

    async def _probe(self, b: Breaker) -> None:
        """Until the stage's ready() answers: then close the breaker."""
        handle, t = self._probe_target(b.stage), self.ready_s
        while b.is_open:
            await asyncio.sleep(PROBE_EVERY_S)
            response: Any = None
            try:
                response = handle.ready.remote()
                await asyncio.wait_for(_awaited(response), t)
            except Exception as e:
                if isinstance(e, asyncio.TimeoutError | TimeoutError):
                    _cancel(response)
                err = as_rag_error(b.stage, e, t)
                if isinstance(err, StoreUnavailable):  # the database's own words: "unreachable ..."
                    b.open(err)
                continue
            b.close()

    async def _no_live_replica(self, stage: str, pending_s: float) -> bool:
        """True only when the handle's router holds no replica, or (a call pending past ``SUSPECT_AFTER_S``)
        Serve's controller says the stage's deployment has none."""
        handle = self._probe_target(stage)
        if routable_replicas(handle) == 0:
            return True
        if pending_s < SUSPECT_AFTER_S:
            return False
        app, name = getattr(handle, "app_name", None), getattr(handle, "deployment_name", None)
        if not (isinstance(app, str) and isinstance(name, str)):  # a fake handle (tests): nothing to ask
            return False
        async with self._running_lock:
            if time.monotonic() - self._running_at > STATUS_MAX_AGE_S:
                try:
                    self._running = await asyncio.wait_for(asyncio.to_thread(running_replicas), self.ready_s)
                except Exception as e:  # the controller is busy or restarting (or slow): no verdict
                    log.warning("could not ask Serve's controller for replica states: %s", e)
                    return False
                self._running_at = time.monotonic()
        return self._running.get((app, name), 1) == 0

    async def _watched(self, stage: str, response: Any, timeout_s: float) -> Any:
        """``await response`` within ``timeout_s``; fail at once if the stage turns out to have no replica."""
        task = asyncio.ensure_future(_awaited(response))
        try:
            start = time.monotonic()
            deadline = start + timeout_s
            # every WATCH_EVERY_S while pending: the router knows a death at once, the controller in seconds
            while stage in self.breakers and deadline - time.monotonic() > WATCH_EVERY_S:
                done, _ = await asyncio.wait({task}, timeout=WATCH_EVERY_S)
                if done:
                    break
                if await self._no_live_replica(stage, time.monotonic() - start):
                    _cancel(response)
                    err = StageUnavailable(
                        f"the {stage} stage has no running replica (Serve is starting one): retry later",
                        retry_after_s=PROBE_EVERY_S,
                    )
                    self._trip(stage, err)
                    raise err
            return await asyncio.wait_for(task, max(0.0, deadline - time.monotonic()))
        finally:
            if not task.done():
                task.cancel()

    # -- handle calls ------------------------------------------------------------------------------
    async def call(
        self,
        stage: str,
        response: Any,
        timeout_s: float,
        *,
        count_errors: bool = True,
        timeout_is_error: bool = True,
    ) -> Any:
        """Await a handle call with a timeout (cancelling it when the timeout fires); errors as rag.errors."""

        breaker = self.breakers.get(stage)
        if breaker is not None and breaker.is_open:  # no live replica: fail now, not after the timeout
            _cancel(response)
            refusal = breaker.refusal()
            metrics.stage_error(stage, refusal, count=count_errors)
            raise refusal
        try:
            return await self._watched(stage, response, timeout_s)
        except Exception as e:
            if isinstance(e, asyncio.TimeoutError | TimeoutError):
                _cancel(response)
            err = as_rag_error(stage, e, timeout_s)
            # ready()/info() time out sooner than traffic does (count_errors=False): no sign of death
            traffic = count_errors and timeout_is_error
            if looks_dead(stage, e, err) and (traffic or not isinstance(err, StageTimeout)):
                self._trip(stage, err)
            counted = count_errors and (timeout_is_error or not isinstance(err, StageTimeout))
            metrics.stage_error(stage, err, count=counted)
            if err is e:
                raise
            raise err from e


async def _awaited(response: Any) -> Any:
    return await response


def _cancel(response: Any) -> None:
    """Cancel a pending handle call (a DeploymentResponse; test fakes may have no ``cancel``)."""
    cancel = getattr(response, "cancel", None)
    if cancel is not None:
        cancel()
