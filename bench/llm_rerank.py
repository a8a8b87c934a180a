"""``rag bench llm-rerank``: pairs/s of the LLM reranker (rag.rerank.llm) on this machine.

Two models through the backend's own scoring path (tokenize, pack, left-pad, last-position yes/no logits):

- the offline stand-in (``standin:llm``: a 2-layer, 64-wide Qwen3; plumbing speed, not the real model's);
- a randomly initialised model at Qwen3-Reranker-0.6B's size (``Qwen3Config``: 28 layers, hidden 1024, 16
  heads, 8 KV heads, intermediate 3072, vocabulary 151,669, tied embeddings), built in memory and never
  saved. Random weights cost what trained ones do, so the timing is the real architecture's.

The pairs are demo-corpus documents cut so that each prompt is about ``tokens`` tokens of the stand-in
tokenizer (the same token ids feed both models: only the sequence lengths matter for time).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rag.settings import Settings

# Qwen/Qwen3-Reranker-0.6B's config.json (the Qwen3-0.6B base)
REAL_SIZE: dict[str, Any] = {
    "vocab_size": 151669,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}


def _pairs(backend: Any, n: int, tokens: int) -> list[tuple[str, str]]:
    """``n`` (query, document) pairs whose prompts are about ``tokens`` tokens each."""
    from rag.ingest import iter_demo

    query = "how do I parse a date from a string"
    room = tokens - backend.pair_overhead(None) - len(backend._ids(query))
    corpus = backend._ids(" ".join(d.content for d in iter_demo(limit=400)))
    docs = [backend.tokenizer.decode(corpus[i * room : (i + 1) * room]) for i in range(n)]
    return [(query, d) for d in docs]


def _time(backend: Any, pairs: list[tuple[str, str]], repeats: int) -> dict[str, Any]:
    backend.score(pairs[:1])  # warm-up
    best, last = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        last = backend.score(pairs)
        best = min(best, time.perf_counter() - t)
    assert last is not None
    tm = last.timings
    return {
        "pairs": len(pairs),
        "tokens_per_pair": round(tm.tokens / len(pairs), 1),
        "forward_passes": tm.forward_passes,
        "padded_tokens": tm.padded_tokens,
        "best_s": round(best, 3),
        "pairs_per_s": round(len(pairs) / best, 2),
        "tokens_per_s": round(tm.tokens / best),
    }


def run(
    settings: Settings, *, pairs: int = 64, real_pairs: int = 8, tokens: int = 200, repeats: int = 3
) -> dict[str, Any]:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rag.accel import TorchEngine
    from rag.rerank import LLMReranker

    cfg = settings.slice("reranker")
    standin = LLMReranker(
        "standin:llm",
        cache_dir=cfg.model_cache,
        device=cfg.rerank_device,
        dtype=cfg.rerank_dtype,
        max_length=max(cfg.rerank_max_length, tokens + 16),
        token_budget=cfg.rerank_token_budget,
        threads=cfg.rerank_threads,
        offline=True,
    )
    sample = _pairs(standin, pairs, tokens)
    out: dict[str, Any] = {
        "device": standin.device,
        "dtype": standin.dtype,
        "threads": standin.threads,
        "token_budget": standin.token_budget,
    }
    print(f"stand-in: {pairs} pairs of ~{tokens} tokens ...", file=sys.stderr)
    out["standin"] = _time(standin, sample, repeats)
    if real_pairs:
        print("building a random Qwen3-Reranker-0.6B-sized model in memory ...", file=sys.stderr)
        t = time.perf_counter()
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        big = Qwen3ForCausalLM(Qwen3Config(**REAL_SIZE)).eval()
        torch.random.set_rng_state(state)
        build_s = time.perf_counter() - t
        # the stand-in's tokenizer and prompt, the real size's weights: the scoring path is the backend's
        standin.model = big.to(standin.device)
        standin.engine = TorchEngine(
            big, device=standin.device, dtype=standin.dtype, fn=standin._yes_no_logits
        )
        standin._quadratic = 1.0 / (6 * REAL_SIZE["hidden_size"])
        print(f"real size: {real_pairs} pairs of ~{tokens} tokens ...", file=sys.stderr)
        real = _time(standin, sample[:real_pairs], 1)  # one timed call: the 2-core CPU takes ~10 s a pair
        params = sum(p.numel() for p in big.parameters())
        out["real_size"] = {**real, "parameters": params, "build_s": round(build_s, 1)}
    return out


def summary(r: dict[str, Any]) -> str:
    lines = [f"LLM reranker, {r['device']} {r['dtype']}, {r['threads']} threads, budget {r['token_budget']}"]
    for name in ("standin", "real_size"):
        if name in r:
            x = r[name]
            lines.append(
                f"  {name:9s} {x['pairs']:3d} pairs x {x['tokens_per_pair']:.0f} tokens: "
                f"{x['pairs_per_s']:8.1f} pairs/s ({x['tokens_per_s']} tokens/s, "
                f"{x['forward_passes']} passes, best {x['best_s']} s)"
            )
    return "\n".join(lines)
