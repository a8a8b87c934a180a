"""The OpenAPI spec is the service: its limits come from the settings, and schemathesis finds no difference.

Default tier: the spec carries the configured limits (query length, k ranges, documents per request, embed
inputs, max_tokens_per_doc) from the SearchConfig the service validates with, every route documents the
statuses of ingress.ERROR_TABLE with the error body, a 405 names the allowed methods, and a body that is not
UTF-8 JSON text is a 422 like any malformed JSON.

`serve` tier: schemathesis (its pytest integration, seeded, bounded examples per route) against a live app's
/openapi.json: no server error, no undocumented status, no response that breaks its schema (body, headers,
content type), no schema-valid request rejected, a 405 with `Allow` for undeclared methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from helpers import cpu_app_config, free_port, ingest_demo, ray_cluster, wait_ready
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from deployments._service import SearchService
from deployments.ingress import ERROR_TABLE, create_app
from rag.settings import SearchConfig, Settings

POST_ROUTES = ("/search", "/search/stream", "/v2/rerank", "/v1/rerank", "/rerank", "/embed", "/v1/embeddings")


def _app(**settings: Any) -> TestClient:
    config = Settings(**settings).slice("search")
    # no stage is called by these tests: the spec, 405 and body parsing never reach a handle
    return TestClient(create_app(SearchService(None, None, None, config)), raise_server_exceptions=False)  # type: ignore[arg-type]


def _props(spec: dict, model: str) -> dict[str, Any]:
    return spec["components"]["schemas"][model]["properties"]


def _branch(prop: dict, kind: str) -> dict:
    """The subschema of ``prop`` of JSON type ``kind`` (through anyOf)."""
    for sub in [prop, *prop.get("anyOf", [])]:
        if sub.get("type") == kind:
            return sub
    raise AssertionError(f"no {kind} in {prop}")


@pytest.mark.parametrize("max_documents", [None, 17])
def test_spec_carries_the_limits_from_settings(max_documents: int | None):
    s = {
        "max_query_chars": 321,
        "max_fetch_k": 77,
        "max_embed_inputs": 9,
        "rerank_max_tokens_per_doc": 333,
        "max_documents": max_documents,
    }
    cfg: Any = SearchConfig(**s)
    spec = _app(**s).get("/openapi.json").json()
    docs_limit = max_documents or 77
    assert cfg.documents_limit == docs_limit

    search = _props(spec, "SearchRequest")
    assert search["query"]["maxLength"] == 321 and search["query"]["minLength"] == 1
    for k in ("fetch_k", "top_k"):
        b = _branch(search[k], "integer")
        assert (b["minimum"], b["maximum"]) == (1, 77), b
    for model, field in (("CohereRerankRequest", "documents"), ("CohereV1RerankRequest", "documents"),
                         ("TEIRerankRequest", "texts")):  # fmt: skip
        p = _props(spec, model)
        assert (p[field]["minItems"], p[field]["maxItems"]) == (1, docs_limit), model
        assert p["query"]["maxLength"] == 321, model
        assert _branch(p["max_tokens_per_doc"], "integer")["maximum"] == 333, model
        if "top_n" in p:
            assert _branch(p["top_n"], "integer")["maximum"] == docs_limit, model
    for model, field in (("EmbedRequest", "inputs"), ("OpenAIEmbeddingsRequest", "input")):
        p = _props(spec, model)[field]
        assert _branch(p, "string")["maxLength"] == 321
        arr = _branch(p, "array")
        assert (arr["minItems"], arr["maxItems"], arr["items"]["maxLength"]) == (1, 9, 321), model


def test_defaults_are_the_settings_defaults():
    """With no override the spec states Settings' own defaults (not numbers of its own)."""
    d = Settings()
    spec = _app().get("/openapi.json").json()
    assert _props(spec, "SearchRequest")["query"]["maxLength"] == d.max_query_chars
    assert (
        _props(spec, "CohereRerankRequest")["documents"]["maxItems"] == d.max_fetch_k
    )  # max_documents unset


def test_every_route_documents_the_error_table():
    spec = _app().get("/openapi.json").json()
    statuses = {str(s) for _, s, _ in ERROR_TABLE if s is not None}
    retry = {str(s) for _, s, r in ERROR_TABLE if r}
    for path in POST_ROUTES:
        responses = spec["paths"][path]["post"]["responses"]
        assert statuses <= set(responses), (path, sorted(responses))
        for status in statuses:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorBody"), (path, status)
        for status in retry:
            assert responses[status]["headers"]["Retry-After"]["required"] is True, (path, status)
    assert "400" not in {s for p in POST_ROUTES for s in spec["paths"][p]["post"]["responses"]}


