"""The int8 reranker screen: NNCF-quantized OpenVINO copy of the cross-encoder, the fp32 refine unchanged.

Fidelity on a Cranfield slice (the full 225-query figure is `rag bench rerank`): the int8-screen path's top-8
matches the fp32 reference in >= 99% of positions and Spearman >= 0.99. Offline the reranker is the untrained
stand-in (rag/models.py): the figures are about the quantization, not about relevance.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from rag.errors import ConfigError

pytest.importorskip("openvino", reason="the int8 screen runs on OpenVINO: pip install openvino")
pytest.importorskip("nncf", reason="the int8 screen is built with NNCF: pip install nncf (in the dev extra)")

QUERIES = (0, 57, 140)  # as tests/test_fidelity.py


def _reranker(settings, cache_dir=None, model=None, **kw):
    from rag.models import StandInWarning
    from rag.rerank import CrossEncoderReranker

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        return CrossEncoderReranker(
            model or settings.rerank_model, cache_dir=cache_dir or settings.model_cache, offline=True, **kw
        )


@pytest.fixture(scope="module")
def int8_reranker(settings):
    return _reranker(settings, screen="int8", device="cpu")


def test_int8_screen_is_what_info_reports(int8_reranker):
    info = int8_reranker.info()
    assert info["screen"] == "int8" and info["runtime"] == "openvino"
    assert info["refine_top"] == 8 and "float32" in info["refine"]  # the fp32 refine of the head is kept
    assert int8_reranker.engine.int8_xml is not None and int8_reranker.engine.int8_xml.exists()
    assert "int8-v" in str(int8_reranker.engine.int8_xml.parent)  # keyed by the int8 recipe version
    assert set(int8_reranker.engine.precisions) == {"int8", "f32"}


def test_int8_ir_is_cached_and_reused(settings, int8_reranker):
    xml = int8_reranker.engine.int8_xml
    before = xml.stat().st_mtime_ns
    again = _reranker(settings, screen="int8", device="cpu")
    assert again.engine.int8_xml == xml and xml.stat().st_mtime_ns == before  # read, not quantized again
    pairs = [("what is a heap", "heapq: heap queue algorithm"), ("what is a heap", "json: JSON encoder")]
    assert again.score(pairs) == pytest.approx(int8_reranker.score(pairs), abs=1e-6)


def test_int8_screen_head_is_fp32(int8_reranker, settings):
    """The refined head carries fp32 scores: equal to the fp32 screen's own scores."""
    fp32 = _reranker(settings, screen="fp32", device="cpu")
    from rag.ingest import iter_demo

    docs = [d.content for d in iter_demo(limit=60)]
    pairs = [("how do I compare two sequences", d) for d in docs]
    got = np.asarray(int8_reranker.score(pairs))
    ref = np.asarray(fp32.score(pairs))
    head = np.argsort(-ref, kind="stable")[:8]
    assert np.array_equal(np.argsort(-got, kind="stable")[:8], head)
    np.testing.assert_allclose(got[head], ref[head], atol=1e-4)
    assert not np.allclose(got, ref, atol=1e-4)  # the tail really is the int8 screen's


def test_settings_knob_reaches_the_reranker(settings):
    from rag.rerank import make_reranker
    from rag.settings import Settings

    s = Settings(data_dir=settings.data_dir, offline=True, rerank_screen="int8", rerank_device="cpu")
    assert s.slice("reranker").rerank_screen == "int8"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert make_reranker(s.slice("reranker")).info()["screen"] == "int8"


def test_int8_needs_openvino_on_cpu(settings):
    with pytest.raises(ConfigError, match="RAG_RERANK_RUNTIME=openvino"):
        _reranker(settings, screen="int8", runtime="torch", device="cpu")
    with pytest.raises(ConfigError, match="rerank_screen must be one of"):
        _reranker(settings, screen="int4", device="cpu")


def test_without_nncf_int8_names_the_fix_and_auto_stays_float(settings, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` raises ImportError, as when not installed
    with pytest.raises(ConfigError, match="pip install nncf"):
        _reranker(settings, cache_dir=tmp_path, screen="int8", device="cpu")  # nothing cached there
    auto = _reranker(settings, cache_dir=tmp_path, device="cpu")
    assert auto.info()["screen"] in ("bfloat16", "float32") and "int8" not in auto.engine.precisions


def test_int8_screen_matches_fp32_on_cranfield_slice(cranfield, embedder, int8_reranker):
    from sentence_transformers import CrossEncoder

    from bench.common import load_cranfield
    from bench.rerank import fidelity_metrics

    ds = load_cranfield(cranfield)
    dv = embedder.embed_documents(ds.docs)
    qv = embedder.embed_queries([ds.queries[i] for i in QUERIES])
    top = np.argsort(-(qv @ dv.T), axis=1, kind="stable")[:, :100]
    slices = [[(ds.queries[qi], ds.docs[j]) for j in row] for qi, row in zip(QUERIES, top, strict=True)]
    seed = CrossEncoder(int8_reranker.resolved.path, device="cpu", max_length=int8_reranker.max_length)
    ref = [seed.predict(p, batch_size=32, show_progress_bar=False) for p in slices]
    got = [int8_reranker.score(p) for p in slices]
    m = fidelity_metrics(ref, got, k=8)
    assert m["top8_position_match"] >= 0.99, m
    assert m["spearman_mean"] >= 0.99, m


def test_prebuilt_ir_dir_is_read_not_written(settings, int8_reranker, tmp_path, monkeypatch):
    """The image's case (Dockerfile): float and int8 IR under a read-only RAG_RERANK_IR_DIR are used as they
    are; NNCF is not needed to run them, and nothing is converted or quantized into the writable cache."""
    import shutil
    import stat

    src = int8_reranker.engine.xml.parent
    prebuilt = tmp_path / "image-ir"
    shutil.copytree(src, prebuilt / "openvino" / src.name, ignore=shutil.ignore_patterns("blobs", "*.json"))
    for p in prebuilt.rglob("*"):
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    monkeypatch.setitem(sys.modules, "nncf", None)
    writable = tmp_path / "cache"
    model = int8_reranker.resolved.path  # the same model folder (an image's HF cache): the same IR key
    r = _reranker(settings, cache_dir=writable, model=model, screen="int8", device="cpu", ir_dir=prebuilt)
    assert r.engine.xml.is_relative_to(prebuilt) and r.engine.int8_xml.is_relative_to(prebuilt)
    assert not list(writable.rglob("model.xml"))  # nothing converted or quantized again
    pairs = [("what is a heap", "heapq: heap queue algorithm")]
    assert r.score(pairs) == pytest.approx(int8_reranker.score(pairs), abs=1e-6)


def test_auto_tries_int8_only_without_native_bf16(settings, tmp_path):
    """With native bf16 the bf16 screen won every measurement (docs/BENCHMARKS.md): auto does not quantize."""
    from rag.accel import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16: auto measures int8 against fp32 here")
    r = _reranker(settings, cache_dir=tmp_path, device="cpu")
    assert r.info()["screen"] == "bfloat16" and "int8" not in r.engine.precisions
    assert "int8 not tried" in r.info()["screen_choice"]
    assert not list(tmp_path.rglob("int8-*")), "auto quantized although it will not use int8"
