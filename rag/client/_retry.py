"""One HTTP exchange with bounded retries, written once for ``Client`` and ``AsyncClient``.

The policy is a generator in the style of ``rag/search.py``: ``exchange`` yields what it needs done
(``Send`` a request, ``Sleep`` before the next try) and receives each send's ``httpx.Response`` (or its
transport error, thrown in). It does no I/O itself; ``run_sync`` and ``run_async`` drive it, with a blocking
or an awaitable ``do(step)``, so the two clients differ only by ``await``.

What is retried (``Call.idempotent`` and ``Call.retry`` both true):

- a 503 or a 429: the service (or a proxy in front of it) says "not now"; the wait is at least its
  ``Retry-After`` (seconds or an HTTP date) plus a jitter, else a jittered exponential backoff;
- a connection that could not be made, or that closed before any answer (nothing was computed for it).

Never retried: a request that timed out waiting for its answer (the service may still be working on it, and
a second copy would double the load that made it slow), and every other status. Tries are bounded by
``RetryPolicy.attempts`` and the whole exchange, waits included, by ``RetryPolicy.deadline_s``: a wait that
would end past the deadline is not started; the last error is raised at once instead.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from rag import drivers
from rag.client._errors import error_for_response, error_for_transport
from rag.errors import InvalidInput

__all__ = [
    "RETRY_STATUSES",
    "Call",
    "RetryPolicy",
    "Send",
    "Sleep",
    "exchange",
    "retry_after_s",
    "run_async",
    "run_sync",
]

RETRY_STATUSES = frozenset({429, 503})
# The request never reached the service, or the connection closed before any answer: safe to send again.
NOT_ANSWERED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


@dataclass(frozen=True)
class Call:
    """One API call: the request, and how its answer is treated."""

    method: str
    path: str
    json: Any = None
    idempotent: bool = True  # sending it twice changes nothing on the service (every route here: read-only)
    retry: bool = True  # whether a retry is wanted at all (a readiness probe reports the present instead)
    stream: bool = False  # hand back the open response (Server-Sent Events) instead of reading it whole
    answers: frozenset[int] = frozenset()  # error statuses that are answers, not errors (/readyz's 503)


@dataclass(frozen=True)
class Send:
    call: Call
    timeout_s: float  # this try's timeout: the client's, or what is left of the deadline if less


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = Send | Sleep


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a call is retried (see the module docstring for what is)."""

    attempts: int = 4  # tries in all, the first included (1 = never retry)
    backoff_s: float = 0.25  # the first backoff's bound; it doubles with each try ...
    max_backoff_s: float = 4.0  # ... up to this
    deadline_s: float | None = 120.0  # the whole call, tries and waits together (None: only ``attempts``)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InvalidInput(f"RetryPolicy.attempts must be at least 1 (1 = no retry), got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise InvalidInput("RetryPolicy.backoff_s and max_backoff_s must be >= 0")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise InvalidInput(f"RetryPolicy.deadline_s must be > 0 or None, got {self.deadline_s}")

    def delay(
        self, attempt: int, retry_after: float | None, uniform: Callable[[float, float], float]
    ) -> float:
        """The wait after try ``attempt`` (1-based): "full jitter", uniform in [0, the bound], where the bound
        doubles per try up to ``max_backoff_s``; on top of ``Retry-After`` when the answer had one, so that
        callers told the same number of seconds do not all come back in the same millisecond."""
        bound = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        jitter = uniform(0.0, bound) if bound > 0 else 0.0
        return jitter if retry_after is None else retry_after + jitter


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """``Retry-After`` in seconds (RFC 9110: delta-seconds or an HTTP date); None if absent or unreadable."""
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def exchange(
    call: Call,
    policy: RetryPolicy,
    timeout_s: float,
    *,
    base_url: str,
    uniform: Callable[[float, float], float] = random.uniform,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
) -> Generator[Step, Any, httpx.Response]:
    """The policy: try, and on a retryable failure wait and try again, within the bounds. Returns the answer
    (a 2xx, or a status in ``call.answers``); raises the failure as a ``rag.errors`` type otherwise."""
    deadline = None if policy.deadline_s is None else clock() + policy.deadline_s
    attempt = 0
    while True:
        attempt += 1
        wait_s = timeout_s if deadline is None else min(timeout_s, deadline - clock())
        retry_after: float | None = None
        try:
            response: httpx.Response = yield Send(call, wait_s)
        except httpx.TransportError as e:
            error = error_for_transport(e, base_url, wait_s)
            retryable = isinstance(e, NOT_ANSWERED)
            cause: BaseException | None = e
        else:
            status = response.status_code
            if 200 <= status < 300 or status in call.answers:
                return response
            retry_after = retry_after_s(response.headers, wall())
            error = error_for_response(status, response.headers, response.content, retry_after)
            retryable, cause = status in RETRY_STATUSES, None
        if not (retryable and call.idempotent and call.retry) or attempt >= policy.attempts:
            raise error from cause
        delay = policy.delay(attempt, retry_after, uniform)
        if deadline is not None and clock() + delay >= deadline:
            raise error from cause  # the next try could not start in time: no point waiting for it
        yield Sleep(delay)


# -- drivers ----------------------------------------------------------------------------------------------
async def run_async(
    policy: Generator[Step, Any, httpx.Response], do: Callable[[Step], Awaitable[Any]]
) -> httpx.Response:
    """Drive ``policy`` with an async ``do(step)`` (send the request / sleep); transport errors go back in."""
    return await drivers.run_async(policy, do, httpx.TransportError)


def run_sync(policy: Generator[Step, Any, httpx.Response], do: Callable[[Step], Any]) -> httpx.Response:
    """Drive ``policy`` with a blocking ``do(step)``; transport errors go back in."""
    return drivers.run_sync(policy, do, httpx.TransportError)
