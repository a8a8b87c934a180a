"""The two drivers of the house's generator policies, written once for every policy.

A policy is a generator that does no I/O: it yields each step it needs done (embed, search, rerank, send a
request, sleep) and receives the step's result, or has the step's error thrown in, so that deciding what to do
next (degrade, retry, give up) is plain code that runs the same whatever executes the steps. A driver executes
the steps:

- ``run_async(policy, do)`` awaits ``do(step)`` for each step;
- ``run_sync(policy, do)`` calls a blocking ``do(step)``. It runs ``run_async``'s loop with a coroutine that
  never suspends, so the two cannot drift apart, and it needs no event loop (it works inside a running one).

``throw`` names the errors a policy handles: those are thrown into it; any other error from ``do`` ends the
run as it is. The policies: ``rag.search`` (two-stage search), ``rag.rerank_engine`` (a rerank request's
chunks), ``rag.client._retry`` (one HTTP exchange with retries).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

__all__ = ["run_async", "run_sync"]

R = TypeVar("R")
Errors = type[BaseException] | tuple[type[BaseException], ...]


async def run_async(
    policy: Generator[Any, Any, R], do: Callable[[Any], Awaitable[Any]], throw: Errors = Exception
) -> R:
    """Drive ``policy`` with an async ``do(step)``; its ``throw`` errors go back into the policy."""
    try:
        step = next(policy)
        while True:
            try:
                result = await do(step)
            except throw as e:
                step = policy.throw(e)
            else:
                step = policy.send(result)
    except StopIteration as stop:
        return stop.value


def run_sync(policy: Generator[Any, Any, R], do: Callable[[Any], Any], throw: Errors = Exception) -> R:
    """Drive ``policy`` with a blocking ``do(step)``: ``run_async``'s loop, with nothing to wait for."""

    async def call(step: Any) -> Any:
        return do(step)

    coro = run_async(policy, call, throw)
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("run_sync: a step suspended; use run_async")
