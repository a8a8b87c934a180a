"""serve_config.yaml and serve_config.cpu.yaml: Ray's own schema accepts them, the app builds from them the way
Serve builds it (typed args, defaults from Settings), and they follow the batching and sizing rules.
No Ray cluster is started.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments import embedder as embedder_mod
from deployments import reranker as reranker_mod
from deployments._args import AppArgs, EmbedderUserConfig, RerankerUserConfig
from deployments.launch import CPU_CONFIG, GPU_CONFIG, apply_settings

CONFIGS = [GPU_CONFIG, CPU_CONFIG]
DEPLOYMENTS = {"Ingress", "Embedder", "Retriever", "Reranker"}
CONCURRENT_BATCHES = {
    "Embedder": embedder_mod.MAX_CONCURRENT_BATCHES,
    "Reranker": reranker_mod.MAX_CONCURRENT_BATCHES,
}
USER_CONFIGS = {"Embedder": EmbedderUserConfig, "Reranker": RerankerUserConfig}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def deployments(cfg: dict) -> dict[str, dict]:
    return {d["name"]: d for d in cfg["applications"][0]["deployments"]}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_with_ray_schema(path):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(load(path))
    (app,) = schema.applications
    assert app.import_path == "deployments.app:build_app" and app.route_prefix == "/"
    assert {d.name for d in app.deployments} == DEPLOYMENTS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_app_builds_from_config_with_only_database_url_set(path, monkeypatch):
    """What Serve's controller does with the file: args dict -> AppArgs -> build_app -> the 4 deployments."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from deployments.app import build_app
    from rag.settings import SearchConfig, StoreConfig

    monkeypatch.setenv("RAG_DATABASE_URL", "postgresql://rag:secret@db.example:5432/rag")
    args = load(path)["applications"][0].get("args") or {}
    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    ingress = app._bound_deployment
    children = {a._bound_deployment.name: a._bound_deployment for a in ingress.init_args[:3]}
    assert {ingress.name, *children} == DEPLOYMENTS
    (retriever_args,) = children["Retriever"].init_args
    assert isinstance(retriever_args, StoreConfig)
    assert retriever_args.database_url == "postgresql://rag:secret@db.example:5432/rag"
    ingress_args = ingress.init_args[3]
    assert isinstance(ingress_args, SearchConfig) and ingress_args.collection == "default"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_batching_rules(path):
    for name, dep in deployments(load(path)).items():
        uc = dep.get("user_config")
        if name in USER_CONFIGS:
            cfg = USER_CONFIGS[name].model_validate(uc or {})
            need = cfg.max_batch_size * CONCURRENT_BATCHES[name]
            assert dep["max_ongoing_requests"] >= need, f"{path.name}: {name} max_ongoing_requests < {need}"
        else:
            assert uc is None, f"{name} has no user_config"
        assert dep.get("max_queued_requests", -1) > 0, f"{name}: bound the queue (503 + Retry-After past it)"


def test_production_config():
    deps = deployments(load(GPU_CONFIG))
    assert deps["Reranker"]["ray_actor_options"]["num_gpus"] == 0.25
    for name, dep in deps.items():
        a = dep["autoscaling_config"]
        for key in (
            "min_replicas",
            "max_replicas",
            "target_ongoing_requests",
            "upscale_delay_s",
            "downscale_delay_s",
        ):
            assert key in a, f"{name}: autoscaling_config.{key}"
        assert 1 <= a["min_replicas"] <= a["max_replicas"]
        assert "num_replicas" not in dep


def test_cpu_config_fits_two_cores():
    deps = deployments(load(CPU_CONFIG))
    assert all(d["num_replicas"] == 1 for d in deps.values())
    assert sum(d["ray_actor_options"]["num_cpus"] for d in deps.values()) <= 2
    assert deps["Reranker"]["ray_actor_options"].get("num_gpus", 0) == 0


def test_app_args_defaults_come_from_settings(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("RAG_TOP_K", "3")
    monkeypatch.setenv("RAG_RERANKER", "none")
    a = AppArgs()
    assert a.top_k == 3 and a.reranker == "none" and a.data_dir.is_absolute()
    assert AppArgs(top_k=4).top_k == 4  # an explicit arg wins over the environment
    with pytest.raises(ValidationError, match="invalid collection name"):
        AppArgs(collection="Bad-Name")
    with pytest.raises(ValidationError):
        AppArgs(no_such_arg=1)
    # each deployment gets its slice only
    assert set(a.slice("search").model_dump()) >= {"fetch_k", "top_k", "budget_ms", "strict_rerank"}
    assert "database_url" not in a.slice("reranker").model_dump()


def test_launch_applies_explicit_settings_only():
    from rag.settings import Settings

    cfg = load(CPU_CONFIG)
    s = Settings(collection="docs", offline=True, cohere_api_key="sk-secret")
    out = apply_settings(cfg, s, "postgresql://u:p@h/db")
    args = out["applications"][0]["args"]
    assert args["collection"] == "docs" and args["database_url"] == "postgresql://u:p@h/db"
    assert args["rerank_device"] == "cpu"  # from the file: not set explicitly
    assert Path(args["data_dir"]).is_absolute() and "cohere_api_key" not in args
    assert out["applications"][0]["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert cfg["applications"][0]["args"].get("collection") is None  # the input is not modified
