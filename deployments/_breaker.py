"""Per-stage circuit breakers for the ingress's handle calls (used by ``deployments._service``); the breaker
itself is ``rag.breaker.Breaker``, which the store's read replicas use too.

A failure that says a stage has no live replica (``looks_dead``) opens its ``Breaker``; while it is open the
stage's calls fail at once with ``refusal()`` instead of waiting in Serve's router for a new replica. The
service's probe (the stage's ``ready()`` every ``PROBE_EVERY_S``) closes it.

Two views say whether a pending call's stage still has a replica. ``routable_replicas``
(``deployments._ray_compat``) reads the handle's own router (in this process, free to ask every
``WATCH_EVERY_S``): Serve's router drops a replica the moment a
call to it fails with ActorDiedError, then holds every later request until the controller reports a new one,
so an empty router means a dead stage at once. ``running_replicas`` asks Serve's controller (a call pending
past ``SUSPECT_AFTER_S``); the controller notices a death only at its next health check (seconds).
Both assume a stage is never scaled to zero on purpose (``min_replicas`` >= 1, as the shipped configs have).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from deployments._ray_compat import routable_replicas
from rag.breaker import Breaker as CoreBreaker
from rag.errors import RagError, StageTimeout, StageUnavailable, StoreUnavailable

__all__ = [
    "LIVE_STATES",
    "PROBE_EVERY_S",
    "STATUS_MAX_AGE_S",
    "SUSPECT_AFTER_S",
    "WATCH_EVERY_S",
    "Breaker",
    "looks_dead",
    "routable_replicas",
    "running_replicas",
]

log = logging.getLogger("ray.serve")

PROBE_EVERY_S = 1.0  # an open breaker asks its stage's ready() this often
WATCH_EVERY_S = 0.2  # a pending call reads its handle's router this often (a dict in this process)
SUSPECT_AFTER_S = 1.0  # a call pending this long asks Serve's controller whether its stage has a replica
STATUS_MAX_AGE_S = 0.5  # the controller's answer is shared by the calls within this long
LIVE_STATES = ("RUNNING", "UPDATING", "PENDING_MIGRATION")  # replicas that serve (UPDATING: user_config)


def looks_dead(stage: str, cause: BaseException, err: BaseException) -> bool:
    """Does this failure say that ``stage`` has no live replica (or, for retrieve, no database)?

    ``cause`` is what the handle raised, ``err`` its rag.errors translation. A cancelled request (the
    caller hung up) or a full queue is no such sign; a timeout is one for embed and retrieve only (a busy
    reranker times out too, and that degrades request by request)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    if isinstance(cause, RayActorError | DeploymentUnavailableError | ReplicaUnavailableError):
        return True
    if stage == "retrieve" and isinstance(err, StoreUnavailable):
        return True
    return stage != "rerank" and isinstance(err, StageTimeout)


@dataclass
class Breaker(CoreBreaker):
    """One stage's circuit breaker (see the module docstring; the logic is ``rag.breaker.Breaker``)."""

    log: ClassVar[logging.Logger] = log

    @property
    def stage(self) -> str:
        return self.name

    @property
    def label(self) -> str:
        return f"{self.name} stage"

    def reason(self, err: BaseException) -> RagError:
        """A database outage stays itself; anything else says the stage has no live replica."""
        if isinstance(err, StoreUnavailable):
            return err
        return StageUnavailable(
            f"the {self.stage} stage has no live replica ({type(err).__name__}: {err}); "
            f"retrying every {PROBE_EVERY_S:g}s",
            retry_after_s=PROBE_EVERY_S,
        )

    def refusal(self) -> RagError:
        """The error a call gets at once while the breaker is open (a fresh one: it is raised again)."""
        err = self.error
        assert err is not None
        if isinstance(err, StoreUnavailable):
            return StoreUnavailable(str(err))
        return StageUnavailable(str(err), retry_after_s=PROBE_EVERY_S)


def running_replicas() -> dict[tuple[str, str], int]:
    """(app, deployment) -> live replicas (``LIVE_STATES``), from Serve's controller (blocking: a thread)."""
    from ray import serve

    out: dict[tuple[str, str], int] = {}
    for app_name, app in serve.status().applications.items():
        for name, dep in app.deployments.items():
            states = {getattr(k, "value", k): v for k, v in (dep.replica_states or {}).items()}
            out[(app_name, name)] = sum(int(states.get(k, 0)) for k in LIVE_STATES)
    return out
