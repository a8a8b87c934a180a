"""Hybrid stage 1 on a live Serve app: an exact identifier from the demo corpus that dense search ranks too low
for the top 8 and hybrid search finds, through the Retriever deployment the ingress calls; the library finds
the same candidates in every mode; /info says which lexical search the database offers.

``POST /search`` and ``/search/stream`` take ``"mode"``; a mode the service does not know is a 422 that lists
the modes.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from helpers import cpu_app_config, free_port, ingest_demo, ray_cluster, wait_ready

pytestmark = pytest.mark.serve

APP = "rag"
QUERY = "TypeError"  # an exception class named in ast.get_docstring's docstring, and nowhere else
TOP_K = 8


@pytest.fixture(scope="module")
def demo(store, embedder):
    """The ~150 short stdlib docstrings test_serve.py serves, in a collection of their own."""
    name = ingest_demo(store, embedder, "hybserve", 150)
    yield name
    store.drop_collection(name)


@pytest.fixture(scope="module")
def live(db_url, state_dir, demo):
    from deployments.launch import deploy

    cfg = cpu_app_config(
        db_url, state_dir, demo, embedding_dtype="float32", rerank_dtype="float32", rerank_threads=1
    )
    port = free_port()
    with ray_cluster("rag-hybrid-serve"):
        deploy(cfg, host="127.0.0.1", port=port, timeout_s=300)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield url


def _handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, app_name=APP)


@pytest.fixture(scope="module")
def target(store, embedder, demo) -> str:
    """The chunk that holds the identifier: the lexical side's only answer."""
    hits = store.search(demo, embedder.embed_query(QUERY), 5, query=QUERY, mode="lexical")
    assert len(hits) == 1 and QUERY in hits[0]["content"], [h["id"] for h in hits]
    return hits[0]["id"]


def test_dense_misses_the_identifier_and_hybrid_finds_it_through_the_retriever(live, demo, target):
    vec = _handle("Embedder").embed.remote(QUERY).result(timeout_s=60)
    retriever = _handle("Retriever")
    dense = retriever.search.remote(demo, vec, TOP_K).result(timeout_s=60)  # no mode: dense, as before modes
    hybrid = retriever.search.remote(demo, vec, TOP_K, query=QUERY, mode="hybrid").result(timeout_s=60)
    assert target not in [h["id"] for h in dense], "dense search finds it: the premise of this test changed"
    assert dense.strategy in ("hnsw", "exact")
    ids = [h["id"] for h in hybrid]
    assert target in ids and hybrid.strategy.startswith("hybrid(") and ", bm25" in hybrid.strategy
    assert len(hybrid) == TOP_K
    hit = hybrid[ids.index(target)]
    assert hit["lexical_rank"] == 1 and isinstance(hit["dense_score"], float)


def test_the_library_and_the_retriever_give_the_same_candidates_per_mode(live, demo, pipeline):
    vec = _handle("Embedder").embed.remote(QUERY).result(timeout_s=60)
    retriever = _handle("Retriever")
    for mode in ("dense", "lexical", "hybrid"):
        served = retriever.search.remote(demo, vec, 20, query=QUERY, mode=mode).result(timeout_s=60)
        lib = pipeline.search(
            QUERY, fetch_k=20, top_k=20, rerank=False, collection=demo, mode=mode, vector=vec
        )
        assert [h["id"] for h in served] == [h["id"] for h in lib.candidates], mode
        assert served.strategy == lib.strategy, mode


def test_info_reports_the_lexical_search_the_database_offers(live):
    stages = httpx.get(live + "/info", timeout=60).json()["stages"]
    assert stages["store"]["lexical"] == {"lexical": "bm25", "pg_textsearch": "1.0.0"}
    assert stages["store"]["config"]["fusion_rrf_k"] == 60  # the fusion settings reach the Retriever
    assert stages["search"]["config"]["search_mode"] == "hybrid"


