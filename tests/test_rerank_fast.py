"""The reranker's fast path and the embedder's: batching, runtimes, the fp32 refine step, fidelity to fp32.

Speed is a benchmark (`rag bench rerank`), not a test; these check that the fast path computes the same
thing as the plain code, on short inputs.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from rag.accel import pack_batches, pad_batch, pick_dtype, pick_runtime, resolve_threads
from rag.errors import ConfigError
from rag.models import StandInWarning
from rag.rerank import CrossEncoderReranker, make_reranker

QUERY = "how does a wing generate lift at high angles of attack"
DOCS = [
    "the lift of a thin aerofoil at incidence follows from the circulation around it.",
    "measurements of pressure distribution over a swept wing at high angles of attack.",
    "heat transfer in laminar boundary layers with suction.",
    "stall of a wing: flow separation at the leading edge reduces lift abruptly.",
    "buckling of thin cylindrical shells under axial compression.",
    "the effect of aspect ratio on the lift curve slope of rectangular wings.",
    "supersonic flow about cones at small yaw.",
    "vortex lift on slender delta wings at large incidence " * 6,
    "a note on the theory of the jet flap.",
    "creep of metals at elevated temperatures.",
    "wind tunnel interference on wings of finite span.",
    "the drag of bluff bodies in a uniform stream.",
    "an exceptionally long abstract about unsteady aerodynamics and flutter of wings " * 60,
]
PAIRS = [(QUERY, d) for d in DOCS] + [("what is creep", d) for d in DOCS[:6]]


def _make(settings, **kw) -> CrossEncoderReranker:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        return CrossEncoderReranker(settings.rerank_model, cache_dir=settings.model_cache, offline=True, **kw)


@pytest.fixture(scope="module")
def ref(settings):
    return _make(settings, sort=False, dtype="float32")


@pytest.fixture(scope="module")
def expected(ref):
    return np.asarray(ref.ce.predict(PAIRS, batch_size=32, show_progress_bar=False), dtype=np.float64)


# -- batching ---------------------------------------------------------------------------------------
def test_pack_batches_covers_everything_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 512, size=300).tolist()
    batches = pack_batches(lengths, 8192, quadratic=1 / 2304)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(300))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 8192
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # sorted + split where it pays: little padding
    # unsorted: input order, fixed-size chunks (the parity configuration)
    assert pack_batches([5, 1, 3, 2, 4], 100, max_batch=2, sort=False) == [[0, 1], [2, 3], [4]]
    assert pack_batches([], 100) == []
    assert pack_batches([600], 512) == [[0]]  # a pair longer than the budget still runs, alone


def test_pad_batch_right_pads_with_mask():
    ids, mask = pad_batch([[1, 2, 3], [4], [5, 6]], [2, 0], pad_id=9)
    assert ids.tolist() == [[5, 6, 9], [1, 2, 3]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_hardware_choices():
    assert pick_dtype("float32", "cpu") == "float32"
    assert pick_dtype("auto", "cuda") == "float16"
    assert pick_dtype("auto", "cpu") in {"bfloat16", "float32"}  # never fp16 on a CPU
    assert resolve_threads(3) == 3
    assert 1 <= resolve_threads(0) <= 1024
    assert pick_runtime("torch", "cpu", "bfloat16") == "torch"
    assert pick_runtime("auto", "cuda", "float16") == "torch"
    with pytest.raises(ConfigError, match="CPU"):
        pick_runtime("openvino", "cuda", "float16")


# -- reranker -----------------------------------------------------------------------------------------
def test_parity_configuration_is_predict(ref, expected):
    np.testing.assert_allclose(ref.score(PAIRS), expected, rtol=1e-5, atol=1e-5)
    assert ref.info()["runtime"] == "torch" and ref.info()["sorted"] is False


def test_fast_path_fp32_equals_predict(settings, expected):
    fp32 = _make(settings, dtype="float32")  # sorted, budgeted, default runtime; no refine needed in fp32
    scores = fp32.score(PAIRS)
    last_timings = scores.timings.as_dict()  # each call's timings come with its scores
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert fp32.info()["refine"] is None and last_timings["refined_pairs"] == 0


def test_default_fast_path_reports_and_keeps_the_fp32_head(reranker, expected):
    info = reranker.info()
    assert info["runtime"] in {"openvino", "torch"} and info["dtype"] in {"bfloat16", "float32", "float16"}
    assert {"threads", "token_budget", "refine", "sorted"} <= set(info)
    scores = reranker.score(PAIRS)
    got = np.asarray(scores)
    t = scores.timings.as_dict()
    assert t["pairs"] == len(PAIRS) and t["unique_pairs"] == len(PAIRS)
    assert t["forward_passes"] >= 1 and t["tokens"] <= t["padded_tokens"]
    # per query, the top-k order is fp32's exactly; the rest stays close
    for lo, hi in ((0, len(DOCS)), (len(DOCS), len(PAIRS))):
        k = min(reranker.refine_top or len(DOCS), hi - lo)
        want = np.argsort(-expected[lo:hi], kind="stable")[:k]
        assert np.argsort(-got[lo:hi], kind="stable")[:k].tolist() == want.tolist()
    np.testing.assert_allclose(got, expected, atol=0.02)


def test_duplicate_pairs_are_scored_once(reranker):
    pairs = [PAIRS[0], PAIRS[1], PAIRS[0], PAIRS[3], PAIRS[1]]
    scores = reranker.score(pairs)
    last_timings = scores.timings.as_dict()
    assert last_timings["unique_pairs"] == 3 and last_timings["pairs"] == 5
    assert scores[0] == scores[2] and scores[1] == scores[4]
    assert reranker.score([]) == []


def test_torch_runtime_bf16_with_refine(settings, expected):
    tr = _make(settings, runtime="torch", dtype="bfloat16", refine_top=4)
    got = np.asarray(tr.score(PAIRS))
    assert tr.info()["runtime"] == "torch"
    top = np.argsort(-expected[: len(DOCS)], kind="stable")[:4]
    assert np.argsort(-got[: len(DOCS)], kind="stable")[:4].tolist() == top.tolist()
    np.testing.assert_allclose(got[top], expected[top], atol=1e-4)  # the head is rescored in fp32


def test_make_reranker_passes_fast_path_settings(settings):
    s = settings.with_overrides(rerank_runtime="torch", rerank_refine_top=3, rerank_token_budget=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        rr = make_reranker(s)
    info = rr.info()
    assert info["runtime"] == "torch" and info["token_budget"] == 4096
    assert rr.refine_top in {0, 3}  # 0 when the CPU has no bf16 (fp32 needs no refine)


# -- embedder -----------------------------------------------------------------------------------------
def test_embedder_fast_path_equals_encode(embedder):
    texts = [d[:400] for d in DOCS]
    plain = embedder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    got = embedder.embed_documents(texts)
    assert got.shape == (len(texts), embedder.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, plain, atol=2e-5)
    assert embedder.info()["runtime"] in {"openvino", "torch", "sentence-transformers"}
    np.testing.assert_allclose(embedder.embed_query(texts[2]), got[2], atol=1e-5)


def test_embedder_pads_every_pass_to_a_few_shapes(embedder):
    """Queries of every length reach the engine as a handful of widths (multiples of PAD_MULTIPLE: OpenVINO
    keeps state per shape, so one width per length made the Embedder's memory grow without end), and the
    padding changes no embedding."""
    from rag.embed import PAD_MULTIPLE

    if embedder._engine is None:
        pytest.skip("plain sentence-transformers path: no packed passes")
    widths: list[int] = []
    real = embedder._engine

    def spy(feeds):
        widths.append(feeds["input_ids"].shape[1])
        return real(feeds)

    queries = [" ".join(["wing"] * n) for n in range(1, 40)]
    embedder._engine = spy
    try:
        got = np.stack([embedder.embed_query(q) for q in queries])
    finally:
        embedder._engine = real
    assert PAD_MULTIPLE >= 8 and widths and all(w % PAD_MULTIPLE == 0 for w in widths), widths
    assert len(set(widths)) <= -(-max(widths) // PAD_MULTIPLE), sorted(set(widths))
    plain = embedder.model.encode(queries, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(got, plain, atol=2e-5)


def test_embedder_bf16_stays_close(settings, embedder):
    from rag.embed import Embedder

    bf = Embedder(settings.embedding_model, dtype="bfloat16", offline=True, cache_dir=settings.model_cache)
    texts = [d[:400] for d in DOCS]
    cos = np.sum(bf.embed_documents(texts) * embedder.embed_documents(texts), axis=1)
    assert cos.min() > 0.995


# -- benchmark helpers (rag bench) ------------------------------------------------------------------
def test_bench_flops_and_serve_helpers():
    from types import SimpleNamespace

    from bench.rerank import encoder_flops
    from bench.serve import _check_loopback, _steady_rate, parse_prometheus

    cfg = SimpleNamespace(hidden_size=384, intermediate_size=1536, num_hidden_layers=6)
    per_req = encoder_flops(cfg, [222] * 100)
    assert 500e9 < per_req < 560e9  # the issue's ~530 GFLOP for 100 pairs of 222 tokens
    text = (
        'ray_rag_rerank_batch_pairs_bucket{le="100.0",x="a"} 2\n'
        'ray_rag_rerank_batch_pairs_bucket{le="+Inf",x="a"} 3\n'
        'ray_rag_rerank_batch_pairs_count{x="a"} 3\n'
        'ray_rag_rerank_batch_pairs_sum{x="a"} 400\n'
        'ray_serve_actual_batch_size_count{deployment="Embedder"} 9\n'
        'ray_serve_actual_batch_size_count{deployment="Reranker"} 4\n'
    )
    m = parse_prometheus(text)
    assert m["ray_rag_rerank_batch_pairs"] == {"le=100.0": 2, "le=+Inf": 3, "count": 3, "sum": 400}
    assert m["ray_serve_actual_batch_size"]["count"] == 4  # the Reranker's only
    # bursts of 4 completions every 10 s: 3 bursts after the first over 30 s
    done = [(t + 0.01 * i, 100) for t in (0.0, 10.0, 20.0, 30.0) for i in range(4)]
    assert _steady_rate(done) == pytest.approx(1200 / 30.03, rel=1e-2)
    _check_loopback("http://127.0.0.1:8000")
    with pytest.raises(ConfigError, match="only targets this machine"):
        _check_loopback("http://example.com:8000")
