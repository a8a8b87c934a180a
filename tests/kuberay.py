"""What the KubeRay manifests ask of Ray, read from k8s/ (imported as ``kuberay``; tests/ is on sys.path).

Shared by tests/test_k8s.py (a model of Ray's resource-based placement over the rendered manifests) and the
multinode tier (tests/multinode.py starts one ``ray start`` per group with these resources).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
BASE_RAYSERVICE = K8S / "base" / "rayservice.yaml"
GPU_WORKERS_PATCH = K8S / "overlays" / "gpu" / "gpu-workers.yaml"
GPU_SERVE_PATCH = K8S / "overlays" / "gpu" / "serve-config.yaml"

__all__ = [
    "container_limit",
    "gpu_overlay_groups",
    "gpu_overlay_serve_config",
    "node_resources",
    "quantity",
    "ray_groups",
    "ray_resources_param",
]


def quantity(q: Any) -> float:
    """A Kubernetes quantity as a float (cores, bytes, or a plain count)."""
    s = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


def ray_resources_param(value: str) -> dict[str, float]:
    """KubeRay's rayStartParams 'resources' value ('"{\\"name\\": 1}"') as a dict."""
    inner = value.strip()
    assert inner.startswith('"') and inner.endswith('"'), f"resources must be a quoted JSON string: {value!r}"
    return json.loads(inner[1:-1].replace('\\"', '"'))


def ray_groups(rs: dict) -> list[tuple[str, dict]]:
    """A RayService's groups as (name, spec): ("head", headGroupSpec), then each worker group."""
    rc = rs["spec"]["rayClusterConfig"]
    return [("head", rc["headGroupSpec"])] + [(g["groupName"], g) for g in rc.get("workerGroupSpecs", [])]


def container_limit(g: dict, key: str) -> float:
    limits = g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    return quantity(limits[key]) if key in limits else 0.0


def node_resources(g: dict) -> dict[str, float]:
    """What a pod of this group advertises to Ray (KubeRay: rayStartParams, else the container's limits)."""
    params = g.get("rayStartParams") or {}
    res = {
        "CPU": float(params["num-cpus"]) if "num-cpus" in params else float(int(container_limit(g, "cpu"))),
        "GPU": float(params["num-gpus"]) if "num-gpus" in params else container_limit(g, "nvidia.com/gpu"),
    }
    if "resources" in params:
        res.update(ray_resources_param(params["resources"]))
    return res


def _load(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def gpu_overlay_groups() -> dict[str, dict[str, float]]:
    """The gpu overlay's groups -> the resources each pod advertises: the base RayService's head and CPU
    workers, plus the worker group that overlays/gpu/gpu-workers.yaml appends (tests/test_k8s.py checks
    that kustomize renders exactly this)."""
    groups = dict(ray_groups(_load(BASE_RAYSERVICE)))
    for op in _load(GPU_WORKERS_PATCH):
        if op["op"] == "add" and op["path"] == "/spec/rayClusterConfig/workerGroupSpecs/-":
            groups[op["value"]["groupName"]] = op["value"]
    return {name: node_resources(g) for name, g in groups.items()}


def gpu_overlay_serve_config() -> dict:
    """The RayService's serveConfigV2 in the gpu overlay, as k8s/generate.py rendered and committed it."""
    return yaml.safe_load(_load(GPU_SERVE_PATCH)["spec"]["serveConfigV2"])
