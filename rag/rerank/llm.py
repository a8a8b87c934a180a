"""The LLM yes/no backend: a causal LM (the Qwen3-Reranker family) asked whether a document meets a query.

Each pair is written into the model card's prompt (``QWEN3_RERANKER``: a system turn asking for "yes" or
"no", the user turn ``<Instruct>: …\\n<Query>: …\\n<Document>: …``, and the assistant turn opened with an
empty think block); the score is P("yes") from the last position's logits restricted to the "yes" and "no"
tokens, ``softmax([no, yes])[1]``, as the model card computes it. Another template gives near-random
scores (vLLM #21681), so the template's strings live here, once, and a test checks them character by
character.

- The instruction says what relevance means (a default per model; ``rerank_instruction`` changes the
  default; each request may send its own through the rerank engine). One score per (instruction, query,
  document).
- Batches: pairs tokenized once, identical ones scored once, sorted by length and packed by a padded-token
  budget (``rag.accel.pack_batches``, as the cross-encoder), padded on the left so the last position is every
  row's real last token, with position ids counted from each row's first real token.
- Truncation: the prompt's prefix and suffix stay whole; the middle (instruction, query, document) is cut
  from its end to fit ``max_length``, so the document goes first (the model card's ``longest_first`` on
  one sequence). The rerank engine splits long documents into windows before that (``pair_overhead``).
- Only the last position's hidden state meets the LM head, and only its "yes" and "no" rows: the full
  vocabulary projection (151k rows) is never computed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rag.errors import ConfigError, InvalidInput, ModelError, RerankerError
from rag.longdoc import MIN_WINDOW
from rag.rerank.base import Scores, ScoreTimings
from rag.validation import Pair, validate_pairs

__all__ = ["DEFAULT_LLM_RERANK_MODEL", "QWEN3_RERANKER", "LLMReranker", "PromptTemplate"]

DEFAULT_LLM_RERANK_MODEL = "Qwen/Qwen3-Reranker-0.6B"
BOUNDARY_TOKENS = 2  # the query and the document may tokenize one token apart inside the prompt


@dataclass(frozen=True)
class PromptTemplate:
    """A yes/no reranker's prompt: ``prefix + body.format(instruction, query, document) + suffix``."""

    name: str
    prefix: str
    body: str
    suffix: str
    default_instruction: str
    yes: str = "yes"
    no: str = "no"

    def render(self, query: str, document: str, instruction: str | None = None) -> str:
        return self.prefix + self.middle(query, document, instruction) + self.suffix

    def middle(self, query: str, document: str, instruction: str | None = None) -> str:
        return self.body.format(
            instruction=self.default_instruction if instruction is None else instruction,
            query=query,
            document=document,
        )


