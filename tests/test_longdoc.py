"""Long documents (rag.longdoc): windows that fit the model, their scores combined, the winning span.

The acceptance test holds for any model, the untrained stand-in included, because it is phrased in the
model's own scores: the candidate it scores highest is buried after 2,000+ tokens of other candidates; split
into windows, the document's score is the max of its windows' scores, the winning window is the one that
holds the passage and the reported span covers it, while truncated scoring (what the model reads of the
whole document at once) never reaches the passage.
"""

from __future__ import annotations

import itertools
import warnings

import pytest

from rag.errors import InvalidInput
from rag.longdoc import MIN_WINDOW, Windower, combine

QUERY = "What is the capital of the United States?"
PASSAGES = [
    "Carson City is the capital city of the American state of Nevada.",
    "The Commonwealth of the Northern Mariana Islands is a group of islands in the Pacific Ocean.",
    "Washington, D.C. is the capital of the United States.",
    "Capital punishment has existed in the United States since before it was a country.",
    "The White House is the official residence of the president of the United States.",
    "Ottawa is the capital city of Canada.",
]


@pytest.fixture(scope="module")
def fp32(settings):
    """The stand-in reranker in float32 (no bf16 screen): a pair's score does not depend on its batch."""
    from rag.models import StandInWarning
    from rag.rerank import CrossEncoderReranker

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        return CrossEncoderReranker(
            settings.rerank_model, cache_dir=settings.model_cache, offline=True, dtype="float32"
        )


@pytest.fixture(scope="module")
def tok(fp32):
    return fp32.tokenizer


def _blocks(tok, width: int, n: int) -> list[str]:
    """``n`` texts of exactly ``width`` tokens each, from stdlib docstrings (whole words only)."""
    from rag.ingest import iter_demo

    words = [w for d in iter_demo(limit=80) for w in d.content.split() if w.isascii() and w.isalpha()]
    count = {w: len(tok(w, add_special_tokens=False)["input_ids"]) for w in set(words)}
    blocks, i = [], 0
    for _ in range(n):
        out, total = [], 0
        while total < width:
            w = words[i % len(words)]
            i += 1
            if total + count[w] <= width:
                out.append(w)
                total += count[w]
            elif width - total <= 2:
                out.extend(["the"] * (width - total))  # "the" is one token
                total = width
        blocks.append(" ".join(out))
    return blocks


def test_buried_passage_wins_with_windows_and_is_never_read_truncated(fp32, tok):
    windower = Windower(tok, fp32.max_length, overlap=0, max_tokens_per_doc=8192)
    width = windower.window_tokens(QUERY)
    blocks = _blocks(tok, width, 12)
    candidates = PASSAGES + blocks
    scores = fp32.score([(QUERY, c) for c in candidates])
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    assert scores[order[0]] - scores[order[1]] > 1e-4, "a tie at the top: pick another query"
    passage = candidates[order[0]]  # what the model scores highest among the candidates
    filler = [b for b in blocks if b != passage][:5]  # other candidates, each scored lower on its own
    assert len(filler) * width >= 2000
    doc = " ".join(filler) + " " + passage
    start = doc.rindex(passage)

    plan = windower.plan(QUERY, [doc])
    d = plan.docs[0]
    assert len(d.texts) == len(filler) + 1 and d.texts[-1] == passage  # a window per block, then the passage
    window_scores = fp32.score([(QUERY, t) for t in plan.texts])
    res = plan.combine(window_scores, "max")[0]
    assert res.score == max(window_scores)  # the document's score is the max over its windows
    assert res.best == len(filler)  # ... and the winning window is the one holding the passage
    assert res.span is not None and res.span[0] <= start and res.span[1] >= start + len(passage)
    assert doc[res.span[0] : res.span[1]] == passage
    assert res.score == pytest.approx(scores[order[0]], abs=1e-5)  # the passage's own score

    # today's truncated scoring reads the first max_length tokens of (query, document): never the passage
    enc = tok(QUERY, doc, truncation="longest_first", max_length=fp32.max_length, return_offsets_mapping=True)
    doc_ends = [e for (s, e), seq in zip(enc["offset_mapping"], enc.sequence_ids(), strict=True) if seq == 1]
    assert max(doc_ends) < start
    truncated = fp32.score([(QUERY, doc)])[0]
    assert truncated == pytest.approx(window_scores[0], abs=1e-4)  # it scores the first window
    assert truncated < res.score


