"""Every Settings field reaches the stage that uses it, or says why it is process-local.

Default tier: each field is tagged (stages or a local reason), the per-stage slices hold exactly their
tagged fields, and the table of non-default values below covers every stage field.
Serve tier: one app started with a non-default value for every stage field; ``GET /info`` reports, per
stage, the configuration its replica holds, and each field is read back from it (parametrised). A new
field with no tag, or with a tag and no non-default value here, fails a test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import cpu_app_config, free_port, ingest_demo, ray_cluster, wait_ready
from pydantic import SecretStr

from rag.settings import STAGES, Settings, field_stages, local_reason

STAGE_FIELDS = sorted(n for n in Settings.model_fields if field_stages(n))

# A non-default value for every stage field, chosen so the app still runs on this machine. Four fields are
# filled in by the fixture (they depend on it): database_url, database_read_urls (the test database again:
# a server that is no standby serves as a read replica with lag 0), data_dir and collection.
NON_DEFAULT: dict[str, Any] = {
    # store
    "read_replica_max_lag_s": 12.0,
    "read_replica_probe_s": 2.0,
    "pool_min_size": 2,
    "pool_max_size": 5,
    "connect_timeout_s": 4.0,
    "hnsw_m": 12,
    "hnsw_ef_construction": 48,
    "hnsw_ef_search_min": 30,
    "hnsw_ef_search_factor": 3.0,
    "index_type": "halfvec",
    "binary_rerank_factor": 6.0,
    "lexical_index": "fts",
    "text_search_config": "simple",
    "fusion_rrf_k": 30,
    "fusion_depth_factor": 3.0,
    "fusion_depth_min": 20,
    "fusion_dense_weight": 1.5,
    "fusion_lexical_weight": 0.5,
    # models
    "offline": True,
    "embedding_model": "all-MiniLM-L6-v2",
    "embedding_device": "cpu",
    "embedding_dtype": "float32",
    "embedding_runtime": "torch",
    "embedding_threads": 1,
    "embed_batch_size": 16,
    "reranker": "cross-encoder",  # the default; see KEPT_DEFAULT
    "rerank_model": "cross-encoder/ms-marco-MiniLM-L-12-v2",  # offline: the stand-in, under this name
    "rerank_device": "cpu",
    "rerank_dtype": "float32",
    "rerank_batch_size": 16,
    "rerank_max_length": 256,
    "rerank_token_budget": 4096,
    "rerank_threads": 1,
    "rerank_runtime": "torch",
    "rerank_refine_top": 3,
    "rerank_refine_margin": 0.2,
    "rerank_screen": "fp32",
    "rerank_ir_dir": "/tmp/rag-reach-prebuilt-ir",
    "rerank_long_documents": "mean",
    "rerank_max_tokens_per_doc": 2048,
    "rerank_window_overlap": 32,
    "rerank_search_windows": 2,
    "rerank_chunk_pairs": 48,
    "rerank_chunk_ms": 400.0,
    "rerank_max_request_tokens": 500_000,
    "rerank_instruction": "Given a question, find the passages that answer it",
    "rerank_cache": False,
    "rerank_cache_entries": 5000,
    "rerank_cache_bytes": 8 << 20,
    "cohere_api_key": "sk-reach-test-key",
    "cohere_base_url": "http://127.0.0.1:9/",
    "cohere_model": "rerank-test",
    "cohere_timeout_s": 3.0,
    "cohere_max_retries": 1,
    # one named model (the reranker settings' model): requests may name it, an unknown name is a 422
    "rerank_models": [{"name": "reach-model", "default": True, "settings": {"rerank_refine_top": 3}}],
    "rerank_models_per_replica": 3,
    # search
    "fetch_k": 30,
    "search_mode": "dense",
    "top_k": 5,
    "max_fetch_k": 500,
    "max_query_chars": 2000,
    "max_documents": 200,
    "max_embed_inputs": 32,
    "max_body_bytes": 500_000,
    "budget_ms": 60_000.0,
    "strict_rerank": True,
    "request_timeout_s": 50.0,
    "rerank_timeout_s": 45.0,
    "embed_timeout_s": 9.0,
    "retrieve_timeout_s": 8.0,
    "ready_timeout_s": 3.0,
    "api_keys": "reach-key-1,reach-key-2",
}
FROM_FIXTURE = {"database_url", "database_read_urls", "data_dir", "collection"}
# Switching the backend replaces the model under test (cohere needs a server, none has no model); that the
# slice carries ``reranker`` is read back all the same, and make_reranker's backends are tested in test_rerank.
KEPT_DEFAULT = {"reranker": "switching the backend would replace the cross-encoder this app tests"}


def test_every_field_is_used_by_a_stage_or_says_why_not():
    for name in Settings.model_fields:
        stages, reason = field_stages(name), local_reason(name)
        assert stages or reason, f"Settings.{name}: tag it with the stages that use it, or local='why'"
        assert set(stages) <= set(STAGES)


def test_slices_hold_exactly_their_tagged_fields():
    s = Settings()
    for stage in STAGES:
        got = set(s.slice(stage).model_dump())
        assert got == {n for n in Settings.model_fields if stage in field_stages(n)}, stage


def test_every_stage_field_has_a_non_default_value_here():
    missing = set(STAGE_FIELDS) - set(NON_DEFAULT) - FROM_FIXTURE
    assert not missing, f"add a non-default value for {sorted(missing)} to NON_DEFAULT"
    for name, value in NON_DEFAULT.items():
        default = Settings.model_fields[name].default
        assert value != default or name in KEPT_DEFAULT, f"{name}={value!r} is the default"


def test_slice_public_view_hides_secrets():
    s = Settings(
        cohere_api_key="sk-x",
        database_url="postgresql://u:pw@h/db",
        database_read_urls="postgresql://u:pw@r1/db,postgresql://v:pw2@r2/db",
    )
    assert s.slice("reranker").public()["cohere_api_key"] == "***"
    assert s.slice("store").public()["database_url"] == "postgresql://u:***@h/db"
    assert (
        s.slice("store").public()["database_read_urls"] == "postgresql://u:***@r1/db,postgresql://v:***@r2/db"
    )
    assert isinstance(s.slice("reranker").cohere_api_key, SecretStr)


# --------------------------------------------------------------------------------------------------
# serve tier: one app with every stage field set to a non-default value
# --------------------------------------------------------------------------------------------------
DB_PASSWORD = "reach-db-secret"


@pytest.fixture(scope="module")
def reach(store, embedder, db_url, state_dir):
    """The app, deployed the way `rag serve` deploys it: secrets only in the environment Ray's processes
    inherit (never in the config's args, which Ray logs). Yields (values, /info, a /search, leaked secrets)."""
    from deployments.launch import deploy
    from rag.settings import SECRETS

    name = ingest_demo(store, embedder, "reach", 40)
    url = db_url.replace("postgres:@", f"postgres:{DB_PASSWORD}@", 1)
    assert DB_PASSWORD in url, "the test database URL has an unexpected form"
    values = {
        **NON_DEFAULT,
        "database_url": url,
        "database_read_urls": url,
        "data_dir": str(state_dir),
        "collection": name,
    }
    cfg = cpu_app_config(
        db_url, state_dir, name, **{k: v for k, v in NON_DEFAULT.items() if k not in SECRETS}
    )
    cfg["applications"][0]["args"].pop("database_url")
    port = free_port()
    mp = pytest.MonkeyPatch()
    try:
        for field in SECRETS & values.keys():  # the service's secrets (api_key is the client's)
            mp.setenv(f"RAG_{field.upper()}", values[field])
        with ray_cluster("rag-reach-tests"):
            deploy(cfg, host="127.0.0.1", port=port, timeout_s=600)
            url = f"http://127.0.0.1:{port}"
            wait_ready(url)
            auth = {"Authorization": "Bearer reach-key-2"}
            assert httpx.get(url + "/info", timeout=60).status_code == 401  # api_keys reached the ingress
            info = httpx.get(url + "/info", headers=auth, timeout=60).json()
            search = httpx.post(url + "/search", json={"query": "parse a date"}, headers=auth, timeout=120)
            httpx.post(
                url + "/search", json={"query": "x", "collection": "nope_zz"}, headers=auth, timeout=60
            )
            yield values, info, search, _leaks([DB_PASSWORD, "sk-reach-test-key", "reach-key-1"])
    finally:
        mp.undo()
        store.drop_collection(name)


def _leaks(secrets: list[str]) -> list[str]:
    """Every Ray session log file (controller, replicas, workers' .out/.err) that holds a secret."""
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    found = []
    for path in sorted(Path(logs).rglob("*")):
        if path.is_file():
            text = path.read_bytes().decode("utf-8", "replace")
            found += [f"{path.name}: {s}" for s in secrets if s in text]
    return found


def _expected(name: str, value: Any) -> Any:
    if name in ("cohere_api_key", "api_keys"):
        return "***"
    if name in ("database_url", "database_read_urls"):
        from rag.settings import redact_url

        return redact_url(value)
    if name == "rerank_models":  # /info shows each entry with every field
        from rag.settings import RerankModel

        return [RerankModel.model_validate(m).model_dump(mode="json") for m in value]
    return value


@pytest.mark.serve
@pytest.mark.parametrize("name", STAGE_FIELDS)
def test_field_reaches_its_replica(reach, name):
    values, info, _, _ = reach
    for stage in field_stages(name):
        held = info["stages"][stage]
        assert "config" in held, f"/info has no configuration for {stage}: {held}"
        assert held["config"][name] == _expected(name, values[name]), f"{stage} holds {name}"


@pytest.mark.serve
def test_info_reports_what_the_replicas_run(reach):
    _, info, search, _ = reach
    assert search.status_code == 200, search.text
    assert len(search.json()["results"]) == NON_DEFAULT["top_k"]  # the search default reached the ingress
    st = info["stages"]
    assert st["reranker"]["runtime"] == "torch" and st["reranker"]["threads"] == 1  # effective, not echoed
    assert st["reranker"]["token_budget"] == 4096 and st["reranker"]["max_length"] == 256
    assert st["reranker"]["model"] == NON_DEFAULT["rerank_model"] and st["reranker"]["trained"] is False
    assert st["reranker"]["user_config"]["max_pairs_per_batch"] >= 1
    assert st["embedder"]["runtime"] == "torch" and st["embedder"]["dtype"] == "float32"
    assert st["embedder"]["trained"] is True and st["embedder"]["threads"] == 1
    assert "3" in st["store"]["ef_search_rule"] and st["store"]["database"]["pgvector"]
    (replica,) = st["store"]["read_replicas"]["replicas"]  # database_read_urls reached the Retriever
    assert replica["state"] == "ok" and replica["lag_s"] == 0.0, replica
    assert st["search"]["limits"]["max_documents"] == 200 and st["search"]["timeouts_s"]["rerank"] == 45.0
    assert info["service"]["ray"] and info["service"]["version"]
    text = str(info)
    assert "sk-reach-test-key" not in text and "reach-key-1" not in text  # no secret in /info


@pytest.mark.serve
def test_no_secret_in_any_log_file(reach):
    *_, leaks = reach
    assert not leaks, f"secrets written to Ray's logs: {leaks}"
