"""Evaluation harness: each stage-1 mode alone and then reranked, on BEIR folders or questions.jsonl.

For every mode (``dense``, ``lexical``, ``hybrid``; ``rag.store.hybrid``) each query runs once through the
library's search policy (``Pipeline.search``, the one the service runs): stage 1 fetches ``fetch_k``
candidates, which give the stage-1 system; the reranker reorders the same candidates, which gives the reranked
system. Systems are named by their mode (``dense``, ``lexical``, ``hybrid``) and ``<mode>+reranked``;
the dense one reranked keeps its original name, ``reranked``.

Metrics are computed per query on *documents* (chunks map back to their document; a document counts once,
at its best rank) and averaged over queries:

- recall@k: judged-relevant documents in the top k / all judged-relevant documents; reported at ``top_k``
  and at ``fetch_k`` (stage 1's candidates: what the reranker can promote at all);
- nDCG@k with graded gains ``2^rel - 1`` (BEIR's convention; binary judgements give gain 1);
- MRR@k: 1 / rank of the first relevant document within the top k (0 if none).

Reranked figures from the offline stand-in reranker (an untrained head) measure plumbing and speed, not
relevance: the results and the chart say so.
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
from rag.settings import SEARCH_MODES

if TYPE_CHECKING:
    from rag.eval_targets import EvalTarget
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


def _scores(rankings: dict[str, list[str]], qrels: Qrels, top_k: int, fetch_k: int) -> dict[str, float]:
    n = max(1, len(rankings))
    out = {
        f"recall@{k}": sum(recall_at_k(r, qrels[q], k) for q, r in rankings.items()) / n
        for k in (top_k, fetch_k)
    }
    out["ndcg@10"] = sum(ndcg_at_k(r, qrels[q], 10) for q, r in rankings.items()) / n
    out["mrr@10"] = sum(mrr(r, qrels[q], 10) for q, r in rankings.items()) / n
    return out


def system_name(mode: str, reranked: bool) -> str:
    """``dense``, ``lexical``, ``hybrid``; reranked: ``reranked`` (dense, its name since the seed),
    ``lexical+reranked``, ``hybrid+reranked``."""
    if not reranked:
        return mode
    return "reranked" if mode == "dense" else f"{mode}+reranked"


def evaluate(
    target: EvalTarget | Pipeline,
    ds: EvalSet,
    *,
    collection: str,
    rerank: bool = True,
    fetch_k: int = 100,
    top_k: int = 8,
    limit: int | None = None,
    progress: bool = False,
    modes: Sequence[str] = SEARCH_MODES,
    keep_runs: bool = False,
) -> dict[str, Any]:
    """Run every query once per mode: stage 1 fetches ``fetch_k`` candidates (at least 10, so nDCG@10 and
    MRR@10 are defined); the reranked system reorders the same candidates. ``keep_runs``: also return each
    mode's stage-1 candidate ids per query (``runs``). ``target``: a ``Pipeline`` (the library in this
    process) or an ``EvalTarget`` (``rag.eval_targets``: a running service too): same figures."""
    from rag.eval_targets import EvalTarget, local_target

    t = target if isinstance(target, EvalTarget) else local_target(target)
    qids = list(ds.queries)[:limit] if limit else list(ds.queries)
    do_rerank = rerank and t.reranker is not None
    k = max(fetch_k, top_k, 10)
    out: dict[str, Any] = {
        "dataset": ds.name,
        "collection": collection,
        "queries": len(qids),
        "fetch_k": fetch_k,
        "top_k": top_k,
        "modes": list(modes),
        "target": t.where,
        "embedder": t.embedder,
        "systems": {},
        "notes": list(ds.notes),
    }
    runs: dict[str, dict[str, list[str]]] = {}
    for mode in modes:
        stage1, reranked, ids, strategies = {}, {}, {}, {}
        t_stage1 = t_rerank = 0.0
        it: Any = range(len(qids))
        if progress:
            import sys

            from tqdm import tqdm

            it = tqdm(it, unit="query", desc=f"eval {ds.name} {mode}", file=sys.stderr)
        for i in it:
            qid = qids[i]
            # The one search policy (here or in the service); top_k=k keeps the whole reranked order.
            res = t.search(ds.queries[qid], k, do_rerank, collection, mode)
            t_stage1 += res.timings_ms["retrieve"] / 1e3
            stage1[qid] = _doc_ranking(res.candidates, ds.key)
            ids[qid] = [str(c["id"]) for c in res.candidates]
            strategies[res.strategy] = strategies.get(res.strategy, 0) + 1
            if do_rerank:
                if not res.reranked:
                    raise RerankerError(f"query {qid!r} was not reranked ({res.reason}: {res.detail})")
                reranked[qid] = _doc_ranking(res.hits, ds.key)
                t_rerank += res.timings_ms["rerank"] / 1e3
        n = max(1, len(qids))
        out["systems"][system_name(mode, False)] = {
            **_scores(stage1, ds.qrels, top_k, fetch_k),
            "ms_per_query": t_stage1 / n * 1e3,
            "mode": mode,
            "reranked": False,
            "strategies": strategies,
            "description": f"stage 1 {mode}: retrieve(k={k})",
        }
        if do_rerank:
            out["systems"][system_name(mode, True)] = {
                **_scores(reranked, ds.qrels, top_k, fetch_k),
                "ms_per_query": (t_stage1 + t_rerank) / n * 1e3,
                "mode": mode,
                "reranked": True,
                "description": f"{mode} + rerank(fetch_k={k}, top_k={top_k})",
            }
        runs[mode] = ids
    if do_rerank and t.reranker is not None:
        info = t.reranker
        out["reranker"] = info
        if info.get("trained") is False:
            out["notes"].append(
                "the reranker is the offline STAND-IN (untrained head): reranked figures measure plumbing "
                "and speed only, not relevance"
            )
    elif rerank:
        out["notes"].append("reranking is disabled (RAG_RERANKER=none): stage 1 only")
    if keep_runs:
        out["runs"] = runs
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
    """Grouped bar charts, stage 1 and reranked side by side: one group per metric, one bar per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = results["systems"]
    metrics = [m for m in next(iter(systems.values())) if "@" in m]
    panels = [(False, "stage 1 alone")]
    if any(v.get("reranked") for v in systems.values()):
        stand_in = results.get("reranker", {}).get("trained") is False
        label = "reranked" + (" by the STAND-IN reranker: plumbing, not relevance" if stand_in else "")
        panels.append((True, label))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, (is_reranked, label) in zip(axes[0], panels, strict=True):
        group = {v["mode"]: v for v in systems.values() if bool(v.get("reranked")) == is_reranked}
        width = 0.8 / max(1, len(group))
        for j, (mode, vals) in enumerate(group.items()):
            xs = [i + j * width for i in range(len(metrics))]
            bars = ax.bar(xs, [vals[m] for m in metrics], width, label=mode)
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks([i + width * (len(group) - 1) / 2 for i in range(len(metrics))], metrics)
        ax.set_ylim(0, 1)
        ax.set_title(label, fontsize=10)
        ax.legend()
    fig.suptitle(f"{results['dataset']}: {results['queries']} queries", fontsize=11)
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
