"""`rag bench ingest`: document embedding speed and the retrieval quality of each dtype, on Cranfield.

Variants, timed interleaved (``repeats`` passes over the 1,400 abstracts each, median):

- plain: ``SentenceTransformer.encode(docs)`` in fp32 (its defaults: batch 32), the seed's way;
- fast fp32: ``rag.embed.Embedder(dtype="float32").embed_documents`` (sorted, budgeted, OpenVINO if present);
- fast default: the same with the configured dtype (``RAG_EMBEDDING_DTYPE``, auto = bf16 on bf16 CPUs).

Quality: stage-1 exact cosine search over each variant's embeddings (queries embedded the same way),
nDCG@10 with graded gains and recall@100 against Cranfield's judgements.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from bench.common import load_cranfield, load_now, machine_info, say

__all__ = ["run", "summary"]


def _quality(ds: Any, dv: np.ndarray, qv: np.ndarray) -> dict[str, float]:
    from rag.eval import ndcg_at_k, recall_at_k

    sim = qv @ dv.T
    top = np.argsort(-sim, axis=1, kind="stable")[:, :100]
    nd, rc = [], []
    for qi, qid in enumerate(ds.query_ids):
        rel = ds.qrels.get(qid)
        if not rel:
            continue
        ranked = [ds.doc_ids[j] for j in top[qi]]
        nd.append(ndcg_at_k(ranked, rel, 10))
        rc.append(recall_at_k(ranked, rel, 100))
    return {
        "ndcg@10": round(float(np.mean(nd)), 4),
        "recall@100": round(float(np.mean(rc)), 4),
        "queries": len(nd),
    }


def run(settings: Any, *, dataset: Any = None, repeats: int = 3, quiet: bool = False) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    from rag.embed import Embedder

    machine = machine_info()
    load_start = load_now()
    ds = load_cranfield(dataset)
    say(f"ingest benchmark: {len(ds.docs)} Cranfield documents; load {load_start}", quiet=quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast_default = Embedder(
            settings.embedding_model, dtype=settings.embedding_dtype, offline=settings.offline
        )
        fast_fp32 = Embedder(settings.embedding_model, dtype="float32", offline=settings.offline)
        plain = SentenceTransformer(fast_fp32.resolved.path, device="cpu")
    variants: dict[str, Any] = {
        "plain_encode_fp32": lambda texts: np.asarray(plain.encode(texts, normalize_embeddings=True)),
        "fast_fp32": fast_fp32.embed_documents,
        f"fast_{fast_default.dtype}": fast_default.embed_documents,
    }
    lengths = [
        len(x)
        for x in fast_fp32.tokenizer(ds.docs, truncation=True, max_length=fast_fp32.max_seq_length)[
            "input_ids"
        ]
    ]
    for fn in variants.values():  # warm-up
        fn(ds.docs[:64])
    times: dict[str, list[float]] = {k: [] for k in variants}
    vecs: dict[str, np.ndarray] = {}
    for rep in range(repeats):
        names = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in names:
            t = time.perf_counter()
            vecs[name] = np.asarray(variants[name](ds.docs), dtype=np.float32)
            times[name].append(time.perf_counter() - t)
            say(
                f"  pass {rep + 1}/{repeats} {name}: {len(ds.docs) / times[name][-1]:.1f} docs/s", quiet=quiet
            )
    queries = {
        "plain_encode_fp32": np.asarray(plain.encode(ds.queries, normalize_embeddings=True)),
        "fast_fp32": fast_fp32.embed_queries(ds.queries),
        f"fast_{fast_default.dtype}": fast_default.embed_queries(ds.queries),
    }
    res: dict[str, Any] = {}
    base = float(np.median(times["plain_encode_fp32"]))
    for name in variants:
        med = float(np.median(times[name]))
        res[name] = {
            "docs_per_s": round(len(ds.docs) / med, 1),
            "seconds_median": round(med, 2),
            "speedup_vs_plain": round(base / med, 2),
            **_quality(ds, vecs[name], queries[name]),
        }
    cos = float(np.mean(np.sum(vecs["fast_fp32"] * vecs["plain_encode_fp32"], axis=1)))
    return {
        "benchmark": "ingest",
        "machine": machine,
        "load_start": load_start,
        "dataset": str(ds.root),
        "documents": len(ds.docs),
        "tokens_per_doc_mean": round(float(np.mean(lengths)), 1),
        "embedder": fast_default.info(),
        "variants": res,
        "fast_fp32_vs_plain_mean_cosine": round(cos, 6),
        "ndcg_floor": 0.34,
        "default_dtype_ok": res[f"fast_{fast_default.dtype}"]["ndcg@10"] >= 0.34,
        "load_end": load_now(),
    }


def summary(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"ingest embedding, {r['documents']} Cranfield documents ({r['tokens_per_doc_mean']} tokens mean)",
        f"machine: {m['cpu_model']}, {m['cpus_usable']} CPUs, {m['date']}; load at start {r['load_start']}",
        f"{'':22}{'docs/s':>9}{'speedup':>9}{'nDCG@10':>9}{'R@100':>8}",
    ]
    for name, v in r["variants"].items():
        lines.append(
            f"{name:22}{v['docs_per_s']:>9}{v['speedup_vs_plain']:>8}x{v['ndcg@10']:>9}{v['recall@100']:>8}"
        )
    lines.append(
        f"default dtype keeps nDCG@10 >= {r['ndcg_floor']}: {'yes' if r['default_dtype_ok'] else 'NO'}; "
        f"fast fp32 vs plain mean cosine {r['fast_fp32_vs_plain_mean_cosine']}; load at end {r['load_end']}"
    )
    return "\n".join(lines)
