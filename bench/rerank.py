"""`rag bench rerank`: the seed's plain code against our reranker on real Cranfield candidate sets.

- seed: ``CrossEncoder.predict(pairs, batch_size=32)`` in fp32, the code the project started from;
- ours: ``rag.rerank.make_reranker(settings)`` (sorted, token-budgeted, bf16 screen + fp32 refine, OpenVINO);
- every screen this CPU can run (``rerank_screen`` fp32, bf16 where native, int8 with OpenVINO + NNCF), each
  with the same fp32 refine, timed side by side against its own dtype's measured matmul peak.

Both run in one process, interleaved query by query (alternating which goes first) so that load from other
processes hits both alike. Also measured: the machine's matmul peak (fp32, bf16, int8), the model's FLOPs per
request from its architecture and the actual token lengths, and the floor those imply. Fidelity: our
scores against the fp32 reference on every query (top-8 positions, top-8 overlap, Spearman of the 100 scores).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    dense_candidates,
    load_cranfield,
    load_now,
    machine_info,
    matmul_peak,
    pct,
    say,
)

__all__ = ["encoder_flops", "fidelity_metrics", "int8_matmul_peak", "run", "screen_variants", "spearman"]

# rerank_screen value -> (the reranker's info()["screen"], the matmul_peak key its floor is measured against)
SCREEN_PEAK = {"fp32": "fp32_tflops", "bf16": "bf16_tflops", "int8": "int8_tops"}


def int8_matmul_peak(threads: int = 0, n: int = 2048, repeats: int = 7) -> dict[str, float]:
    """Measured int8 x int8 -> int32 GEMM rate on the CPU (``torch._int_mm``, oneDNN; VNNI where the CPU has
    it), TOP/s, median and best of ``repeats``."""
    import statistics

    import torch

    from rag.accel import resolve_threads

    torch.set_num_threads(resolve_threads(threads))
    a = torch.randint(-128, 128, (n, n), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, n), dtype=torch.int8)
    for _ in range(2):
        torch._int_mm(a, b)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch._int_mm(a, b)
        ts.append(time.perf_counter() - t)
    return {
        "int8_tops": round(2 * n**3 / statistics.median(ts) / 1e12, 4),
        "int8_tops_best": round(2 * n**3 / min(ts) / 1e12, 4),
    }


def screen_variants(settings: Any, ours: Any, quiet: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """A reranker per ``rerank_screen`` this machine can run (``ours`` itself where it runs that screen), and
    the reason each other screen was left out."""
    import warnings

    from rag.accel import cpu_supports_bf16, nncf_available
    from rag.models import StandInWarning
    from rag.rerank import make_reranker

    chosen = {"float32": "fp32", "bfloat16": "bf16", "int8": "int8"}.get(ours.info().get("screen", ""))
    out: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in SCREEN_PEAK:
        if ours.device != "cpu":
            skipped[name] = f"the screens are compared on the CPU (device here: {ours.device})"
            continue
        if name == "bf16" and not cpu_supports_bf16():
            skipped[name] = "no native bf16 on this CPU (AVX512-BF16 or AMX)"
            continue
        if name == "int8" and not (ours.runtime == "openvino" and nncf_available()):
            skipped[name] = "needs the OpenVINO runtime and NNCF (pip install nncf)"
            continue
        if name == chosen and ours.sort:
            out[name] = ours
            continue
        say(f"loading the reranker with rerank_screen={name}", quiet=quiet)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StandInWarning)
            out[name] = make_reranker(settings.with_overrides(rerank_screen=name))
    return out, skipped


def encoder_flops(config: Any, lengths: Sequence[int]) -> float:
    """FLOPs of one BERT-style cross-encoder forward over sequences of ``lengths`` tokens (no padding).

    Per layer and sequence of L tokens: Q, K, V, O projections 4 * 2*L*d^2, feed-forward 2 * 2*L*d*ff,
    attention scores and weighted sum 2 * 2*L^2*d; plus pooler 2*d^2 and classifier 2*d. Embedding lookups,
    softmax, LayerNorm and GELU are not counted (memory-bound, well under 1%).
    """
    d = int(config.hidden_size)
    ff = int(config.intermediate_size)
    n = int(config.num_hidden_layers)
    total = 0.0
    for L in lengths:
        total += n * (2 * L * (4 * d * d + 2 * d * ff) + 4 * L * L * d) + 2 * d * d + 2 * d
    return total


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def fidelity_metrics(ref: Sequence[Sequence[float]], got: Sequence[Sequence[float]], k: int = 8) -> dict:
    """Per query: top-k positions that hold the same document, top-k overlap, Spearman; averaged."""
    pos, overlap, rho, exact = [], [], [], 0
    for r, g in zip(ref, got, strict=True):
        r, g = np.asarray(r, dtype=np.float64), np.asarray(g, dtype=np.float64)
        tr = np.argsort(-r, kind="stable")[:k]
        tg = np.argsort(-g, kind="stable")[:k]
        pos.append(float(np.mean(tr == tg)))
        overlap.append(len(set(tr.tolist()) & set(tg.tolist())) / len(tr))
        rho.append(spearman(r, g))
        exact += int(np.array_equal(tr, tg))
    return {
        "queries": len(pos),
        f"top{k}_position_match": round(float(np.mean(pos)), 5),
        f"top{k}_overlap": round(float(np.mean(overlap)), 5),
        f"queries_with_identical_top{k}": exact,
        "spearman_mean": round(float(np.mean(rho)), 6),
        "spearman_min": round(float(np.min(rho)), 6),
        "pass": bool(np.mean(pos) >= 0.99 and np.mean(rho) >= 0.99),
    }


def _ref_cache(cache_dir: Path, ds_key: str, model_path: str, k: int, n: int) -> tuple[Path, np.ndarray]:
    h = hashlib.sha256(f"{ds_key}|{Path(model_path).resolve()}|{k}".encode())
    for f in sorted(Path(model_path).glob("*")):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    path = cache_dir / f"rerank-ref-{h.hexdigest()[:16]}.npy"
    arr = np.load(path) if path.exists() else np.full((n, k), np.nan, dtype=np.float64)
    return path, arr


def run(
    settings: Any,
    *,
    dataset: Path | None = None,
    queries: int = 20,
    fidelity_queries: int = 225,
    k: int = 100,
    seed_batch_size: int = 32,
    skip_seed: bool = False,
    st_bf16: bool = True,
    with_screens: bool = True,
    fidelity_reference: str = "seed",
    quiet: bool = False,
) -> dict[str, Any]:
    """``fidelity_reference``: ``"seed"`` (CrossEncoder.predict fp32) or ``"fp32-screen"`` (our fp32 path on
    OpenVINO f32, several times faster on a shared CPU; the same fp32 arithmetic up to summation order)."""
    import warnings

    from sentence_transformers import CrossEncoder

    from rag.embed import Embedder
    from rag.models import StandInWarning
    from rag.rerank import make_reranker

    machine = machine_info()
    load_start = load_now()
    say(f"machine: {machine['cpu_model']}, {machine['cpus_usable']} CPUs; load {load_start}", quiet=quiet)
    ds = load_cranfield(dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        ours = make_reranker(settings)
    info = ours.info()
    peak = matmul_peak(getattr(ours, "threads", 0), device=ours.device)
    if ours.device == "cpu":
        peak.update(int8_matmul_peak(getattr(ours, "threads", 0)))
    say(f"matmul peak: {peak}", quiet=quiet)
    screens, screens_skipped = screen_variants(settings, ours, quiet=quiet) if with_screens else ({}, {})
    cache_dir = settings.data_dir / "bench"
    emb = Embedder(settings.embedding_model, dtype="float32", offline=settings.offline)
    top, _ = dense_candidates(ds, emb, k, cache_dir=cache_dir, quiet=quiet)
    del emb

    def pairs(qi: int) -> list[tuple[str, str]]:
        return [(ds.queries[qi], ds.docs[j]) for j in top[qi]]

    model_path = ours.resolved.path
    seed = CrossEncoder(model_path, device=ours.device, max_length=ours.max_length)  # fp32, the seed's code

    def seed_score(p: list[tuple[str, str]]) -> np.ndarray:
        return np.asarray(
            seed.predict(p, batch_size=seed_batch_size, show_progress_bar=False), dtype=np.float64
        )

    # the other baseline: sentence-transformers in bf16 (predict sorts pairs by length itself)
    st_bf16 = st_bf16 and ours.device == "cpu" and info.get("dtype") == "bfloat16"
    if st_bf16:
        import torch

        st = CrossEncoder(model_path, device=ours.device, max_length=ours.max_length)
        st.to(torch.bfloat16)

    nq = len(ds.queries)
    timed = sorted({int(i) for i in np.linspace(0, nq - 1, min(queries, nq))})
    ref_path, ref = _ref_cache(cache_dir, f"{ds.fingerprint()}-{k}", model_path, k, nq)
    got = np.full((nq, k), np.nan)
    got_screen = {name: np.full((nq, k), np.nan) for name in screens}

    # warm-up (first calls allocate, compile kernels, fill caches)
    ours.score(pairs(1))
    if not skip_seed:
        seed_score(pairs(1))
    for r in screens.values():
        if r is not ours:
            r.score(pairs(1))
    lat: dict[str, list[float]] = {"seed": [], "ours": [], "st_bf16": []}
    lat.update({f"screen_{name}": [] for name in screens})
    screen_stage: dict[str, dict[str, list[float]]] = {
        name: {"refine_ms": [], "refined_pairs": []} for name in screens
    }
    if st_bf16:
        st.predict(pairs(1), batch_size=32, show_progress_bar=False)
    stage: dict[str, list[float]] = {"tokenize_ms": [], "refine_ms": [], "refined_pairs": []}
    lengths: list[int] = []
    tok = ours.tokenizer
    for n, qi in enumerate(timed):
        p = pairs(qi)
        enc = tok(
            [a for a, _ in p], [b for _, b in p], truncation="longest_first", max_length=ours.max_length
        )
        lengths.extend(len(x) for x in enc["input_ids"])
        runs: list[tuple[str, Callable[[], Any]]] = [("ours", lambda p=p: ours.score(p))]
        if not skip_seed:
            runs.append(("seed", lambda p=p: seed_score(p)))
        if st_bf16:
            runs.append(("st_bf16", lambda p=p: st.predict(p, batch_size=32, show_progress_bar=False)))
        for name, r in screens.items():
            if r is not ours:
                runs.append((f"screen_{name}", lambda p=p, r=r: r.score(p)))
        if n % 2:
            runs.reverse()
        for name, fn in runs:
            t = time.perf_counter()
            out = fn()
            lat[name].append((time.perf_counter() - t) * 1e3)
            if name == "seed":
                ref[qi] = out
            elif name == "ours":
                got[qi] = out
                for key in stage:
                    stage[key].append(float(out.timings.as_dict().get(key, 0.0)))
            elif name.startswith("screen_"):
                scr = name.removeprefix("screen_")
                got_screen[scr][qi] = out
                for key in screen_stage[scr]:
                    screen_stage[scr][key].append(float(out.timings.as_dict().get(key, 0.0)))
        say(
            f"  [{n + 1}/{len(timed)}] query {ds.query_ids[qi]}: ours {lat['ours'][-1]:.0f} ms"
            + (f", seed {lat['seed'][-1]:.0f} ms" if lat["seed"] else "")
            + (f", st bf16 {lat['st_bf16'][-1]:.0f} ms" if lat["st_bf16"] else ""),
            quiet=quiet,
        )
    ref_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(ref_path, ref)

    config = ours.model.config
    flops = encoder_flops(config, lengths) / len(timed)
    pairs_per_req = len(lengths) / len(timed)
    peak_key = {"bfloat16": "bf16_tflops", "float16": "fp16_tflops"}.get(info.get("dtype"), "fp32_tflops")
    peak_key = peak_key if peak_key in peak else "fp32_tflops"
    floor_ms = flops / (peak[peak_key] * 1e12) * 1e3
    fp32_floor_ms = flops / (peak["fp32_tflops"] * 1e12) * 1e3

    def summary(v: list[float]) -> dict[str, float]:
        return {
            "p50_ms": round(pct(v, 50), 1),
            "p95_ms": round(pct(v, 95), 1),
            "mean_ms": round(float(np.mean(v)), 1),
            "pairs_per_s": round(pairs_per_req * len(v) / (sum(v) / 1e3), 1),
        }

    result: dict[str, Any] = {
        "benchmark": "rerank",
        "machine": machine,
        "load_start": load_start,
        "matmul_peak": peak,
        "dataset": str(ds.root),
        "requests": len(timed),
        "candidates_per_request": k,
        "reranker": info,
        "seed_code": f"CrossEncoder.predict(pairs, batch_size={seed_batch_size}) fp32",
        "tokens_per_pair_mean": round(len(lengths) and sum(lengths) / len(lengths), 1),
        "gflop_per_request": round(flops / 1e9, 1),
        "ours": {
            **summary(lat["ours"]),
            "tokenize_ms_p50": round(pct(stage["tokenize_ms"], 50), 1),
            "refine_ms_p50": round(pct(stage["refine_ms"], 50), 1),
            "refined_pairs_mean": round(float(np.mean(stage["refined_pairs"])), 1),
        },
        "floor_ms": round(floor_ms, 1),
        "floor_basis": f"gflop_per_request / measured {peak_key}",
        "fraction_of_floor": round(floor_ms / pct(lat["ours"], 50), 3),
        "effective_tflops": round(flops / (pct(lat["ours"], 50) / 1e3) / 1e12, 3),
    }
    if lat["seed"]:
        result["seed"] = {
            **summary(lat["seed"]),
            "fraction_of_fp32_floor": round(fp32_floor_ms / pct(lat["seed"], 50), 3),
        }
        result["speedup_p50"] = round(pct(lat["seed"], 50) / pct(lat["ours"], 50), 2)
        result["speedup_pairs_per_s"] = round(
            result["ours"]["pairs_per_s"] / result["seed"]["pairs_per_s"], 2
        )
    if lat["st_bf16"]:
        result["st_bf16_sorted"] = summary(lat["st_bf16"])
        result["speedup_vs_st_bf16_p50"] = round(pct(lat["st_bf16"], 50) / pct(lat["ours"], 50), 2)
    for name, r in screens.items():
        if r is ours:
            lat[f"screen_{name}"] = lat["ours"]
            screen_stage[name] = {k: stage[k] for k in ("refine_ms", "refined_pairs")}
            got_screen[name] = got
    result["screens"] = {
        name: _screen_row(name, screens[name], ours, lat[f"screen_{name}"], screen_stage[name], flops, peak)
        for name in screens
    }
    for row in result["screens"].values():
        row["pairs_per_s"] = round(pairs_per_req * len(timed) / (sum(row.pop("_lat")) / 1e3), 1)
    result["screens_skipped"] = screens_skipped
    if fidelity_queries:
        fid_score, fid_ref, fid_path, fid_name = (
            seed_score,
            ref,
            ref_path,
            "CrossEncoder.predict fp32 (the seed's code)",
        )
        if fidelity_reference == "fp32-screen":
            if "fp32" not in screens:
                raise ValueError(
                    "fidelity_reference=fp32-screen needs the fp32 screen (with_screens=True, CPU)"
                )
            fp32 = screens["fp32"]
            fid_path, fid_ref = _ref_cache(cache_dir, f"{ds.fingerprint()}-{k}-ovf32", model_path, k, nq)
            have = ~np.isnan(got_screen["fp32"]).any(axis=1)
            fid_ref[have] = got_screen["fp32"][have]

            def fid_score(p: list[tuple[str, str]]) -> np.ndarray:
                return np.asarray(fp32.score(p), dtype=np.float64)

            fid_name = "rerank_screen=fp32 (OpenVINO f32, no refine)"
        result["fidelity"] = _fidelity(
            ds, ours, fid_score, pairs, fid_ref, got, fid_path, fidelity_queries, quiet
        )
        result["fidelity"]["reference"] = fid_name
        for name, r in screens.items():
            if name == "fp32":  # the fp32 screen is the reference's precision: no refine, nothing to check
                continue
            if r is ours:
                result["screens"][name]["fidelity"] = result["fidelity"]
                continue
            say(f"fidelity of rerank_screen={name}", quiet=quiet)
            result["screens"][name]["fidelity"] = _fidelity(
                ds, r, fid_score, pairs, fid_ref, got_screen[name], fid_path, fidelity_queries, quiet
            )
            result["screens"][name]["fidelity"]["reference"] = fid_name
    result["load_end"] = load_now()
    return result


def _screen_row(
    name: str,
    r: Any,
    ours: Any,
    lat: list[float],
    stage: dict[str, list[float]],
    flops: float,
    peak: dict[str, Any],
) -> dict[str, Any]:
    key = SCREEN_PEAK[name]
    p50 = pct(lat, 50)
    row: dict[str, Any] = {
        "screen": r.info()["screen"],
        "is_default": r is ours,
        "p50_ms": round(p50, 1),
        "p95_ms": round(pct(lat, 95), 1),
        "refine_ms_p50": round(pct(stage["refine_ms"], 50), 1),
        "refined_pairs_mean": round(float(np.mean(stage["refined_pairs"])), 1)
        if stage["refined_pairs"]
        else 0,
        "peak_key": key,
        "_lat": lat,
    }
    if key in peak:
        floor = flops / (peak[key] * 1e12) * 1e3
        row.update(floor_ms=round(floor, 1), fraction_of_floor=round(floor / p50, 3))
    return row


def _fidelity(
    ds: Any,
    ours: Any,
    seed_score: Callable[[list], np.ndarray],
    pairs: Callable[[int], list],
    ref: np.ndarray,
    got: np.ndarray,
    ref_path: Path,
    n: int,
    quiet: bool,
) -> dict[str, Any]:
    nq = len(ds.queries)
    chosen = sorted({int(i) for i in np.linspace(0, nq - 1, min(n, nq))})
    todo = [q for q in chosen if np.isnan(ref[q]).any() or np.isnan(got[q]).any()]
    say(
        f"fidelity: {len(chosen)} queries ({len(todo)} to score; fp32 reference cached in {ref_path})",
        quiet=quiet,
    )
    t0 = time.perf_counter()
    for m, qi in enumerate(todo):
        p = pairs(qi)
        if np.isnan(ref[qi]).any():
            ref[qi] = seed_score(p)
            if m % 10 == 9:
                np.save(ref_path, ref)
        if np.isnan(got[qi]).any():
            got[qi] = ours.score(p)
        if m % 10 == 9 or m == len(todo) - 1:
            say(f"  fidelity {m + 1}/{len(todo)} ({time.perf_counter() - t0:.0f} s)", quiet=quiet)
    np.save(ref_path, ref)
    out = fidelity_metrics(ref[chosen], got[chosen], k=8)
    out["reference"] = "CrossEncoder.predict fp32 (the seed's code)"
    return out


def summary(r: dict[str, Any]) -> str:
    """Human-readable table of a ``run`` result."""
    m, pk, o = r["machine"], r["matmul_peak"], r["ours"]
    info = r["reranker"]
    lines = [
        f"rerank benchmark, {r['requests']} requests x {r['candidates_per_request']} Cranfield candidates "
        f"({r['tokens_per_pair_mean']} tokens/pair, {r['gflop_per_request']} GFLOP/request)",
        f"machine: {m['cpu_model']}, {m['cpus_usable']} CPUs, {m['date']}; load at start {r['load_start']}",
        f"matmul peak ({pk['device']}, {pk.get('threads', '-')} thr), TFLOP/s: fp32 {pk['fp32_tflops']}, "
        f"bf16 {pk.get('bf16_tflops')}"
        + (f", fp16 {pk['fp16_tflops']}" if "fp16_tflops" in pk else "")
        + (f", int8 {pk['int8_tops']} TOP/s" if "int8_tops" in pk else ""),
        f"ours: {info['runtime']} screen {info.get('screen', info['dtype'])}, refine={info.get('refine')}, "
        f"threads {info['threads']}",
        f"{'':24}{'p50 ms':>10}{'p95 ms':>10}{'pairs/s':>10}",
    ]
    if "seed" in r:
        sd = r["seed"]
        lines.append(
            f"{'seed predict fp32 b32':24}{sd['p50_ms']:>10}{sd['p95_ms']:>10}{sd['pairs_per_s']:>10}"
        )
    if "st_bf16_sorted" in r:
        sb = r["st_bf16_sorted"]
        lines.append(
            f"{'ST bf16 (len-sorted)':24}{sb['p50_ms']:>10}{sb['p95_ms']:>10}{sb['pairs_per_s']:>10}"
        )
    lines.append(f"{'ours':24}{o['p50_ms']:>10}{o['p95_ms']:>10}{o['pairs_per_s']:>10}")
    if "seed" in r:
        lines.append(f"speedup vs seed: p50 {r['speedup_p50']}x, pairs/s {r['speedup_pairs_per_s']}x")
    if "st_bf16_sorted" in r:
        lines.append(f"speedup vs ST bf16: p50 {r['speedup_vs_st_bf16_p50']}x")
    lines.append(
        f"floor {r['floor_ms']} ms ({r['floor_basis']}); ours reaches {r['fraction_of_floor']:.0%} of it "
        f"({r['effective_tflops']} TFLOP/s); tokenize p50 {o['tokenize_ms_p50']} ms, refine p50 "
        f"{o['refine_ms_p50']} ms ({o['refined_pairs_mean']} pairs)"
    )
    if "fidelity" in r:
        f = r["fidelity"]
        lines.append(
            f"fidelity vs fp32 over {f['queries']} queries: top-8 positions {f['top8_position_match']:.2%}, "
            f"top-8 overlap {f['top8_overlap']:.2%}, Spearman mean {f['spearman_mean']:.5f} (min "
            f"{f['spearman_min']:.5f}) -> {'PASS' if f['pass'] else 'FAIL'}"
        )
    if r.get("screens"):
        lines.append(
            f"screens (same fp32 refine): {'':4}{'p50 ms':>8}{'p95 ms':>8}{'pairs/s':>9}{'refined':>9}"
            f"{'floor ms':>10}{'of floor':>9}{'top-8 pos':>11}{'Spearman':>10}"
        )
        for name, row in r["screens"].items():
            f = row.get("fidelity") or {}
            label = name + (" (default)" if row["is_default"] else "")
            pos, rho = f.get("top8_position_match", float("nan")), f.get("spearman_mean", float("nan"))
            lines.append(
                f"  {label:28}{row['p50_ms']:>8}{row['p95_ms']:>8}{row['pairs_per_s']:>9}"
                f"{row['refined_pairs_mean']:>9}{row.get('floor_ms', '-'):>10}"
                f"{row.get('fraction_of_floor', 0):>9.0%}{pos:>11.2%}{rho:>10.5f}"
            )
        for name, why in r.get("screens_skipped", {}).items():
            lines.append(f"  {name}: not run ({why})")
    lines.append(f"load at end {r['load_end']}")
    return "\n".join(lines)
