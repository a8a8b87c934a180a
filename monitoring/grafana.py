"""Grafana dashboard model primitives (panels, targets, variables, layout); imports no ``ray``.

Produces the JSON model a stock Grafana (10.x/11.x) imports unchanged: every panel's datasource is the
``${datasource}`` variable (type ``prometheus``), so the importer picks any Prometheus datasource.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = [
    "DS",
    "SCHEMA_VERSION",
    "dashboard_model",
    "layout",
    "panel_targets",
    "query_variable",
    "row",
    "stat",
    "table",
    "targets",
    "timeseries",
]

SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}

Query = tuple[str, str]  # (PromQL, legend format)


def _target(expr: str, legend: str, ref: str, *, instant: bool = False, table: bool = False) -> dict:
    t: dict[str, Any] = {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "refId": ref,
    }
    if table:
        t["format"] = "table"
    return t


def targets(*queries: Query) -> list[dict]:
    """Range-query targets with refIds A, B, C, ..."""
    return [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)]


def timeseries(
    title: str, desc: str, queries: list[Query], unit: str = "short", *, w: int = 12, h: int = 8
) -> dict:
    custom = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 10,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "none", "group": "A"},
    }
    legend = {
        "displayMode": "table",
        "placement": "bottom",
        "showLegend": True,
        "calcs": ["mean", "max", "lastNotNull"],
    }
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"h": h, "w": w},
        "targets": targets(*queries),
        "fieldConfig": {
            "defaults": {"unit": unit, "min": 0, "custom": custom, "color": {"mode": "palette-classic"}},
            "overrides": [],
        },
        "options": {"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def stat(title: str, desc: str, expr: str, unit: str, *, steps: list[tuple[float | None, str]]) -> dict:
    """A single-value panel; ``steps``: (threshold, colour) from the lowest (None) up."""
    return {
        "type": "stat",
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"h": 4, "w": 6},
        "targets": targets((expr, "")),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "thresholds"},
                "thresholds": {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "textMode": "auto",
            "orientation": "auto",
        },
    }


def table(title: str, desc: str, expr: str, *, w: int = 24, h: int = 6) -> dict:
    """An instant query shown as a table of label values (e.g. an info gauge)."""
    return {
        "type": "table",
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"h": h, "w": w},
        "targets": [_target(expr, "", "A", instant=True, table=True)],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True, "cellHeight": "sm"},
        "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}],
    }


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24}, "panels": []}


def layout(panels: list[dict]) -> list[dict]:
    """Give panels unique ids and x/y: a row spans the width, panels flow left to right and wrap."""
    x = y = line_h = 0
    for i, p in enumerate(panels, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if p["type"] == "row" or x + w > 24:
            y, x, line_h = y + line_h, 0, 0
        p["id"] = i
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        if p["type"] == "row":
            y += h
        else:
            x += w
            line_h = max(line_h, h)
    return panels


def query_variable(name: str, label: str, query: str) -> dict:
    """A multi-select variable from ``label_values(...)`` with an All option (regex ``.*``)."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": query,
        "current": {},
        "hide": 0,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "options": [],
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
    }


def dashboard_model(
    *, uid: str, title: str, description: str, tags: list[str], panels: list[dict], variables: list[dict]
) -> dict:
    """A complete dashboard: a ``datasource`` variable first, then ``variables``; panels laid out."""
    datasource = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }
    annotation = {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
    return {
        "annotations": {"list": [annotation]},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": layout(panels),
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": tags,
        "templating": {"list": [datasource, *variables]},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


def panel_targets(dash: dict) -> Iterator[tuple[dict, dict]]:
    """(panel, target) for every query of every non-row panel, collapsed rows' panels included."""
    for p in dash["panels"]:
        for q in [p, *p.get("panels", [])]:
            if q["type"] != "row":
                for t in q.get("targets", []):
                    yield q, t
