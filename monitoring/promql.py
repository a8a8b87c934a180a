"""PromQL building blocks over the metric contract (``deployments.metrics``); imports no ``ray``.

``series()`` only knows our metrics (``METRICS``) and the Ray Serve built-ins we reuse
(``RAY_SERVE_METRICS``), so a dashboard or alert cannot name a series nobody exports.
Ray adds the ``ray_`` prefix on export.
"""

from __future__ import annotations

import re

from deployments.metrics import exported_series

__all__ = [
    "APP",
    "RATE_INTERVAL",
    "gauge",
    "mean",
    "metric_names",
    "quantile",
    "rate",
    "ratio_or_zero",
    "series",
    "substitute",
]

APP = 'application=~"$application"'  # the dashboard's application variable
RATE_INTERVAL = "$__rate_interval"  # Grafana's rate window; alerts pass a fixed window instead

_NAME = re.compile(r"\bray_[a-z0-9_]+")


def series(name: str, suffix: str = "") -> str:
    """Exported series for ``name`` (ours or a Ray built-in); ``suffix``: _bucket, _sum or _count."""
    names = exported_series(name)
    want = "ray_" + name + suffix if suffix else names[0]
    if want not in names:
        raise KeyError(f"{want} is not exported (known: {names})")
    return want


def _sel(matchers: tuple[str, ...]) -> str:
    return "{" + ",".join(matchers) + "}" if matchers else ""


def _by(by: str) -> str:
    return f" by ({by})" if by else ""


def rate(name: str, *matchers: str, by: str = "", window: str = RATE_INTERVAL, suffix: str = "") -> str:
    """Per-second rate of a counter (or a histogram's ``_count``), summed (by ``by``)."""
    return f"sum{_by(by)} (rate({series(name, suffix)}{_sel(matchers)}[{window}]))"


def quantile(q: float, name: str, *matchers: str, by: str = "", window: str = RATE_INTERVAL) -> str:
    """``q`` quantile of a histogram over ``window`` (by ``by``)."""
    group = ", ".join(["le", *([by] if by else [])])
    bucket = series(name, "_bucket")
    return f"histogram_quantile({q}, sum by ({group}) (rate({bucket}{_sel(matchers)}[{window}])))"


def mean(name: str, *matchers: str, by: str = "", window: str = RATE_INTERVAL) -> str:
    """Mean observation of a histogram over ``window``: rate of _sum / rate of _count."""
    s, g = _sel(matchers), _by(by)
    return (
        f"sum{g} (rate({series(name, '_sum')}{s}[{window}])) / "
        f"sum{g} (rate({series(name, '_count')}{s}[{window}]))"
    )


def gauge(agg: str, name: str, *matchers: str, by: str = "") -> str:
    """A gauge aggregated with ``agg`` (sum, max, ...) by ``by``."""
    return f"{agg}{_by(by)} ({series(name)}{_sel(matchers)})"


def ratio_or_zero(num: str, den: str) -> str:
    """``num / den`` that reads 0, not "no data", while ``num`` has no series yet (no errors so far)."""
    return f"({num} or {den} * 0) / {den}"


def metric_names(expr: str) -> set[str]:
    """The exported series an expression reads."""
    return set(_NAME.findall(expr))


def substitute(expr: str, *, application: str = ".*", rate_interval: str = "1m", model: str = ".*") -> str:
    """Resolve the dashboard's template variables the way Grafana would."""
    out = expr.replace("$application", application).replace("$__rate_interval", rate_interval)
    return out.replace("$model", model)
