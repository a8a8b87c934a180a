"""Loaders and chunking: folders, JSONL, BEIR, the stdlib demo corpus, and bad input."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from rag.errors import IngestError
from rag.ingest import chunk_text, ingest, iter_demo, iter_path, iter_paths


def test_folder_reads_text_files_and_skips_undecodable_ones(tmp_path, caplog):
    (tmp_path / "a.md").write_text("# Title\nSome markdown.")
    (tmp_path / "b.txt").write_text("Plain text.")
    (tmp_path / "c.rst").write_text("reST text.")
    (tmp_path / "ignored.py").write_text("print('not a document')")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf-8 \x80")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    skipped: list[str] = []
    with caplog.at_level(logging.WARNING):
        docs = list(iter_path(tmp_path, skipped))
    assert sorted(d.content for d in docs) == ["# Title\nSome markdown.", "Plain text.", "reST text."]
    assert len(skipped) == 1 and "bad.txt" in skipped[0] and "UTF-8" in skipped[0]
    assert "bad.txt" in caplog.text


def test_jsonl_ids_sources_and_bad_lines(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps({"id": "x1", "source": "wiki", "content": "first"}),
                json.dumps({"text": "second, no id"}),
                "{not json",
                json.dumps({"id": "x3"}),
                json.dumps({"_id": "7", "title": "A title", "text": "body"}),
            ]
        )
    )
    skipped: list[str] = []
    docs = list(iter_path(f, skipped))
    assert [d.doc_id for d in docs][0] == "x1" and docs[0].source == "wiki"
    assert len(docs[1].doc_id) == 16  # content-derived id: stable across runs
    assert docs[2].content == "A title body" and docs[2].doc_id == "7"
    assert [s.split(": ")[0] for s in skipped] == [f"{f}:3", f"{f}:4"]


def test_beir_folder_reads_only_the_corpus(tmp_path):
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"_id": "1", "title": "t", "text": "x"}) + "\n")
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "a query"}) + "\n")
    docs = list(iter_path(tmp_path))
    assert [(d.doc_id, d.content) for d in docs] == [("1", "t x")]


def test_missing_path_and_unsupported_type(tmp_path):
    with pytest.raises(IngestError, match="path not found"):
        list(iter_paths([tmp_path, tmp_path / "nope"]))
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(IngestError, match=r"unsupported file type \.pdf"):
        list(iter_path(tmp_path / "x.pdf"))


def test_chunking_windows_overlap_and_keep_text(embedder):
    text = " ".join(f"word{i}" for i in range(400))
    chunks = chunk_text(text, embedder.tokenizer, 100, 20)
    assert len(chunks) > 3
    assert all(embedder.count_tokens(c) <= 100 for c in chunks)
    assert chunks[0].startswith("word0") and chunks[-1].endswith("word399")
    assert all(c in text for c in chunks)  # slices of the original, nothing rewritten
    tail_of_first = chunks[0].split()[-3:]
    assert " ".join(tail_of_first) in chunks[1]  # consecutive windows overlap
    assert chunk_text("short text", embedder.tokenizer, 100, 20) == ["short text"]
    assert chunk_text("   ", embedder.tokenizer, 100, 20) == []
    with pytest.raises(IngestError, match="overlap"):
        chunk_text(text, embedder.tokenizer, 50, 50)


def test_long_documents_become_several_chunks_of_one_document(embedder, store, collection):
    from rag.ingest import Document

    long = Document("long", " ".join(f"Sentence number {i} about gliders." for i in range(200)), "long.txt")
    rep = ingest(
        [long], embedder=embedder, store=store, collection=collection, chunk_tokens=64, chunk_overlap=8
    )
    assert rep.documents_added == 1 and rep.chunks_added > 5
    hits = store.search(collection, embedder.embed_query("gliders"), 50)
    assert {h["doc_id"] for h in hits} == {"long"}
    assert sorted(h["chunk_index"] for h in hits) == list(range(rep.chunks_added))


def test_demo_corpus_reads_docstrings_without_importing():
    for mod in ("antigravity", "this", "tkinter", "turtle"):
        sys.modules.pop(mod, None)
    docs = list(iter_demo(limit=3000))
    assert len(docs) == 3000
    assert not {"antigravity", "this", "tkinter", "turtle"} & set(sys.modules)
    kinds = {d.metadata["kind"] for d in docs}
    assert kinds == {"module", "class", "function", "method"}
    d = next(d for d in docs if d.doc_id == "json.dumps")
    assert "Serialize" in d.content and d.source.endswith(".py:" + str(d.metadata["line"]))
    assert len({d.doc_id for d in docs}) == len(docs)


def test_a_file_that_cannot_be_stored_is_skipped_and_the_rest_of_its_batch_written(
    tmp_path, embedder, store, collection
):
    import os

    from rag.ingest import IngestReport

    (tmp_path / "good1.txt").write_text("The datetime module parses dates.")
    (tmp_path / "nul.txt").write_text("text with a \x00 NUL byte inside")
    (tmp_path / "good2.txt").write_text("Sockets are network endpoints.")
    (tmp_path / "empty.txt").write_text("   \n")
    with open(os.path.join(os.fsencode(tmp_path), b"bad-\xff-name.txt"), "w") as f:
        f.write("a readable text behind an undecodable file name")
    rep = IngestReport(collection)
    docs = iter_paths([tmp_path], rep.skipped)
    ingest(docs, embedder=embedder, store=store, collection=collection, batch_docs=64, report=rep)
    assert rep.documents_added == 2 and store.count(collection) == 2  # the same batch's good files
    assert rep.documents_empty == 1 and "1 empty" in rep.summary()
    assert len(rep.skipped) == 2, rep.skipped
    nul = next(s for s in rep.skipped if "nul.txt" in s)
    assert "NUL" in nul
    bad = next(s for s in rep.skipped if "bad-" in s)
    assert "bad-\\xff-name.txt" in bad and "rename" in bad  # named, printably (its raw byte)
    assert "2 skipped" in rep.summary()
