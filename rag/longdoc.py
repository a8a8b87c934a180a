"""Long documents: split into overlapping windows that fit the cross-encoder, scored, then combined.

A cross-encoder reads at most ``max_length`` tokens of ``[CLS] query [SEP] document [SEP]``; a longer
document used to be cut silently after its first ~500 tokens. ``Windower.plan`` reads at most
``max_tokens_per_doc`` tokens of each document (Cohere's parameter; the rest is never tokenized twice:
a 1 MB document costs a tokenizer pass over a prefix only) and splits what it read into windows of
``window_tokens(query)`` tokens (query + window + special tokens = ``max_length``) sharing ``overlap``
tokens, cut at word boundaries. Every window is one (query, window) pair for the reranker: the batcher
counts them as pairs. ``Plan.combine`` turns the window scores back into one score per document:

- ``max`` (default): the best window's score; the reported span is that window's;
- ``mean``: the mean over the windows (the span is still the best window's);
- ``first``: the first window only (what truncation did; ``max_windows=1``).

A document that fits in one window is passed through unchanged (its pair is exactly what it was before
windowing existed), so short documents and /search chunks score as they always did. An empty or
whitespace-only document is one empty window: the model scores the query against nothing, like any text.

Pure Python over a Hugging Face fast tokenizer; no ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from rag.errors import InvalidInput

if TYPE_CHECKING:
    from rag.rerank.base import RerankBackend
    from rag.stages import RerankerConfig

__all__ = ["AGGREGATIONS", "DocPlan", "DocScore", "Plan", "Windower", "combine", "windower_for"]

Aggregation = Literal["max", "mean", "first"]
AGGREGATIONS: tuple[str, ...] = ("max", "mean", "first")
MIN_WINDOW = 32  # a query longer than the model's window still leaves this much of the document
# A BERT word piece covers at most ~100 characters (max_input_chars_per_word), usually ~4: the first pass
# tokenizes this many characters per wanted token and grows the prefix only when that was not enough.
_CHARS_PER_TOKEN = 12
_MAX_CHARS_PER_TOKEN = 100  # ... and never reads more than this many characters per wanted token


@dataclass(frozen=True)
class DocPlan:
    """One document's windows: character spans into the document, and the text of each window."""

    spans: tuple[tuple[int, int], ...]
    texts: tuple[str, ...]
    tokens: int  # tokens of this document's pairs (query + window + special tokens), as the model reads them
    doc_tokens: int  # document tokens read (<= max_tokens_per_doc)
    cut: bool  # max_tokens_per_doc (or max_windows) stopped the reading before the end of the document


@dataclass(frozen=True)
class DocScore:
    score: float
    best: int  # index of the best-scoring window
    span: tuple[int, int] | None  # character span of the best window when the document was split
    windows: int


@dataclass
class Plan:
    query: str
    docs: list[DocPlan]

    @property
    def texts(self) -> list[str]:
        """The window texts of every document, flattened: the reranker's pairs are (query, text)."""
        return [t for d in self.docs for t in d.texts]

    @property
    def n_pairs(self) -> int:
        return sum(len(d.texts) for d in self.docs)

    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.docs)

    def combine(self, scores: Sequence[float], mode: str = "max") -> list[DocScore]:
        return combine(self.docs, scores, mode)