def test_405_names_the_allowed_methods():
    c = _app()
    for method, path, allowed in (("TRACE", "/search", "POST"), ("DELETE", "/healthz", "GET")):
        r = c.request(method, path)
        assert r.status_code == 405 and r.json()["error_type"] == "method_not_allowed"
        assert allowed in r.headers["allow"].split(", "), r.headers


def test_body_that_is_not_utf8_json_is_a_422_like_malformed_json():
    c = _app()
    for body in (b"{not json", b'\xff\xfe{"query": "x', b'{"query": "\xe9t\xe9"}'):
        r = c.post("/search", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert r.json()["error_type"] == "invalid_input" and r.json()["error"]


# --- serve tier: schemathesis against a live app ------------------------------------------------------------
ST_CONFIG = {"seed": 20261201, "generation": {"max-examples": 25}}  # per route; ~2-4 min on 2 CPU cores
ST_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    positive_data_acceptance,
    unsupported_method,
]
LIMITS = {"max_query_chars": 512, "max_documents": 16, "max_embed_inputs": 8, "max_fetch_k": 64}
# fetch_k = max_fetch_k: then any top_k the schema allows (<= max_fetch_k) is <= the default fetch_k
APP_ARGS = {"rerank_threads": 1, "fetch_k": 64, "top_k": 4, "rerank_timeout_s": 60, **LIMITS}


def _live_search_config() -> SearchConfig:
    """The SearchConfig the live app below runs with (build_app's: AppArgs of its Serve config's args)."""
    from deployments._args import AppArgs

    cfg = cpu_app_config("postgresql://spec@127.0.0.1/spec", Path("."), "default", **APP_ARGS)
    return AppArgs.model_validate(cfg["applications"][0]["args"]).slice("search")


# The spec is built here, at collection, from the live app's configuration (schemathesis's lazy
# `from_fixture` needs pytest < 9); test_the_live_app_serves_this_spec checks the live app serves exactly it.
LIVE_SPEC = create_app(SearchService(None, None, None, _live_search_config())).openapi()  # type: ignore[arg-type]
schema = schemathesis.openapi.from_dict(LIVE_SPEC, config=SchemathesisConfig.from_dict(ST_CONFIG))


@pytest.fixture(scope="module")
def st_collection(store, embedder):
    name = ingest_demo(store, embedder, "st", 60)
    yield name
    store.drop_collection(name)


@pytest.fixture(scope="module")
def live_url(db_url, state_dir, st_collection) -> str:
    """A live app with small limits (so the examples reach them); its base URL."""
    from deployments.launch import deploy

    with ray_cluster("rag-openapi-tests"):
        port = free_port()
        deploy(cpu_app_config(db_url, state_dir, st_collection, **APP_ARGS), host="127.0.0.1", port=port,
               timeout_s=600)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield url


@pytest.mark.serve
def test_the_live_app_serves_this_spec(live_url):
    import httpx

    served = httpx.get(live_url + "/openapi.json", timeout=30).json()
    assert served == LIVE_SPEC, "the live app's /openapi.json is not the spec schemathesis tests below"


def state_rules(body: Any) -> None:
    """Rules JSON Schema cannot state (they stay 422s, tested in tests/test_serve_errors.py): a collection must
    exist, top_k <= fetch_k, document ids are unique, OpenAI's `dimensions` must be the model's, Cohere v1's
    `rank_fields` must name each object's text field. Applied to each generated body before it is sent (only
    those keys; the rest is what schemathesis drew). schemathesis's map_body hook does not reach the
    examples and coverage phases, hence here."""
    if not isinstance(body, dict):
        return
    if body.get("collection") is not None:
        body["collection"] = None
    top_k, fetch_k = body.get("top_k"), body.get("fetch_k")
    if "query" in body and isinstance(fetch_k, int | float) and isinstance(top_k, int | float | None):
        body["top_k"] = min(APP_ARGS["top_k"] if top_k is None else top_k, fetch_k)  # unset: the default
    if body.get("dimensions") is not None:
        body["dimensions"] = None
    docs = body.get("documents")
    if isinstance(docs, list) and any(isinstance(d, dict) for d in docs):
        for i, d in enumerate(docs):
            if isinstance(d, dict) and "id" in d:
                d["id"] = f"doc-{i}"
        if body.get("rank_fields"):
            body["rank_fields"] = None


@pytest.mark.serve
@schema.parametrize()
def test_live_app_conforms_to_its_openapi_spec(case, live_url):
    state_rules(case.body)
    case.call_and_validate(base_url=live_url, checks=ST_CHECKS, timeout=120)
