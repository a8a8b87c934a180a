"""Metrics against hand-computed values; loaders; a tiny end-to-end evaluation."""

from __future__ import annotations

import json
import math

import pytest

from rag.errors import IngestError
from rag.eval import ensure_corpus, evaluate, load_beir, load_jsonl, mrr, ndcg_at_k, recall_at_k, save_results


def test_recall():
    assert recall_at_k(["a", "b", "c"], {"a": 1, "d": 2}, 2) == 0.5
    assert recall_at_k(["x"], {}, 5) == 0.0
    assert recall_at_k(["a", "b"], {"a": 1, "b": 0}, 2) == 1.0  # grade 0 is not relevant


def test_ndcg_graded_by_hand():
    ranked = ["a", "b", "c"]
    rel = {"a": 1, "c": 3, "z": 2}
    dcg = (2**1 - 1) / math.log2(2) + 0 + (2**3 - 1) / math.log2(4)  # 1 + 3.5
    idcg = (2**3 - 1) / math.log2(2) + (2**2 - 1) / math.log2(3) + (2**1 - 1) / math.log2(4)
    assert ndcg_at_k(ranked, rel, 3) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["c", "z", "a"], rel, 3) == pytest.approx(1.0)
    assert ndcg_at_k(["q"], {}, 10) == 0.0


def test_mrr():
    assert mrr(["x", "y", "a"], {"a": 1}) == pytest.approx(1 / 3)
    assert mrr(["x"] * 10 + ["a"], {"a": 1}, 10) == 0.0


def _tiny_beir(root):
    docs = {
        "1": ("Wing lift", "Lift on a wing comes from the pressure difference over its surfaces."),
        "2": ("Heat", "Heat conduction in composite slabs under transient heating."),
        "3": ("Boundary layers", "Turbulent boundary layers on flat plates at supersonic speed."),
        "4": ("Bread", "Knead the dough and bake the bread until golden."),
    }
    with (root / "corpus.jsonl").open("w") as f:
        for i, (t, x) in docs.items():
            f.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    (root / "queries.jsonl").write_text(
        json.dumps({"_id": "1", "text": "how does a wing produce lift"})
        + "\n"
        + json.dumps({"_id": "2", "text": "heat conduction in slabs"})
        + "\n"
        + json.dumps({"_id": "9", "text": "an unjudged query"})
        + "\n"
    )
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\t1\t2\n2\t2\t1\n2\t3\t1\n")
    return root


def test_load_beir(tmp_path):
    ds = load_beir(_tiny_beir(tmp_path))
    assert set(ds.queries) == {"1", "2"}  # only judged queries
    assert ds.qrels["2"] == {"2": 1, "3": 1} and ds.key == "doc_id"
    with pytest.raises(IngestError, match="not a BEIR folder"):
        load_beir(tmp_path / "qrels")


def test_load_jsonl(tmp_path):
    f = tmp_path / "questions.jsonl"
    f.write_text(json.dumps({"question": "q?", "expected_sources": ["a.md", "b.md"]}) + "\n")
    ds = load_jsonl(f)
    assert ds.queries == {"1": "q?"} and ds.qrels == {"1": {"a.md": 1, "b.md": 1}} and ds.key == "source"
    f.write_text(json.dumps({"question": "q?"}) + "\n")
    with pytest.raises(IngestError, match="expected_sources"):
        load_jsonl(f)


def test_end_to_end_eval_on_a_tiny_beir_set(pipeline, collection, tmp_path):
    root = tmp_path / "beir"
    root.mkdir()
    ds = load_beir(_tiny_beir(root))
    assert ensure_corpus(pipeline, ds, collection) == 4
    assert ensure_corpus(pipeline, ds, collection) == 4  # reused, not re-ingested
    res = evaluate(pipeline, ds, collection=collection, fetch_k=4, top_k=2)
    dense = res["systems"]["dense"]
    assert dense["recall@2"] == pytest.approx((1.0 + 1.0) / 2)  # both queries find their documents
    assert dense["mrr@10"] == pytest.approx(1.0)
    assert "reranked" in res["systems"] and res["reranker"]["trained"] is False
    assert any("STAND-IN" in n for n in res["notes"])
    jpath, ppath = save_results(res, tmp_path / "out")
    assert json.loads(jpath.read_text())["queries"] == 2
    assert ppath is not None and ppath.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cranfield_loads(cranfield):
    ds = load_beir(cranfield)
    assert len(ds.queries) == 225 and sum(len(v) for v in ds.qrels.values()) == 1612


def test_eval_and_the_library_give_the_same_candidates_per_mode(pipeline, collection, tmp_path):
    """`rag eval` runs the library's search: for each mode, the same stage-1 candidates in the same order."""
    root = tmp_path / "beir"
    root.mkdir()
    ds = load_beir(_tiny_beir(root))
    ensure_corpus(pipeline, ds, collection)
    res = evaluate(pipeline, ds, collection=collection, rerank=False, fetch_k=4, top_k=2, keep_runs=True)
    assert set(res["systems"]) == {"dense", "lexical", "hybrid"} and res["modes"] == [
        "dense",
        "lexical",
        "hybrid",
    ]
    assert set(res["systems"]["hybrid"]) >= {"recall@2", "recall@4", "ndcg@10", "mrr@10"}
    assert res["systems"]["hybrid"]["strategies"] and set(res["systems"]["lexical"]["strategies"]) <= {
        "bm25",
        "bm25-scored",
    }
    for mode in ("dense", "lexical", "hybrid"):
        for qid, ids in res["runs"][mode].items():
            lib = pipeline.retrieve(ds.queries[qid], 10, collection=collection, mode=mode)
            assert ids == [h["id"] for h in lib], (mode, qid)
    # a keyword the lexical side ranks first: "slabs" is in one document only
    assert res["runs"]["lexical"]["2"][0].startswith("2")


def test_eval_reranks_each_mode_and_labels_the_stand_in(pipeline, collection, tmp_path):
    root = tmp_path / "beir"
    root.mkdir()
    ds = load_beir(_tiny_beir(root))
    ensure_corpus(pipeline, ds, collection)
    res = evaluate(pipeline, ds, collection=collection, fetch_k=4, top_k=2)
    assert set(res["systems"]) == {
        "dense",
        "reranked",
        "lexical",
        "lexical+reranked",
        "hybrid",
        "hybrid+reranked",
    }
    assert all(v["reranked"] == name.endswith("reranked") for name, v in res["systems"].items())
    assert any("STAND-IN" in n and "not relevance" in n for n in res["notes"])
    _, ppath = save_results(res, tmp_path / "out")
    assert ppath is not None and ppath.stat().st_size > 10_000
