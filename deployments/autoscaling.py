"""Token-aware autoscaling: the Reranker scales on the (query, document) pairs it holds, not on requests.

A rerank request's cost is its pairs: ten requests of 1,000 documents and ten of 10 look the same to Ray's
request-count policy (``target_ongoing_requests``), so a burst of large calls queues behind one replica while
the autoscaler sees nothing unusual. The Reranker deployment reports ``pending_pairs`` (admitted, not
finished) from ``record_autoscaling_stats()``; ``PendingPairsPolicy`` asks for
``ceil(pending pairs / target)`` replicas. Ray wraps every custom policy
(``ray.serve.autoscaling_policy._apply_autoscaling_config``, Ray 2.60) with the same ``upscale_delay_s`` /
``downscale_delay_s``, up/downscaling factors and ``min_replicas`` / ``max_replicas`` bounds as its own
policy, so those keys of ``autoscaling_config`` keep their meaning.

In a Serve config (``serve_config.yaml``)::

    autoscaling_config:
      min_replicas: 1
      max_replicas: 8
      upscale_delay_s: 5
      downscale_delay_s: 300
      policy:
        policy_function: deployments.autoscaling:PendingPairsPolicy
        policy_kwargs: {target_pairs_per_replica: 3200}

Without the ``policy:`` block the deployment uses Ray's request-count policy. Ray imports this module in
the Serve controller and pickles it by value, so it imports nothing but Ray and the standard library.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

__all__ = ["PENDING_PAIRS", "POLICY", "PendingPairsPolicy", "pending_pairs_policy"]

log = logging.getLogger("ray.serve")

PENDING_PAIRS = "pending_pairs"  # the key of Reranker.record_autoscaling_stats()
POLICY = "deployments.autoscaling:PendingPairsPolicy"


def pending_pairs_policy(target_pairs_per_replica: float) -> dict[str, Any]:
    """The ``autoscaling_config.policy`` block of a Serve config for this policy."""
    PendingPairsPolicy(target_pairs_per_replica)  # fail here, not in the controller
    kwargs = {"target_pairs_per_replica": target_pairs_per_replica}
    return {"policy_function": POLICY, "policy_kwargs": kwargs}


class PendingPairsPolicy:
    """Replicas = total pending pairs / ``target_pairs_per_replica`` (Ray applies delays and bounds).

    Pairs of requests queued in handles (not yet at a replica, past ``max_ongoing_requests``) are estimated
    at the replicas' mean pairs per request. Until any replica has reported ``pending_pairs`` (just started,
    or a deployment without ``record_autoscaling_stats``) it decides as Ray's request-count policy does.
    """

    def __init__(self, target_pairs_per_replica: float = 3200) -> None:
        if (
            isinstance(target_pairs_per_replica, bool)
            or not isinstance(target_pairs_per_replica, int | float)
            or not target_pairs_per_replica > 0
        ):
            raise ValueError(
                "PendingPairsPolicy: policy_kwargs.target_pairs_per_replica must be a positive number of "
                f"(query, document) pairs, got {target_pairs_per_replica!r}"
            )
        self.target = float(target_pairs_per_replica)
        self._warned = False

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        state = dict(ctx.policy_state)
        reported = (ctx.aggregated_metrics or {}).get(PENDING_PAIRS) or {}
        if ctx.current_num_replicas == 0 or not reported:
            if not reported and ctx.current_num_replicas > 0 and not self._warned:
                self._warned = True
                log.warning(
                    "%s: no replica reports %r yet; scaling on request count until one does "
                    "(the deployment needs record_autoscaling_stats(), as deployments.reranker.Reranker has)",
                    ctx.deployment_name,
                    PENDING_PAIRS,
                )
            desired, _ = replica_queue_length_autoscaling_policy(ctx)
            return desired, state
        pairs = sum(reported.values())
        queued = ctx.total_queued_requests or 0.0
        running = max(ctx.total_num_requests - queued, 0.0)
        if queued > 0 and running > 0:
            pairs += queued * pairs / running
        desired = math.ceil(pairs / self.target) if pairs > 0 else 0
        state.update(pending_pairs=round(pairs, 1), desired_replicas=desired)
        return desired, state
