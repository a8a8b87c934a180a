"""Served rerank models as configuration (fast): RAG_RERANK_MODELS and a Serve config's args, validation at
start-up, name resolution, per-model slices, and the per-model counters that exist from start-up."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from deployments._args import AppArgs
from deployments.metrics import METRICS, model_zero_series, zero_series
from monitoring.dashboard import dashboard
from monitoring.promql import metric_names
from rag.errors import UnknownModel
from rag.settings import DEFAULT_RERANK_MODEL, RerankModel, Settings

TWO = [
    {"name": "fast", "model": "/models/minilm", "default": True},
    {"name": "big", "model": "/models/large", "max_length": 256, "settings": {"rerank_dtype": "float32"}},
]


def test_unset_means_one_model_and_any_name_is_accepted():
    s = Settings()
    cfg = s.slice("reranker")
    assert [m.name for m in cfg.served_models()] == [DEFAULT_RERANK_MODEL]
    assert cfg.default_model == DEFAULT_RERANK_MODEL
    assert cfg.model_configs()[DEFAULT_RERANK_MODEL].rerank_model == DEFAULT_RERANK_MODEL
    # requests' model names are ignored, as before several models: "" routes to the Reranker's one model
    search = s.slice("search")
    assert search.pick_model("rerank-v3.5") == "" and search.pick_model(None) == ""


def test_from_the_environment_as_json(monkeypatch):
    monkeypatch.setenv("RAG_RERANK_MODELS", json.dumps(TWO))
    monkeypatch.setenv("RAG_RERANK_MODELS_PER_REPLICA", "3")
    s = Settings()
    cfg = s.slice("reranker")
    assert [m.name for m in cfg.served_models()] == ["fast", "big"]
    assert cfg.default_model == "fast" and cfg.rerank_models_per_replica == 3
    big = cfg.model_configs()["big"]
    assert (big.rerank_model, big.rerank_max_length, big.rerank_dtype) == ("/models/large", 256, "float32")
    fast = cfg.model_configs()["fast"]
    assert fast.rerank_dtype == s.rerank_dtype and fast.rerank_models == []  # the rest: the settings'


def test_from_a_serve_config_args():
    args = AppArgs.model_validate({"rerank_models": TWO, "rerank_models_per_replica": 1})
    assert [m.name for m in args.slice("reranker").served_models()] == ["fast", "big"]
    explicit = args.explicit()  # what `rag serve` writes into a Serve config
    assert explicit["rerank_models"][1]["settings"] == {"rerank_dtype": "float32"}
    again = AppArgs.model_validate(json.loads(json.dumps(explicit)))
    assert again.rerank_models == args.rerank_models


def test_names_resolve_and_an_unknown_one_lists_the_served_names():
    search = Settings(rerank_models=TWO).slice("search")
    assert search.pick_model(None) == "fast" and search.pick_model("big") == "big"
    with pytest.raises(UnknownModel) as e:
        search.pick_model("huge")
    assert "fast" in str(e.value) and "big" in str(e.value) and "/v1/models" in str(e.value)


def test_a_single_entry_is_the_default_without_saying_so():
    s = Settings(rerank_models=[{"name": "only", "model": "/m"}])
    assert s.slice("reranker").default_model == "only" and s.slice("search").pick_model(None) == "only"


@pytest.mark.parametrize(
    ("models", "words"),
    [
        ([{"name": "a", "default": True}, {"name": "a"}], "repeat"),
        ([{"name": "a"}, {"name": "b"}], 'exactly one model must be "default": true, none is'),
        ([{"name": "a", "default": True}, {"name": "b", "default": True}], "2 are (['a', 'b'])"),
        ([{"name": "a", "settings": {"rerank_colour": "red"}}], "'rerank_colour'] are not reranker settings"),
        ([{"name": "a", "settings": {"rerank_max_length": 2}}], "rerank model 'a'"),
        ([{"name": "a", "backend": "sparse"}], "backend"),
        ([{"name": "bad name!"}], "name"),
    ],
)
def test_invalid_lists_are_refused_at_start_up_naming_the_fix(models, words):
    with pytest.raises(ValidationError) as e:
        Settings(rerank_models=models)
    assert words in str(e.value)


def test_cohere_entries_set_the_cohere_model():
    entry = RerankModel(name="hosted", backend="cohere", model="rerank-v3.5")
    cfg = Settings(rerank_models=[entry.model_dump()]).slice("reranker").model_configs()["hosted"]
    assert (cfg.reranker, cfg.cohere_model) == ("cohere", "rerank-v3.5")


def test_every_counter_a_dashboard_queries_exists_from_start_up():
    """The counters the dashboard reads are created at 0 at start-up (the Ingress's zero_series, every
    Reranker replica's model_zero_series for each served model), so no panel reads "No data" before its
    first event. Their presence in a live Prometheus is checked in tests/test_observability.py."""
    queried = {
        n for p in dashboard()["panels"] for t in p.get("targets", ()) for n in metric_names(t["expr"])
    }
    counters = {n for n, (kind, *_) in METRICS.items() if kind == "counter"}
    queried_counters = {n for n in counters if f"ray_{n}" in queried}
    at_zero = set(zero_series()) | set(model_zero_series(["m"]))
    assert queried_counters - at_zero <= NOT_AT_ZERO.keys(), queried_counters - at_zero
    for tags in model_zero_series(["m1", "m2"]).values():
        assert {t["model"] for t in tags} == {"m1", "m2"}


# Counters a panel reads that cannot be created at 0 up front, and why.
NOT_AT_ZERO: dict[str, str] = {}
