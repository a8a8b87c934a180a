"""The per-stage circuit breaker and what counts as a dead stage (no cluster: Ray's real exception types)."""

from __future__ import annotations

import pytest
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from deployments._breaker import PROBE_EVERY_S, Breaker, looks_dead, routable_replicas
from deployments._service import as_rag_error
from rag.errors import Overloaded, StageTimeout, StageUnavailable, StoreUnavailable


def _verdict(stage: str, cause: BaseException) -> bool:
    return looks_dead(stage, cause, as_rag_error(stage, cause, timeout_s=5))


@pytest.mark.parametrize("stage", ["embed", "retrieve", "rerank"])
def test_a_dead_actor_or_no_deployment_opens_every_stage(stage: str) -> None:
    assert _verdict(stage, RayActorError())
    assert _verdict(stage, DeploymentUnavailableError("Reranker"))


@pytest.mark.parametrize("stage", ["embed", "retrieve", "rerank"])
def test_a_cancelled_call_or_a_full_queue_is_no_sign_of_death(stage: str) -> None:
    assert not _verdict(stage, RequestCancelledError("r1"))
    bp = BackPressureError(num_queued_requests=9, max_queued_requests=8)
    assert isinstance(as_rag_error(stage, bp, 5), Overloaded)
    assert not _verdict(stage, bp)


def test_a_timeout_opens_embed_and_retrieve_but_not_rerank() -> None:
    # A busy reranker times out too; that degrades request by request, not the whole stage.
    assert _verdict("embed", TimeoutError())
    assert _verdict("retrieve", TimeoutError())
    assert not _verdict("rerank", TimeoutError())


def test_an_unreachable_database_opens_retrieve_only() -> None:
    err = StoreUnavailable("database unreachable: connection refused")
    assert looks_dead("retrieve", err, err)
    assert not looks_dead("embed", err, err)


def test_open_refuses_at_once_with_a_retryable_error_and_close_clears_it() -> None:
    b = Breaker("rerank")
    assert not b.is_open
    b.open(RayActorError())
    assert b.is_open
    first, second = b.refusal(), b.refusal()
    assert isinstance(first, StageUnavailable) and first is not second  # a fresh error per refused call
    assert first.retry_after_s == PROBE_EVERY_S
    assert "no live replica" in str(first)
    opened = b.opened_at
    b.open(TimeoutError())  # already open: keeps the time it opened
    assert b.opened_at == opened
    b.close()
    assert not b.is_open and b.error is None


def test_a_database_outage_is_refused_as_the_database_error() -> None:
    b = Breaker("retrieve")
    b.open(StoreUnavailable("database unreachable: connection refused"))
    err = b.refusal()
    assert isinstance(err, StoreUnavailable) and "database unreachable" in str(err)
    assert not isinstance(err, StageTimeout)


def test_a_handle_without_a_readable_router_gives_no_verdict() -> None:
    class Fake:  # the fakes of the service tests, or a Ray whose router is laid out otherwise
        _router = None

    assert routable_replicas(object()) is None
    assert routable_replicas(Fake()) is None