def combine(docs: Sequence[DocPlan], scores: Sequence[float], mode: str = "max") -> list[DocScore]:
    """Window scores (flat, in plan order) -> one score per document (see the module docstring)."""
    if mode not in AGGREGATIONS:
        raise InvalidInput(f"long-document aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    n = sum(len(d.texts) for d in docs)
    if len(scores) != n:
        raise ValueError(f"{len(scores)} scores for {n} windows")
    out, i = [], 0
    for d in docs:
        w = [float(s) for s in scores[i : i + len(d.texts)]]
        i += len(d.texts)
        best = max(range(len(w)), key=lambda j: w[j])
        if mode == "mean":
            score = sum(w) / len(w)
        elif mode == "first":
            score = w[0]
        else:
            score = w[best]
        split = len(d.spans) > 1
        out.append(DocScore(score, best, d.spans[best] if split else None, len(w)))
    return out


class Windower:
    """Plans the windows of documents for one query, with the reranker's own tokenizer."""

    def __init__(
        self, tokenizer: Any, max_length: int, *, overlap: int = 64, max_tokens_per_doc: int = 4096
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("long-document windows need a fast (Rust) tokenizer for character offsets")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.overlap = int(overlap)
        self.max_tokens_per_doc = int(max_tokens_per_doc)
        self.specials = int(tokenizer.num_special_tokens_to_add(pair=True))

    def info(self) -> dict[str, Any]:
        return {
            "max_length": self.max_length,
            "overlap": self.overlap,
            "max_tokens_per_doc": self.max_tokens_per_doc,
        }

    def query_tokens(self, query: str) -> int:
        return len(self.tokenizer(query, add_special_tokens=False, verbose=False)["input_ids"])

    def window_tokens(self, query: str) -> int:
        """Document tokens per window: what ``max_length`` leaves after the query and the special tokens."""
        return max(MIN_WINDOW, self.max_length - self.specials - self.query_tokens(query))

    def _encode(self, docs: Sequence[str], limit: int) -> list[tuple[list[tuple[int, int]], list[Any], bool]]:
        """(offsets, word ids, read a prefix only) of at most ``limit`` tokens of each document."""
        out: list[Any] = [None] * len(docs)
        todo = list(range(len(docs)))
        chars = max(256, limit * _CHARS_PER_TOKEN)
        while todo:
            texts, cut = [], []
            for i in todo:
                d = docs[i]
                if len(d) > chars:
                    # drop the last (maybe partial) word so that every token kept is the full text's token
                    space = max(d.rfind(" ", 0, chars), d.rfind("\n", 0, chars))
                    texts.append(d[: space if space > 0 else chars])
                    cut.append(True)
                else:
                    texts.append(d)
                    cut.append(False)
            enc = self.tokenizer(
                texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False, truncation=False
            )
            again = []
            for j, i in enumerate(todo):
                offsets = enc["offset_mapping"][j]
                if cut[j] and len(offsets) <= limit and chars < limit * _MAX_CHARS_PER_TOKEN:
                    again.append(i)  # the prefix held fewer tokens than wanted: read a longer one
                    continue
                out[i] = (list(offsets[:limit]), enc.word_ids(j)[: limit + 1], cut[j])
            todo, chars = again, chars * 4
        return out

    def plan(
        self,
        query: str,
        docs: Sequence[str],
        *,
        max_tokens_per_doc: int | None = None,
        max_windows: int | None = None,
        too_long: Literal["split", "error"] = "split",
        field: str = "documents",
        specials: int | None = None,
    ) -> Plan:
        """The windows of every document. ``too_long="error"``: a pair longer than ``max_length`` tokens is
        an InvalidInput (TEI's ``truncate: false``) instead of being split. ``specials``: tokens a pair costs
        beyond its query and document (default: the tokenizer's special tokens; an LLM reranker's prompt)."""
        limit = int(max_tokens_per_doc or self.max_tokens_per_doc)
        q = self.query_tokens(query) + ((specials - self.specials) if specials is not None else 0)
        width = max(MIN_WINDOW, self.max_length - self.specials - q)
        overlap = min(self.overlap, width // 2)
        encoded = self._encode(docs, limit + 1)  # one token more tells whether the limit cut the document
        plans = []
        for i, (doc, (offsets, words, partial)) in enumerate(zip(docs, encoded, strict=True)):
            n_all = len(offsets) + (1 if partial else 0)  # a prefix only: there is more after it
            n = min(len(offsets), limit)
            if too_long == "error" and q + self.specials + n_all > self.max_length:
                more = "more than " if n_all > limit else ""
                raise InvalidInput(
                    f"{field}[{i}] is {more}{q + self.specials + n_all} tokens with the query; the model "
                    f"reads at most {self.max_length} (truncate: false): shorten it, or send "
                    "truncate: true (first window) or leave truncate out (long documents are split)"
                )
            if n <= width and n == n_all and not partial:  # fits: the document itself, unchanged
                plans.append(
                    DocPlan(((0, len(doc)),), (doc,), min(self.max_length, q + self.specials + n), n, False)
                )
                continue
            ranges = _windows(n, words, width, overlap, max_windows)
            spans = tuple((offsets[a][0], offsets[b - 1][1]) if b > a else (0, 0) for a, b in ranges)
            texts = tuple(doc[a:b] for a, b in spans)
            read = sum(min(self.max_length, q + self.specials + (b - a)) for a, b in ranges)
            cut = n_all > n or ranges[-1][1] < n
            plans.append(DocPlan(spans, texts, read, n, cut))
        return Plan(query, plans)


def _word_start(words: Sequence[Any], k: int, floor: int) -> int:
    """Move token index ``k`` back to the first token of its word (not below ``floor + 1``)."""
    while k > floor + 1 and k < len(words) and words[k] is not None and words[k] == words[k - 1]:
        k -= 1
    return k


def _windows(
    n: int, words: Sequence[Any], width: int, overlap: int, max_windows: int | None
) -> list[tuple[int, int]]:
    """Token ranges [a, b) of windows of at most ``width`` of ``n`` tokens, ``overlap`` shared, cut between
    words."""
    if n == 0:
        return [(0, 0)]
    spans: list[tuple[int, int]] = []
    a = 0
    while True:
        b = min(n, a + width)
        if b < n:
            b = _word_start(words, b, a)  # do not cut a word in two
        spans.append((a, b))
        if b >= n or (max_windows is not None and len(spans) >= max_windows):
            return spans
        nxt = _word_start(words, max(a + 1, b - overlap), a)
        a = nxt if nxt > a else b


def windower_for(backend: RerankBackend, cfg: RerankerConfig) -> Windower | None:
    """The Windower of a backend that reads pairs through a fast tokenizer (the cross-encoder), sized by
    ``cfg``; None for backends that read documents themselves (Cohere splits long documents on its side)."""
    tok = backend.tokenizer
    if tok is None or not backend.max_length or not getattr(tok, "is_fast", False):
        return None
    return Windower(
        tok,
        backend.max_length,
        overlap=cfg.rerank_window_overlap,
        max_tokens_per_doc=cfg.rerank_max_tokens_per_doc,
    )