def test_search_mode_field_over_http(live, target):
    def search(mode: str) -> dict:
        body = {"query": QUERY, "mode": mode, "fetch_k": 20, "top_k": TOP_K, "rerank": False}
        r = httpx.post(live + "/search", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    dense, hybrid = search("dense"), search("hybrid")
    assert target not in [h["id"] for h in dense["results"]]
    assert target in [h["id"] for h in hybrid["results"]]
    assert hybrid["timings_ms"]["strategy"].startswith("hybrid(")

    lexical = search("lexical")
    assert lexical["timings_ms"]["strategy"] == "bm25"
    assert [h["id"] for h in lexical["results"]] == [target]  # only rows holding the term
    assert lexical["results"][0]["fused_score"] == lexical["results"][0]["score"]  # stage 1's own score


def test_stream_takes_the_mode_and_a_bad_mode_is_a_422(live, target):
    body = {"query": QUERY, "mode": "hybrid", "fetch_k": 20, "top_k": TOP_K, "rerank": False}
    with httpx.stream("POST", live + "/search/stream", json=body, timeout=120) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    assert target in text and "hybrid(" in text
    r = httpx.post(live + "/search", json={"query": QUERY, "mode": "sparse"}, timeout=60)
    assert r.status_code == 422, r.text
    msg = str(r.json())
    assert "dense" in msg and "lexical" in msg and "hybrid" in msg and "sparse" in msg


def _same_settings_as(live: str, db_url: str, state_dir):
    """Settings holding what the live app's replicas report in /info (no secret is set there)."""
    from rag.settings import Settings

    stages = httpx.get(live + "/info", timeout=60).json()["stages"]
    merged: dict = {}
    for stage in ("embedder", "reranker", "search", "store"):
        merged.update(stages[stage]["config"])
    merged = {k: v for k, v in merged.items() if v != "***" and not k.endswith("_url")}
    return Settings(**{**merged, "database_url": db_url, "data_dir": state_dir})


def test_eval_url_equals_eval_in_process_to_the_last_digit(live, demo, store, db_url, state_dir, tmp_path):
    """``rag eval --url`` (the live app, one /search/stream per query) and ``rag eval`` in this process, same
    collection and settings: identical metrics, every mode, stage 1 and reranked."""
    import json
    import warnings

    from typer.testing import CliRunner

    from rag.eval import evaluate, load_jsonl
    from rag.eval_targets import local_target, service_target
    from rag.models import StandInWarning
    from rag.pipeline import Pipeline
    from ragcli import app

    rows = store.search(demo, np.zeros(384, dtype=np.float32) + 0.01, 24, mode="dense")
    lines = [
        {"question": " ".join(h["content"].split()[:9]), "expected_sources": [h["source"]]} for h in rows
    ]
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ds = load_jsonl(qfile)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        local = local_target(Pipeline(_same_settings_as(live, db_url, state_dir), store=store))
    from rag.client import Client

    with Client(live) as client:
        remote = service_target(client)
        kw = {"collection": demo, "fetch_k": 12, "top_k": 4}
        here, there = evaluate(local, ds, **kw), evaluate(remote, ds, **kw)

    assert there["target"] == live and here["target"] == "in-process"
    assert set(here["systems"]) == {"dense", "lexical", "hybrid", "reranked", "lexical+reranked",
                                    "hybrid+reranked"}  # fmt: skip
    for name, mine in here["systems"].items():
        theirs = there["systems"][name]
        for metric in ("recall@4", "recall@12", "ndcg@10", "mrr@10"):
            assert theirs[metric] == mine[metric], (name, metric)  # exactly: the same rankings
        assert theirs.get("strategies") == mine.get("strategies"), name
    assert there["notes"] == here["notes"]  # the stand-in reranker is labelled in both

    # the command: the same report from the service
    args = f"eval {qfile} --url {live} -c {demo} --fetch-k 12 --top-k 4 --mode hybrid --json"
    out = CliRunner().invoke(app, [*args.split(), "--out", str(tmp_path / "results")])
    assert out.exit_code == 0, out.output
    cli = json.loads(out.stdout)
    assert cli["target"] == live
    for name in ("hybrid", "hybrid+reranked"):
        assert cli["systems"][name]["ndcg@10"] == here["systems"][name]["ndcg@10"]


def test_eval_url_says_what_is_wrong_when_nothing_listens(tmp_path):
    from typer.testing import CliRunner

    from ragcli import app

    qfile = tmp_path / "q.jsonl"
    qfile.write_text('{"question": "q", "expected_sources": ["a"]}\n')
    from helpers import free_port

    from rag.errors import StageUnavailable

    url = f"http://127.0.0.1:{free_port()}"
    out = CliRunner().invoke(app, ["eval", str(qfile), "--url", url])
    # a rag.errors type: `rag` prints its message, no traceback (ragcli.main)
    assert isinstance(out.exception, StageUnavailable), out.output
    assert url in str(out.exception) and "rag serve" in str(out.exception)
