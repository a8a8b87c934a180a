"""`rag bench fusion`: how hybrid's fusion parameters move stage 1's quality on a BEIR set (Cranfield).

Per query the store's own two sides are fetched once, deep: the dense ranking (exact, 1,000 rows) and the
lexical one (``Store.search(mode="lexical")``, 1,000 rows; with BM25 its scores too, read in SQL for the
score-based fusion). Fusions are then computed here, in the SQL's order (score, then dense rank, then lexical
rank), and scored on documents like ``rag eval`` (recall@top_k and @fetch_k over the first ``fetch_k`` fused
chunks, nDCG@10, MRR@10): RRF over a grid of k, lexical weight and depth, and weighted min-max normalised
score fusion over a grid of its weight. The row with the service's settings is checked against the store's
hybrid search itself (the same candidates, query by query), so the grid measures what the service would do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.common import load_now, machine_info, say

__all__ = ["run", "summary"]

Ranked = list[tuple[str, str, float]]  # (chunk id, document key, score)


def rrf(dense: Ranked, lexical: Ranked, *, k: float, w_lex: float, depth: int) -> Ranked:
    """RRF of the two rankings, as (chunk id, document key, fused score) rows in the SQL's order."""
    rd = {c[0]: r for r, c in enumerate(dense[:depth], 1)}
    rl = {c[0]: r for r, c in enumerate(lexical[:depth], 1)}
    rows = {c[0]: c for c in dense[:depth] + lexical[:depth]}
    big = 10**9

    def score(i: str) -> float:
        return (1 / (k + rd[i]) if i in rd else 0.0) + (w_lex / (k + rl[i]) if i in rl else 0.0)

    order = sorted(rows, key=lambda i: (-score(i), rd.get(i, big), rl.get(i, big)))
    return [(i, rows[i][1], score(i)) for i in order]


def minmax(dense: Ranked, lexical: Ranked, *, alpha: float, depth: int) -> Ranked:
    """(1 - alpha) x normalised dense score + alpha x normalised BM25 score, each min-max over its list."""
    out: dict[str, float] = {}
    rows = {}
    for weight, side in ((1 - alpha, dense[:depth]), (alpha, lexical[:depth])):
        if not side:
            continue
        lo, hi = min(c[2] for c in side), max(c[2] for c in side)
        for c in side:
            out[c[0]] = out.get(c[0], 0.0) + weight * ((c[2] - lo) / (hi - lo) if hi > lo else 1.0)
            rows[c[0]] = c
    return [rows[i] for i in sorted(out, key=lambda i: -out[i])]


def _metrics(runs: dict[str, Ranked], qrels: dict[str, dict[str, int]], top_k: int, fetch_k: int) -> dict:
    from rag.eval import mrr, ndcg_at_k, recall_at_k

    n = max(1, len(runs))
    sums = {f"recall@{top_k}": 0.0, f"recall@{fetch_k}": 0.0, "ndcg@10": 0.0, "mrr@10": 0.0}
    for q, ranked in runs.items():
        docs = list(dict.fromkeys(c[1] for c in ranked[:fetch_k]))
        sums[f"recall@{top_k}"] += recall_at_k(docs, qrels[q], top_k)
        sums[f"recall@{fetch_k}"] += recall_at_k(docs, qrels[q], fetch_k)
        sums["ndcg@10"] += ndcg_at_k(docs, qrels[q], 10)
        sums["mrr@10"] += mrr(docs, qrels[q], 10)
    return {m: round(v / n, 4) for m, v in sums.items()}


