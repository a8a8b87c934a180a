"""Prometheus alerting rules for the RAG service, as code; imports no ``ray``.

Written to ``monitoring/alerts.yaml`` by ``python -m deployments.dashboards``. Thresholds are module
constants: the p99 target is the production (GPU reranker) objective; a CPU-only run is slower.
"""

from __future__ import annotations

from deployments.promql import gauge, quantile, rate

__all__ = ["ERROR_RATIO", "P99_TARGET_MS", "RERANK_ERROR_RATIO", "alert_rules"]

P99_TARGET_MS = 1000  # /search p99 objective (stage=total, inside the app)
ERROR_RATIO = 0.05  # share of HTTP requests answered 5xx
RERANK_ERROR_RATIO = 0.01  # share of /search answers served in dense order because the reranker failed
WINDOW = "5m"


def _rule(alert: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict:
    return {"alert": alert, "expr": expr, "for": for_, "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": description}}


def alert_rules() -> dict:
    """The rules file (``groups:``), ready for ``promtool check rules`` or a PrometheusRule's spec."""
    app = "application"
    requests = rate("serve_num_http_requests", by=app, window=WINDOW)
    errors = rate("serve_num_http_requests", 'status_code=~"5.."', by=app, window=WINDOW)
    searches = rate("rag_stage_latency_ms", 'stage="total"', by=app, window=WINDOW, suffix="_count")
    rerank_failed = rate("rag_rerank_skipped_total", 'reason="reranker_error"', by=app, window=WINDOW)
    p99 = quantile(0.99, "rag_stage_latency_ms", 'stage="total"', by=app, window=WINDOW)
    key = "application, deployment"
    target = gauge("max", "serve_autoscaling_target_replicas", by=key)
    ready = gauge("sum", "serve_deployment_replica_healthy", by=key)
    where = "{{ $labels.application }}"
    return {"groups": [{"name": "rag-serve", "rules": [
        _rule("RagSearchLatencyP99High", f"{p99} > {P99_TARGET_MS}", "10m", "warning",
              f"/search p99 above {P99_TARGET_MS} ms in {where}",
              "p99 of rag_stage_latency_ms{stage=\"total\"} is {{ $value | humanize }} ms over 5m. "
              "The per-stage panels show which stage grew: rerank (batching, replicas) or retrieve "
              "(DB pool)."),
        _rule("RagErrorRateHigh", f"{errors} / {requests} > {ERROR_RATIO}", "5m", "critical",
              f"Over {ERROR_RATIO:.0%} of requests fail with 5xx in {where}",
              "{{ $value | humanizePercentage }} of HTTP requests were answered 5xx over 5m. "
              "'Errors by stage and type' shows the failing stage."),
        _rule("RagRerankerErrors", f"{rerank_failed} / {searches} > {RERANK_ERROR_RATIO}", "5m", "warning",
              f"Searches fall back to dense order because the reranker fails in {where}",
              "{{ $value | humanizePercentage }} of /search answers over 5m skipped reranking with "
              "reason=reranker_error. Check the Reranker replicas' logs."),
        _rule("RagNoReadyReplicas", f"({target} > 0) unless on ({key}) ({ready} > 0)", "2m", "critical",
              "{{ $labels.deployment }} in " + where + " has no ready replica",
              "The Serve controller targets replicas for this deployment, but none is healthy."),
    ]}]}