def test_mean_and_first_aggregations(fp32, tok):
    windower = Windower(tok, fp32.max_length, overlap=64)
    doc = " ".join(PASSAGES * 60)
    plan = windower.plan(QUERY, [doc])
    ws = fp32.score([(QUERY, t) for t in plan.texts])
    assert plan.combine(ws, "mean")[0].score == pytest.approx(sum(ws) / len(ws))
    assert plan.combine(ws, "first")[0].score == ws[0]
    first = windower.plan(QUERY, [doc], max_windows=1)
    assert first.n_pairs == 1 and first.docs[0].cut and first.texts[0] == plan.texts[0]
    with pytest.raises(InvalidInput, match="aggregation"):
        combine(plan.docs, ws, "median")


def test_windows_fit_the_model_overlap_and_cover_the_document(tok):
    windower = Windower(tok, 128, overlap=16, max_tokens_per_doc=100_000)
    doc = " ".join(f"token{i} internationalisation" for i in range(400))
    plan = windower.plan("short query", [doc])
    width = windower.window_tokens("short query")
    spans = plan.docs[0].spans
    assert len(spans) > 5 and spans[0][0] == 0 and spans[-1][1] == len(doc)
    for (a0, b0), (a1, b1) in itertools.pairwise(spans):
        assert a0 < a1 < b0 < b1  # consecutive windows overlap and move forward
    for t in plan.texts:
        n = len(tok(t, add_special_tokens=False)["input_ids"])
        assert n <= width  # query + window + special tokens fit max_length
        assert not t.startswith("##") and t == t.strip()
        pair = tok("short query", t)["input_ids"]
        assert len(pair) <= 128
    # every run of <= overlap tokens lies inside one window: no passage that short is ever cut in two
    words = doc.split()
    for i in range(0, len(words) - 3, 7):
        phrase = " ".join(words[i : i + 3])  # ~9 tokens < 16
        pos = doc.index(phrase + " ") if i + 3 < len(words) else doc.rindex(phrase)
        assert any(a <= pos and pos + len(phrase) <= b for a, b in spans), phrase


def test_short_documents_pass_through_unchanged(tok):
    windower = Windower(tok, 512)
    docs = ["a short document", "", "   \n ", "Ünïcode ✓ text"]
    plan = windower.plan(QUERY, docs)
    assert plan.texts == docs and plan.n_pairs == 4  # the pair is exactly what it was before windows
    assert all(d.spans == ((0, len(doc)),) and not d.cut for d, doc in zip(plan.docs, docs, strict=True))
    q = windower.query_tokens(QUERY)
    assert plan.docs[1].tokens == q + 3 and plan.docs[1].doc_tokens == 0  # empty: the query alone
    res = plan.combine([0.1, 0.2, 0.3, 0.4])
    assert [r.span for r in res] == [None] * 4 and [r.windows for r in res] == [1] * 4


def test_max_tokens_per_doc_bounds_the_reading_of_a_1mb_document(tok):
    import time

    windower = Windower(tok, 512, overlap=64, max_tokens_per_doc=4096)
    big = "lorem ipsum dolor sit amet " * 40_000  # ~1 MB
    t0 = time.perf_counter()
    plan = windower.plan(QUERY, [big])
    elapsed = time.perf_counter() - t0
    d = plan.docs[0]
    assert d.doc_tokens == 4096 and d.cut
    assert d.spans[-1][1] < 40_000  # ~4096 tokens of a million characters
    assert len(d.texts) == 10 and elapsed < 5
    small = windower.plan(QUERY, [big], max_tokens_per_doc=600)
    assert small.docs[0].doc_tokens == 600 and small.n_pairs == 2
    one_word = windower.plan(QUERY, ["x" * 1_000_000])  # no spaces at all: still bounded
    assert one_word.docs[0].cut and len(one_word.texts[0]) < 1_000_000


def test_truncate_false_refuses_what_does_not_fit(tok):
    windower = Windower(tok, 128)
    ok = windower.plan("q", ["fits " * 50], too_long="error")
    assert ok.n_pairs == 1
    with pytest.raises(InvalidInput, match=r"texts\[1\] is \d+ tokens .* at most 128 \(truncate: false\)"):
        windower.plan("q", ["fits", "too long " * 200], too_long="error", field="texts")


def test_a_query_longer_than_the_window_still_leaves_room(tok):
    windower = Windower(tok, 64)
    long_query = "capital " * 100
    assert windower.window_tokens(long_query) == MIN_WINDOW
    plan = windower.plan(long_query, ["word " * 300])
    assert plan.n_pairs > 1