def run(
    pipeline: Any,
    ds: Any,
    *,
    collection: str,
    top_k: int = 8,
    fetch_k: int = 100,
    depth_max: int = 1000,
    quiet: bool = False,
) -> dict[str, Any]:
    from psycopg import sql

    store = pipeline.store
    t = store.target(collection)
    if t.lexical is None:
        raise SystemExit(f"collection {collection!r} has no lexical index")
    machine, load_start = machine_info(), load_now()
    qids = list(ds.queries)
    vecs = pipeline.embedder.embed_queries([ds.queries[q] for q in qids])
    fusion = store.fusion
    lists: dict[str, tuple[Ranked, Ranked]] = {}
    mismatches = 0
    key = ds.key
    for i, q in enumerate(qids):
        text = ds.queries[q]
        dense = store.search(collection, vecs[i], depth_max, mode="dense", exact=True)
        lexical = store.search(collection, vecs[i], depth_max, query=text, mode="lexical")
        d = [(h["id"], str(h[key]), float(h["dense_score"])) for h in dense]
        lex = [(h["id"], str(h[key]), -float(h["lexical_rank"])) for h in lexical]
        if t.lexical.method == "bm25":  # real BM25 scores for the score-based fusion
            with store.connection() as conn:
                scores = dict(
                    conn.execute(
                        sql.SQL(
                            "SELECT {id}, -({col} <@> to_bm25query(%s, %s)) FROM {t} WHERE {id} = ANY(%s)"
                        ).format(id=t.columns["id"], col=sql.Identifier(t.lexical.column), t=t.table),
                        [text, t.lexical.index, [c[0] for c in lex[: 2 * fetch_k]]],
                    ).fetchall()
                )
            lex = [(c[0], c[1], float(scores.get(c[0], c[2]))) for c in lex]
        lists[q] = (d, lex)
        served = store.search(collection, vecs[i], fetch_k, query=text, mode="hybrid", exact=True)
        mine = rrf(d, lex, k=fusion.k, w_lex=fusion.lexical_weight, depth=fusion.depth(fetch_k))[:fetch_k]
        # the same rows with the same fused scores; rows with equal scores may trade places (equal distances
        # of duplicate chunks are ordered by id in SQL, by the exact scan's order here)
        same = {h["id"] for h in served} == {c[0] for c in mine} and all(
            abs(h["fused_score"] - c[2]) < 1e-12 for h, c in zip(served, mine, strict=True)
        )
        mismatches += not same
        if not quiet and i % 25 == 0:
            say(f"  fetched {i + 1}/{len(qids)} queries", quiet=quiet)

    def score(fn: Callable[[Ranked, Ranked], Ranked]) -> dict:
        return _metrics({q: fn(*lists[q]) for q in qids}, ds.qrels, top_k, fetch_k)

    grid: list[dict[str, Any]] = []
    for name, d in (("dense", 0), ("lexical", 1)):
        grid.append({"fusion": name, **score(lambda a, b, d=d: (a, b)[d])})
    for k in (10, 30, 60, 100):
        for w in (0.5, 0.8, 1.0, 1.25, 1.5):
            grid.append(
                {
                    "fusion": "rrf",
                    "k": k,
                    "w_lex": w,
                    "depth": 2 * fetch_k,
                    **score(lambda a, b, k=k, w=w: rrf(a, b, k=k, w_lex=w, depth=2 * fetch_k)),
                }
            )
    for depth in (fetch_k, 2 * fetch_k, 4 * fetch_k, depth_max):
        grid.append(
            {
                "fusion": "rrf",
                "k": 60,
                "w_lex": 1.0,
                "depth": depth,
                **score(lambda a, b, depth=depth: rrf(a, b, k=60, w_lex=1.0, depth=depth)),
            }
        )
    if t.lexical.method == "bm25":
        for alpha in (0.2, 0.3, 0.4, 0.5, 0.6):
            grid.append(
                {
                    "fusion": "minmax",
                    "alpha": alpha,
                    "depth": 2 * fetch_k,
                    **score(lambda a, b, al=alpha: minmax(a, b, alpha=al, depth=2 * fetch_k)),
                }
            )
    union = {}
    for n in (fetch_k // 2, fetch_k, 2 * fetch_k):  # the most any fusion of the two sides can keep
        total = 0.0
        for q in qids:
            d, lex = lists[q]
            docs = {c[1] for c in d[:n]} | {c[1] for c in lex[:n]}
            rel = {x for x, g in ds.qrels[q].items() if g > 0}
            total += len(rel & docs) / len(rel) if rel else 0.0
        union[n] = round(total / max(1, len(qids)), 4)
    return {
        "benchmark": "fusion",
        "union_recall": union,
        "machine": machine,
        "load_start": load_start,
        "dataset": ds.name,
        "collection": collection,
        "lexical": t.lexical.method,
        "queries": len(qids),
        "top_k": top_k,
        "fetch_k": fetch_k,
        "service": {"k": fusion.k, "w_lex": fusion.lexical_weight, "depth": fusion.depth(fetch_k)},
        "service_mismatches": mismatches,
        "grid": grid,
        "load_end": load_now(),
    }


def summary(r: dict[str, Any]) -> str:
    m = r["machine"]
    metrics = [x for x in r["grid"][0] if "@" in x]
    lines = [
        f"fusion grid on {r['dataset']} ({r['queries']} queries, collection {r['collection']!r}, lexical "
        f"{r['lexical']}), documents among the first {r['fetch_k']} chunks; {m['cpu_model']}, {m['date']}",
        f"the service's hybrid search ({r['service']}) differed from this grid's RRF on "
        f"{r['service_mismatches']} of {r['queries']} queries",
        "recall of the union of both sides' top N (documents): "
        + ", ".join(f"N={n}: {v}" for n, v in r["union_recall"].items()),
        f"{'fusion':<34}" + "".join(f"{x:>12}" for x in metrics),
    ]
    for g in r["grid"]:
        label = ", ".join(f"{k}={v}" for k, v in g.items() if k not in metrics)
        lines.append(f"{label:<34}" + "".join(f"{g[x]:>12.4f}" for x in metrics))
    return "\n".join(lines)
