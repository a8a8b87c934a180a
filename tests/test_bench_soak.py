"""`rag bench soak`: its request bodies are valid for the routes they go to, and RSS is read per replica."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from bench import soak
from deployments.api import cohere, jina, openai, search, tei

MODELS = {
    "/search": search.SearchRequest,
    "/v2/rerank": cohere.CohereRerankRequest,
    "/v1/rerank": jina.CohereV1RerankRequest,
    "/rerank": tei.TEIRerankRequest,
    "/embed": tei.EmbedRequest,
    "/v1/embeddings": openai.OpenAIEmbeddingsRequest,
}


@pytest.mark.parametrize("route", list(soak.MIX))
def test_every_body_matches_its_route_schema(route: str) -> None:
    body = soak._body(route, "a query", ["doc one", "doc two"], top_k=2, fetch_k=10)
    model = MODELS[soak.PATHS[route]]
    model.model_validate(body, strict=True)  # raises on a field the route does not take


def test_mix_and_paths_cover_the_same_routes() -> None:
    assert set(soak.MIX) == set(soak.PATHS)
    assert set(soak.PATHS.values()) == set(MODELS)


def test_deliberate_means_503_with_retry_after() -> None:
    assert soak._deliberate(503, {"retry-after": "1"})
    assert not soak._deliberate(503, {})
    assert not soak._deliberate(500, {"retry-after": "1"})


def test_replica_rss_finds_a_process_titled_like_a_replica() -> None:
    # Ray titles a replica's worker "ray::ServeReplica:<app>:<deployment>"; exec -a gives a process that title.
    # ...and appends the method it runs while busy: the deployment's name must not change with it.
    proc = subprocess.Popen(
        [
            "bash",
            "-c",
            'exec -a "ray::ServeReplica:soaktest:FakeStage.handle_request_with_rejection" sleep 30',
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while (key := f"FakeStage#{proc.pid}") not in (found := soak.replica_rss()):
            assert time.monotonic() < deadline, f"not found among {sorted(found)}"
            time.sleep(0.05)
        assert found[key] > 0
        assert str(os.getpid()) not in {k.rsplit("#", 1)[1] for k in found}  # pytest is no replica
    finally:
        proc.kill()
        proc.wait()


def test_demo_queries_are_distinct_sentences() -> None:
    qs = soak.demo_queries(50)
    assert len(qs) == 50 == len(set(qs))
    assert all(" " in q and "\n" not in q and 20 <= len(q) <= 200 for q in qs), qs[:5]
