"""Evaluation harness: stage 1 alone against stage 1 + rerank, on BEIR folders or questions.jsonl.

Metrics are computed per query on *documents* (chunks map back to their document; a document counts once,
at its best rank) and averaged over queries:

- recall@k: judged-relevant documents in the top k / all judged-relevant documents;
- nDCG@k with graded gains ``2^rel - 1`` (BEIR's convention; binary judgements give gain 1);
- MRR@k: 1 / rank of the first relevant document within the top k (0 if none).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag.errors import IngestError, RerankerError

if TYPE_CHECKING:
    from rag.pipeline import Pipeline

__all__ = [
    "EvalSet",
    "ensure_corpus",
    "evaluate",
    "load_beir",
    "load_dataset",
    "load_jsonl",
    "mrr",
    "ndcg_at_k",
    "plot_results",
    "recall_at_k",
    "save_results",
]

Qrels = dict[str, dict[str, int]]  # query id -> {document key -> grade}


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    rel = {d for d, g in relevant.items() if g > 0}
    if not rel:
        return 0.0
    return len(rel & set(ranked[:k])) / len(rel)


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    def gain(g: int) -> float:
        return 2.0**g - 1.0

    dcg = sum(gain(relevant.get(d, 0)) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(gain(g) / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr(ranked: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    for i, d in enumerate(ranked[:k]):
        if relevant.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


@dataclass
class EvalSet:
    """Queries with judgements. ``key`` is the hit field that judgements refer to (doc_id or source)."""

    name: str
    queries: dict[str, str]
    qrels: Qrels
    key: str = "doc_id"
    corpus: Path | None = None  # BEIR corpus.jsonl to ingest on first use
    notes: list[str] = field(default_factory=list)


def load_beir(folder: str | Path, split: str = "test") -> EvalSet:
    """A BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv (query-id, corpus-id, score)."""
    root = Path(folder).expanduser()
    qfile, rfile = root / "queries.jsonl", root / "qrels" / f"{split}.tsv"
    for f in (root / "corpus.jsonl", qfile, rfile):
        if not f.is_file():
            raise IngestError(
                f"not a BEIR folder: {f} is missing (expected corpus.jsonl, queries.jsonl, qrels/)"
            )
    qrels: Qrels = {}
    for n, line in enumerate(rfile.read_text(encoding="utf-8").splitlines()):
        parts = line.split("\t")
        if n == 0 and not parts[-1].strip().lstrip("-").isdigit():
            continue  # header
        if len(parts) >= 3:
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    queries = {}
    for line in qfile.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            qid = str(rec["_id"])
            if qid in qrels:
                queries[qid] = rec["text"]
    name = "".join(c if c.isalnum() else "_" for c in root.resolve().name.lower()).strip("_") or "beir"
    return EvalSet(name, queries, qrels, key="doc_id", corpus=root / "corpus.jsonl")


def load_jsonl(path: str | Path) -> EvalSet:
    """``{"question" | "query", "expected_sources": [...]}`` per line; judged by the hits' ``source``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise IngestError(f"evaluation file not found: {p}")
    queries, qrels = {}, {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise IngestError(f"{p}:{n}: invalid JSON ({e.msg})") from e
        q = rec.get("question", rec.get("query"))
        srcs = rec.get("expected_sources")
        if not isinstance(q, str) or not isinstance(srcs, list) or not srcs:
            raise IngestError(
                f'{p}:{n}: each line needs "question" (string) and "expected_sources" (non-empty list)'
            )
        qid = str(rec.get("id", n))
        queries[qid] = q
        qrels[qid] = {str(s): 1 for s in srcs}
    return EvalSet(p.stem, queries, qrels, key="source")


def load_dataset(path: str | Path) -> EvalSet:
    p = Path(path).expanduser()
    if p.is_dir():
        return load_beir(p)
    if p.suffix == ".jsonl":
        return load_jsonl(p)
    raise IngestError(f"cannot evaluate {p}: give a BEIR folder or a questions .jsonl file")


def _doc_ranking(hits: Sequence[dict], key: str) -> list[str]:
    seen: dict[str, None] = {}
    for h in hits:
        seen.setdefault(str(h[key]), None)
    return list(seen)


def _scores(rankings: dict[str, list[str]], qrels: Qrels, top_k: int) -> dict[str, float]:
    n = max(1, len(rankings))
    return {
        f"recall@{top_k}": sum(recall_at_k(r, qrels[q], top_k) for q, r in rankings.items()) / n,
        "ndcg@10": sum(ndcg_at_k(r, qrels[q], 10) for q, r in rankings.items()) / n,
        "mrr@10": sum(mrr(r, qrels[q], 10) for q, r in rankings.items()) / n,
    }


def evaluate(
    pipeline: Pipeline,
    ds: EvalSet,
    *,
    collection: str,
    rerank: bool = True,
    fetch_k: int = 100,
    top_k: int = 8,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run every query once: stage 1 fetches ``fetch_k``; the baseline is its dense order, the reranked
    system reorders the same candidates. Depth is ``max(top_k, 10)`` so nDCG@10/MRR@10 are defined."""
    depth = max(top_k, 10)
    qids = list(ds.queries)[:limit] if limit else list(ds.queries)
    vecs = pipeline.embedder.embed_queries([ds.queries[q] for q in qids])  # one batch: faster than per query
    do_rerank = rerank and pipeline.reranker.enabled
    k = max(fetch_k if do_rerank else depth, depth)
    dense: dict[str, list[str]] = {}
    reranked: dict[str, list[str]] = {}
    t_dense = t_rerank = 0.0
    it = range(len(qids))
    if progress:
        import sys

        from tqdm import tqdm

        it = tqdm(it, unit="query", desc=f"eval {ds.name}", file=sys.stderr)
    for i in it:
        qid = qids[i]
        # The library's one search policy; top_k=k keeps the whole reranked order for the metrics.
        res = pipeline.search(
            ds.queries[qid], fetch_k=k, top_k=k, rerank=do_rerank, collection=collection, vector=vecs[i]
        )
        t_dense += res.timings_ms["retrieve"] / 1e3
        dense[qid] = _doc_ranking(res.candidates, ds.key)[:depth]
        if do_rerank:
            if not res.reranked:
                raise RerankerError(f"query {qid!r} was not reranked ({res.reason}: {res.detail})")
            reranked[qid] = _doc_ranking(res.hits, ds.key)[:depth]
            t_rerank += res.timings_ms["rerank"] / 1e3
    n = max(1, len(qids))
    out: dict[str, Any] = {
        "dataset": ds.name,
        "collection": collection,
        "queries": len(qids),
        "fetch_k": fetch_k,
        "top_k": top_k,
        "embedder": pipeline.embedder.info(),
        "systems": {
            "dense": {
                **_scores(dense, ds.qrels, top_k),
                "ms_per_query": t_dense / n * 1e3,
                "description": f"stage 1: retrieve(k={top_k})",
            },
        },
        "notes": list(ds.notes),
    }
    if do_rerank:
        info = pipeline.reranker.info()
        out["reranker"] = info
        out["systems"]["reranked"] = {
            **_scores(reranked, ds.qrels, top_k),
            "ms_per_query": (t_dense + t_rerank) / n * 1e3,
            "description": f"retrieve_and_rerank(fetch_k={fetch_k}, top_k={top_k})",
        }
        if info.get("trained") is False:
            out["notes"].append(
                "the reranker is the offline STAND-IN (untrained head): reranked figures measure plumbing "
                "and speed only, not relevance"
            )
    elif rerank:
        out["notes"].append("reranking is disabled (RAG_RERANKER=none): stage 1 only")
    return out


def save_results(results: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path | None]:
    """Write ``<dataset>-<time>.json`` (and a PNG chart when matplotlib is available); return the paths."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = f"eval-{results['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    jpath = d / f"{stem}.json"
    jpath.write_text(json.dumps(results, indent=2, default=str))
    try:
        ppath: Path | None = plot_results(results, d / f"{stem}.png")
    except ImportError:
        ppath = None
    return jpath, ppath


def plot_results(results: Mapping[str, Any], path: str | Path) -> Path:
    """Grouped bar chart: one group per metric, one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = results["systems"]
    metrics = [m for m in next(iter(systems.values())) if "@" in m]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    width = 0.8 / len(systems)
    for j, (name, vals) in enumerate(systems.items()):
        xs = [i + j * width for i in range(len(metrics))]
        bars = ax.bar(xs, [vals[m] for m in metrics], width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(metrics))], metrics)
    ax.set_ylim(0, 1)
    title = f"{results['dataset']}: {results['queries']} queries"
    if results.get("reranker", {}).get("trained") is False:
        title += " (STAND-IN reranker: not meaningful)"
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def ensure_corpus(pipeline: Pipeline, ds: EvalSet, collection: str, *, progress: bool = False) -> int:
    """Ingest a BEIR corpus into ``collection`` on first use; later runs reuse it. Returns its chunk count."""
    store = pipeline.store
    n = store.count(collection)
    if n == 0 and ds.corpus is not None:
        from rag.ingest import ingest, iter_path

        s = pipeline.settings
        total = sum(1 for _ in ds.corpus.open(encoding="utf-8"))
        ingest(
            iter_path(ds.corpus),
            embedder=pipeline.embedder,
            store=store,
            collection=collection,
            chunk_tokens=s.chunk_tokens,
            chunk_overlap=s.chunk_overlap,
            batch_docs=s.ingest_batch_docs,
            progress=progress,
            total=total,
        )
        n = store.count(collection)
    if n == 0:
        raise IngestError(
            f"collection {collection!r} is empty: ingest the documents the questions refer to first "
            f"(`rag ingest --collection {collection} PATH`)"
        )
    return n
