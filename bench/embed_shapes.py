"""Embedder memory and speed over query batches of every shape (evidence for rag/embed.py's PAD_MULTIPLE).

    .venv/bin/python -m bench.embed_shapes [--batches 3000] [--pad-multiple 16] [--json]

Embeds ``--batches`` batches of 1-8 queries of 2-40 words (seeded) with the default embedder
(make_embedder(settings)), padding each forward pass to ``--pad-multiple`` tokens (1: no padding, every
query length its own input shape), and prints this process's RSS every 250 batches and the growth from
batch 250 (the first shapes compiled) to the end. Runs in the foreground; one process per setting, so
compare settings run one after the other on the same machine.
"""

from __future__ import annotations

import argparse
import json
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3000)
    ap.add_argument("--pad-multiple", type=int, default=None, help="default: rag.embed.PAD_MULTIPLE")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import rag.embed
    from bench.common import machine_info, rss_bytes
    from rag.embed import make_embedder
    from rag.settings import get_settings

    if args.pad_multiple is not None:
        rag.embed.PAD_MULTIPLE = max(1, args.pad_multiple)
    emb = make_embedder(get_settings())
    words = (rag.embed.__doc__ or "query").split()
    rng = random.Random(0)
    timeline: list[tuple[int, float, float]] = []
    t0 = time.perf_counter()
    for i in range(args.batches):
        if i % 250 == 0:
            timeline.append((i, round(rss_bytes() / 1e6, 1), round(time.perf_counter() - t0, 1)))
            if not args.json:
                print(f"batch {i:>5}: RSS {timeline[-1][1]:8.1f} MB, {timeline[-1][2]:6.1f} s", flush=True)
        rows = rng.randint(1, 8)
        emb.embed_queries(
            [" ".join(rng.choice(words) for _ in range(rng.randint(2, 40))) for _ in range(rows)]
        )
    timeline.append((args.batches, round(rss_bytes() / 1e6, 1), round(time.perf_counter() - t0, 1)))
    base = timeline[1][1] if len(timeline) > 1 else timeline[0][1]
    result = {
        "machine": machine_info(),
        "runtime": emb.runtime,
        "dtype": emb.dtype,
        "pad_multiple": rag.embed.PAD_MULTIPLE,
        "batches": args.batches,
        "seconds": round(time.perf_counter() - t0, 1),
        "rss_from_batch_250_mb": base,
        "rss_end_mb": timeline[-1][1],
        "growth": round(timeline[-1][1] / base - 1, 4),
        "timeline": timeline,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"pad multiple {result['pad_multiple']} ({emb.runtime}, {emb.dtype}): {args.batches} batches in "
            f"{result['seconds']} s; RSS {base} MB at batch 250 -> {result['rss_end_mb']} MB "
            f"({100 * result['growth']:+.1f}%)"
        )


if __name__ == "__main__":
    main()
