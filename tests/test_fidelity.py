"""Fidelity guard on a Cranfield slice: the fast reranker's top-8 and score order against the fp32 reference.

The full figure (225 queries x 100 dense candidates) is `rag bench rerank`; here a few queries, same metric:
top-8 positions matching fp32 >= 99% on average and Spearman of the 100 scores >= 0.99. Dense candidates are
exact cosine top-100 over the corpus embeddings (numpy, no database). Skips without ../shared.
"""

from __future__ import annotations

import numpy as np
import pytest

QUERIES = (0, 57, 140)  # spread over the 225


@pytest.fixture(scope="module")
def slice_pairs(cranfield, embedder):
    from bench.common import load_cranfield

    ds = load_cranfield(cranfield)
    dv = embedder.embed_documents(ds.docs)
    qv = embedder.embed_queries([ds.queries[i] for i in QUERIES])
    top = np.argsort(-(qv @ dv.T), axis=1, kind="stable")[:, :100]
    return [[(ds.queries[qi], ds.docs[j]) for j in row] for qi, row in zip(QUERIES, top, strict=True)]


def test_fast_reranker_matches_fp32_on_cranfield_slice(slice_pairs, reranker):
    from sentence_transformers import CrossEncoder

    from bench.rerank import fidelity_metrics

    seed = CrossEncoder(reranker.resolved.path, device="cpu", max_length=reranker.max_length)  # fp32
    ref = [seed.predict(p, batch_size=32, show_progress_bar=False) for p in slice_pairs]
    got = [reranker.score(p) for p in slice_pairs]
    m = fidelity_metrics(ref, got, k=8)
    assert m["top8_position_match"] >= 0.99, m
    assert m["spearman_mean"] >= 0.99, m
    assert m["pass"] is True


def test_fidelity_metrics_definitions():
    from bench.rerank import fidelity_metrics, spearman

    ref = [np.arange(20.0)]
    swapped = np.arange(20.0)
    swapped[[19, 18]] = swapped[[18, 19]]  # the top two change places
    m = fidelity_metrics(ref, [swapped], k=8)
    assert m["top8_position_match"] == pytest.approx(6 / 8) and m["top8_overlap"] == 1.0
    assert m["spearman_min"] < 1.0 and spearman(np.arange(5.0), np.arange(5.0)) == pytest.approx(1.0)
    assert fidelity_metrics(ref, ref)["pass"] is True
