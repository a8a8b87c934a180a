"""Prometheus alerting rules for the RAG service, as code; imports no ``ray``.

Written to ``monitoring/alerts.yaml`` by ``python -m monitoring.dashboard``. Thresholds are module
constants: the p99 target is the production (GPU reranker) objective; a CPU-only run is slower.
"""

from __future__ import annotations

from dataclasses import dataclass

from monitoring.promql import gauge, quantile, rate

__all__ = ["ERROR_RATIO", "P99_TARGET_MS", "RERANK_ERROR_RATIO", "Alert", "alert_rules", "alerts"]

P99_TARGET_MS = 1000  # /search p99 objective (stage=total, inside the app)
ERROR_RATIO = 0.05  # share of HTTP requests answered 5xx
RERANK_ERROR_RATIO = 0.01  # share of /search answers served in dense order because the reranker failed
WINDOW = "5m"


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    signals: tuple[str, ...]  # the sub-expressions the condition compares: each must have data in a live app
    for_: str
    severity: str
    summary: str
    description: str

    def rule(self) -> dict:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity},
            "annotations": {"summary": self.summary, "description": self.description},
        }


def alerts() -> list[Alert]:
    app, key, where = "application", "application, deployment", "{{ $labels.application }}"
    requests = rate("serve_num_http_requests", by=app, window=WINDOW)
    errors = rate("serve_num_http_requests", 'status_code=~"5.."', by=app, window=WINDOW)
    error_ratio = f"({errors} or {requests} * 0) / {requests}"
    searches = rate("rag_stage_latency_ms", 'stage="total"', by=app, window=WINDOW, suffix="_count")
    rerank_failed = rate("rag_rerank_skipped_total", 'reason="reranker_error"', by=app, window=WINDOW)
    p99 = quantile(0.99, "rag_stage_latency_ms", 'stage="total"', by=app, window=WINDOW)
    target = f"{gauge('max', 'serve_autoscaling_target_replicas', by=key)} > 0"
    ready = gauge("sum", "serve_deployment_replica_healthy", by=key)
    return [
        Alert(
            "RagSearchLatencyP99High",
            f"{p99} > {P99_TARGET_MS}",
            (p99,),
            "10m",
            "warning",
            f"/search p99 above {P99_TARGET_MS} ms in {where}",
            'p99 of rag_stage_latency_ms{stage="total"} is {{ $value | humanize }} ms over 5m. '
            "The per-stage panels show which stage grew: rerank (batching, replicas) or retrieve "
            "(DB pool).",
        ),
        Alert(
            "RagErrorRateHigh",
            f"{error_ratio} > {ERROR_RATIO}",
            (error_ratio,),
            "5m",
            "critical",
            f"Over {ERROR_RATIO:.0%} of requests fail with 5xx in {where}",
            "{{ $value | humanizePercentage }} of HTTP requests were answered 5xx over 5m. "
            "'Errors by stage and type' shows the failing stage.",
        ),
        Alert(
            "RagRerankerErrors",
            f"{rerank_failed} / {searches} > {RERANK_ERROR_RATIO}",
            (rerank_failed, searches),
            "5m",
            "warning",
            f"Searches fall back to dense order because the reranker fails in {where}",
            "{{ $value | humanizePercentage }} of /search answers over 5m skipped reranking with "
            "reason=reranker_error. Check the Reranker replicas' logs.",
        ),
        Alert(
            "RagNoReadyReplicas",
            f"({target}) unless on ({key}) ({ready} > 0)",
            (target, ready),
            "2m",
            "critical",
            "{{ $labels.deployment }} in " + where + " has no ready replica",
            "The Serve controller targets replicas for this deployment, but none is healthy.",
        ),
    ]


def alert_rules() -> dict:
    """The rules file (``groups:``), ready for ``promtool check rules`` or a PrometheusRule's spec."""
    return {"groups": [{"name": "rag-serve", "rules": [a.rule() for a in alerts()]}]}
