"""Rerank backends: parity with CrossEncoder.predict, the stand-in's honesty, Cohere's v2 protocol."""

from __future__ import annotations

import json
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from rag.errors import ConfigError, InvalidInput, RerankerError
from rag.models import StandInWarning, resolve_cross_encoder
from rag.rerank import CohereReranker, CrossEncoderReranker, NoReranker, make_reranker
from rag.search import rank

PAIRS = [
    ("how do wings generate lift", "Lift arises from the pressure difference between the wing's surfaces."),
    ("how do wings generate lift", "Bake the bread at 220 degrees for thirty minutes."),
    ("how do wings generate lift", "A short one."),
    ("what is a neutron star", "A neutron star is the collapsed core of a massive star. " * 20),
    ("what is a neutron star", "Interest compounds over periods."),
]


def test_parity_with_plain_crossencoder_predict(settings, reranker):
    ref = CrossEncoderReranker(
        settings.rerank_model, cache_dir=settings.model_cache, offline=True, dtype="float32", sort=False
    )
    expected = ref.ce.predict(PAIRS, batch_size=32, show_progress_bar=False)
    got = ref.score(PAIRS)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # the default fast path (sorted, budgeted, maybe bf16) keeps the order of the scores
    fast = reranker.score(PAIRS)
    assert np.argsort(fast).tolist() == np.argsort(expected).tolist()


def test_stand_in_says_so(settings, tmp_path):
    with pytest.warns(StandInWarning, match="STAND-IN"):
        resolved = resolve_cross_encoder(
            "cross-encoder/ms-marco-MiniLM-L-6-v2", cache_dir=tmp_path, offline=True
        )
    assert resolved.trained is False and resolved.source == "stand-in"
    # a local folder that is the stand-in is still reported as untrained
    again = resolve_cross_encoder(resolved.path, cache_dir=tmp_path, offline=True)
    assert again.source == "local" and again.trained is False


def test_reranker_info_reports_untrained_stand_in(reranker):
    info = reranker.info()
    assert info["trained"] is False and info["backend"] == "cross-encoder"
    assert info["dtype"] in {"float32", "bfloat16", "float16"} and info["device"] == "cpu"


def test_scores_are_deterministic_and_validated(reranker):
    assert reranker.score(PAIRS) == reranker.score(PAIRS)
    assert reranker.score([]) == []
    with pytest.raises(InvalidInput, match="pair 0"):
        reranker.score([("query only",)])  # type: ignore[list-item]


def test_rank_sorts_and_cuts():
    cands = [{"id": str(i), "dense_score": 1 - i / 10} for i in range(5)]
    out = rank(cands, [0.1, 0.9, 0.5, 0.9, 0.0], 3)
    assert [h["id"] for h in out] == ["1", "3", "2"]  # ties keep dense order
    assert out[0]["score"] == 0.9 and out[0]["dense_score"] == 0.9
    with pytest.raises(RerankerError):
        rank(cands, [0.1], 3)


class _FakeCohere(BaseHTTPRequestHandler):
    """Speaks Cohere's POST /v2/rerank: scores by word overlap, returns results sorted by score."""

    calls: list[dict] = []
    fail_with: int | None = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.fail_with:
            self._send(self.fail_with, {"message": "invalid api token"})
            return
        q = set(body["query"].lower().split())
        scores = [len(q & set(d.lower().split())) / (1 + len(q)) for d in body["documents"]]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.get("top_n") or len(scores)]
        self._send(
            200,
            {
                "id": "fake-1",
                "results": [{"index": i, "relevance_score": scores[i]} for i in order],
                "meta": {"billed_units": {"search_units": 1}},
            },
        )

    def _send(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_cohere():
    _FakeCohere.calls = []
    _FakeCohere.fail_with = None
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeCohere)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _FakeCohere
    srv.shutdown()


def test_cohere_backend_speaks_v2_and_maps_scores_back(fake_cohere):
    url, handler = fake_cohere
    rr = CohereReranker(api_key="test-key", base_url=url, model="rerank-v3.5", max_retries=0)
    pairs = [("red apple", "a green pear"), ("red apple", "the red apple"), ("blue sky", "sky is blue today")]
    scores = rr.score(pairs)
    assert scores[1] > scores[0] and scores[2] > 0
    assert len(handler.calls) == 2  # one call per distinct query
    call = handler.calls[0]
    assert call["path"] == "/v2/rerank" and call["auth"] == "Bearer test-key"
    assert call["body"]["model"] == "rerank-v3.5" and call["body"]["documents"] == [
        "a green pear",
        "the red apple",
    ]
    assert rr.info()["backend"] == "cohere"


def test_cohere_errors_are_reranker_errors(fake_cohere):
    url, handler = fake_cohere
    handler.fail_with = 401
    rr = CohereReranker(api_key="bad", base_url=url, max_retries=3)
    with pytest.raises(RerankerError, match="Cohere rerank failed"):
        rr.score([("q", "d")])
    assert len(handler.calls) == 1  # a 4xx is not retried


def test_missing_cohere_key_names_the_fix(settings):
    s = settings.with_overrides(reranker="cohere")
    s = s.model_copy(update={"cohere_api_key": None})
    with pytest.raises(ConfigError, match="CO_API_KEY"):
        make_reranker(s)


def test_none_backend_is_disabled(settings):
    rr = make_reranker(settings.with_overrides(reranker="none"))
    assert isinstance(rr, NoReranker) and rr.enabled is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rr.info()["backend"] == "none"
