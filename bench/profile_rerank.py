"""Where a 100-candidate rerank request spends its time (evidence for docs/BENCHMARKS.md).

    .venv/bin/python -m bench.profile_rerank [--queries 5] [--json]
    .venv/bin/py-spy record -o results/rerank-pyspy.svg -- .venv/bin/python -m bench.profile_rerank

1. the request's wall time split: tokenize, bf16 screen, fp32 refine, the rest (Python glue);
2. OpenVINO's own per-operation counters (PERF_COUNT) for the bf16 screen, by operation type, with the dense
   layers' achieved TFLOP/s (their FLOPs counted on padded tokens) next to the measured bf16 matmul peak.

Uses the default reranker (make_reranker(settings)) on Cranfield dense candidates, like `rag bench rerank`.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import warnings

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from bench.common import dense_candidates, load_cranfield, load_now, machine_info, matmul_peak
    from rag.accel import pad_batch
    from rag.embed import Embedder
    from rag.rerank import make_reranker
    from rag.settings import get_settings

    s = get_settings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rr = make_reranker(s)
    info = rr.info()
    ds = load_cranfield()
    top, _ = dense_candidates(
        ds,
        Embedder(s.embedding_model, dtype="float32", offline=s.offline),
        100,
        cache_dir=s.data_dir / "bench",
        quiet=True,
    )
    qs = [int(i) for i in np.linspace(3, len(ds.queries) - 1, args.queries)]
    out: dict = {"machine": machine_info(), "load_start": load_now(), "reranker": info}
    out["matmul_peak"] = matmul_peak(rr.threads)
    rr.score([(ds.queries[0], ds.docs[j]) for j in top[0]])  # warm-up

    split = collections.defaultdict(list)
    for qi in qs:
        pairs = [(ds.queries[qi], ds.docs[j]) for j in top[qi]]
        t = time.perf_counter()
        tm = rr.score(pairs).timings
        wall = (time.perf_counter() - t) * 1e3
        split["wall_ms"].append(wall)
        split["tokenize_ms"].append(tm.tokenize_ms)
        split["screen_ms"].append(tm.inference_ms - tm.refine_ms)
        split["refine_ms"].append(tm.refine_ms)
        split["refined_pairs"].append(tm.refined_pairs)
        split["glue_ms"].append(wall - tm.tokenize_ms - tm.inference_ms)
    out["split_median"] = {k: round(float(np.median(v)), 1) for k, v in split.items()}

    if info["runtime"] == "openvino":
        import openvino as ov

        # a counting copy of the same IR, compiled with the same settings
        engine = rr.engine
        prec = engine.precisions[0]
        core = ov.Core()
        cfg_ov = {
            "INFERENCE_PRECISION_HINT": prec,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": rr.threads,
            "PERF_COUNT": True,
        }
        cm = core.compile_model(core.read_model(str(engine.xml)), "CPU", cfg_ov)
        req = cm.create_infer_request()
        by_type: collections.Counter = collections.Counter()
        fc_flops = 0.0
        cfg = rr.model.config
        d, ff, nl = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        for qi in qs:
            pairs = [(ds.queries[qi], ds.docs[j]) for j in top[qi]]
            feats = rr._tokenize(pairs)
            ids = feats["input_ids"]
            for b in rr._batches([len(x) for x in ids]):
                x, mask = pad_batch(ids, b, rr.pad_id)
                feeds = [x, mask] + (
                    [pad_batch(feats["token_type_ids"], b, 0)[0]] if "token_type_ids" in feats else []
                )
                req.infer(feeds)
                fc_flops += nl * 2 * x.size * (4 * d * d + 2 * d * ff)
                for p in req.profiling_info:
                    by_type[(p.node_type, p.exec_type)] += p.real_time.total_seconds()
        total = sum(by_type.values())
        fc = sum(v for (t, _), v in by_type.items() if t == "FullyConnected")
        out["openvino_ops"] = [
            {
                "op": t,
                "kernel": k,
                "ms_per_request": round(v * 1e3 / len(qs), 1),
                "share": round(v / total, 3),
            }
            for (t, k), v in by_type.most_common(10)
        ]
        out["dense_layers_tflops"] = round(fc_flops / fc / 1e12, 3) if fc else None
    out["load_end"] = load_now()
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return
    print(f"{info['runtime']} {info['dtype']} on {out['machine']['cpu_model']}; load {out['load_start']}")
    print("median split of one 100-candidate request (ms):", out["split_median"])
    for o in out.get("openvino_ops", []):
        print(f"  {o['op']:16} {o['kernel']:24} {o['ms_per_request']:8} ms  {o['share']:.1%}")
    if out.get("dense_layers_tflops"):
        pk = out["matmul_peak"].get("bf16_tflops") or out["matmul_peak"]["fp32_tflops"]
        print(f"dense layers run at {out['dense_layers_tflops']} TFLOP/s; measured matmul peak {pk} TFLOP/s")
    print("load at end", out["load_end"])


if __name__ == "__main__":
    main()