# The Qwen3-Reranker model card (QwenLM/Qwen3-Embedding; the same strings in vLLM's and OpenVINO GenAI's
# Qwen3-Reranker examples). Every character matters.
QWEN3_RERANKER = PromptTemplate(
    name="qwen3-reranker",
    prefix=(
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
        'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    ),
    body="<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
    suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    default_instruction="Given a web search query, retrieve relevant passages that answer the query",
)


class LLMReranker:
    """A causal LM scored by P("yes") under ``QWEN3_RERANKER`` (module docstring)."""

    enabled = True

    def __init__(
        self,
        model: str = DEFAULT_LLM_RERANK_MODEL,
        *,
        cache_dir: os.PathLike[str] | str = ".rag/models",
        device: str = "auto",
        dtype: str = "auto",
        max_length: int = 512,
        token_budget: int = 8192,
        threads: int = 0,
        offline: bool = False,
        instruction: str | None = None,
    ) -> None:
        from rag.accel import TorchEngine, pick_device, pick_dtype, resolve_threads
        from rag.models import resolve_llm_reranker

        self.template = QWEN3_RERANKER
        if instruction is not None and not instruction.strip():
            raise ConfigError("rerank_instruction is empty: unset it for the model's default instruction")
        self.default_instruction = self.template.default_instruction if instruction is None else instruction
        self.resolved = resolve_llm_reranker(model, cache_dir=Path(cache_dir), offline=offline)
        self.device = pick_device(device)
        # fp16 overflows in Qwen3's activations; bf16 is what the model was trained in
        self.dtype = (
            "bfloat16"
            if dtype == "auto" and self.device.startswith("cuda")
            else pick_dtype(dtype, self.device)
        )
        self.max_length, self.token_budget = max_length, token_budget
        self.threads = resolve_threads(threads) if self.device == "cpu" else threads
        self._load(model)
        self.engine = TorchEngine(self.model, device=self.device, dtype=self.dtype, fn=self._yes_no_logits)
        self._lock = threading.Lock()  # one forward pass at a time per replica
        self._default_overhead = 0
        if self.pair_overhead(None) + MIN_WINDOW > max_length:
            raise ConfigError(
                f"rerank_max_length={max_length} leaves no room for a document in the {self.template.name} "
                f"prompt ({self.pair_overhead(None)} tokens with the instruction): raise rerank_max_length"
            )

    def _load(self, model: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.device == "cpu":
            torch.set_num_threads(self.threads)
        from transformers.utils import logging as hf_logging

        path = self.resolved.path
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", truncation_side="right")
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        except Exception as e:
            raise ModelError(f"could not load LLM reranker {model!r} from {path}: {e}") from e
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.model.to(self.device)
        ids = []
        for word in (self.template.no, self.template.yes):
            enc = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise ModelError(
                    f"LLM reranker {model!r}: {word!r} is {len(enc)} tokens, a yes/no reranker needs 1"
                )
            ids.append(enc[0])
        self.no_id, self.yes_id = ids
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        self.prefix_ids = self._ids(self.template.prefix)
        self.suffix_ids = self._ids(self.template.suffix)
        hidden = int(getattr(self.model.config, "hidden_size", 0) or 0)
        self._quadratic = 1.0 / (6 * hidden) if hidden else 0.0  # attention vs dense work per token

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _yes_no_logits(self, model: Any, feeds: dict) -> Any:
        """(rows, 2) logits of "no" and "yes" at the last position: the LM head's two rows only."""
        import torch

        hidden = model.model(**feeds).last_hidden_state[:, -1, :]
        head = model.get_output_embeddings()
        rows = torch.tensor([self.no_id, self.yes_id], device=hidden.device)
        bias = head.bias[rows] if head.bias is not None else None
        return torch.nn.functional.linear(hidden, head.weight[rows], bias)

    # -- what it is ----------------------------------------------------------------------------------
    def pair_overhead(self, instruction: str | None) -> int:
        """Tokens one pair costs beyond its query's and its document's: the prompt around them with this
        instruction (None: the default), and a margin for how the pieces join."""
        if instruction is None and self._default_overhead:
            return self._default_overhead  # requests' own instructions are not kept: they vary without bound
        body = self._ids(self.template.middle("", "", instruction or self.default_instruction))
        n = len(self.prefix_ids) + len(body) + len(self.suffix_ids) + BOUNDARY_TOKENS
        if instruction is None:
            self._default_overhead = n
        return n

    def info(self) -> dict[str, Any]:
        from rag.rerank.cross_encoder import model_revision

        return {
            "backend": "llm",
            "model": self.resolved.requested,
            "revision": model_revision(self.resolved.path),
            "source": self.resolved.source,
            "device": self.device,
            "dtype": self.dtype,
            "runtime": "torch",
            "threads": self.threads,
            "template": self.template.name,
            "default_instruction": self.default_instruction,
            "score": 'P("yes") from the "yes" and "no" logits at the last position',
            "sorted": True,
            "token_budget": self.token_budget,
            "trained": self.resolved.trained,
            "max_length": self.max_length,
        }

    # -- scoring -------------------------------------------------------------------------------------
    def encode(
        self, pairs: Sequence[Pair], instructions: Sequence[str | None] | None = None
    ) -> list[list[int]]:
        """Each pair's prompt as token ids (at most ``max_length``): prefix, middle cut at its end, suffix."""
        instr = instructions or [None] * len(pairs)
        middles = [
            self.template.middle(q, d, i or self.default_instruction)
            for (q, d), i in zip(pairs, instr, strict=True)
        ]
        room = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        # cut here, not by the tokenizer's truncation: setting that mutates the shared Rust tokenizer, which
        # the rerank engine's windows use from another thread ("Already borrowed")
        enc = self.tokenizer(middles, add_special_tokens=False, return_attention_mask=False, verbose=False)
        return [self.prefix_ids + list(ids[:room]) + self.suffix_ids for ids in enc["input_ids"]]

    def score(self, pairs: Sequence[Pair], instructions: Sequence[str | None] | None = None) -> Scores:
        """P("yes") per pair, in input order; ``instructions``: one per pair (None: the default)."""
        from rag.accel import pack_batches, pad_batch

        pairs = validate_pairs(pairs)
        if instructions is not None and len(instructions) != len(pairs):
            raise InvalidInput(f"{len(instructions)} instructions for {len(pairs)} pairs")
        if not pairs:
            return Scores()
        t0 = time.perf_counter()
        instr = [i or self.default_instruction for i in (instructions or [None] * len(pairs))]
        slot: dict[tuple[str, str, str], int] = {}  # identical (instruction, query, document) scored once
        where = [slot.setdefault((i, q, d), len(slot)) for i, (q, d) in zip(instr, pairs, strict=True)]
        uniq = list(slot)
        ids = self.encode([(q, d) for _, q, d in uniq], [i for i, _, _ in uniq])
        t1 = time.perf_counter()
        logits = np.zeros((len(uniq), 2), dtype=np.float32)
        batches = pack_batches([len(x) for x in ids], self.token_budget, quadratic=self._quadratic)
        padded = 0
        try:
            with self._lock:
                for rows in batches:
                    x, mask = pad_batch(ids, rows, self.pad_id, left=True)
                    positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
                    feeds = {"input_ids": x, "attention_mask": mask, "position_ids": positions}
                    logits[rows] = self.engine(feeds).reshape(len(rows), 2)
                    padded += x.size
        except RuntimeError as e:  # CUDA OOM, bad shapes...
            raise RerankerError(f"LLM reranker forward pass failed: {e}") from e
        t2 = time.perf_counter()
        p_yes = 1.0 / (1.0 + np.exp(logits[:, 0].astype(np.float64) - logits[:, 1]))  # softmax([no, yes])[1]
        timings = ScoreTimings(
            tokenize_ms=(t1 - t0) * 1e3,
            inference_ms=(t2 - t1) * 1e3,
            pairs=len(pairs),
            unique_pairs=len(uniq),
            forward_passes=len(batches),
            tokens=sum(len(x) for x in ids),
            padded_tokens=padded,
        )
        return Scores((float(p_yes[w]) for w in where), timings)
