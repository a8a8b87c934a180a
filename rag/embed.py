"""Query and document embeddings (sentence-transformers), L2-normalised for cosine search.

Fast path (models made of a Transformer, mean or CLS pooling and an optional Normalize, like the default
all-MiniLM-L6-v2): texts are tokenized once in one fast-tokenizer batch call, sorted by token length and
packed into forward passes of at most ``token_budget`` padded tokens, run in the chosen dtype (bf16 where the
CPU has it) on OpenVINO when installed (else PyTorch), and pooled and normalised in fp32. Other models use
``SentenceTransformer.encode``. ``runtime="st"`` forces that plain path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rag.accel import cpu_supports_bf16, pick_device, pick_dtype
from rag.errors import InvalidInput, ModelError
from rag.models import ResolvedModel, resolve_embedder

if TYPE_CHECKING:
    from rag.settings import Settings
    from rag.stages import EmbedderConfig

__all__ = ["Embedder", "cpu_supports_bf16", "make_embedder", "pick_device", "pick_dtype"]

log = logging.getLogger(__name__)

# Passes are padded to a multiple of this many tokens. OpenVINO (and oneDNN under it) keep compiled state per
# input shape, so a service embedding queries of every length grew without end: +42.6% RSS over 3,000 query
# batches unpadded, +0.4% padded to 16, which also ran 1.25x faster by reusing that state
# (`python -m bench.embed_shapes`; docs/BENCHMARKS.md, "Soak"). The mask keeps the padding out of attention
# and pooling.
PAD_MULTIPLE = 16


def _hidden_states(model: Any, feeds: dict) -> Any:
    return model(**feeds).last_hidden_state


class Embedder:
    """Wraps a SentenceTransformer. Loading happens in ``__init__``, never at import time."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 64,
        offline: bool = False,
        runtime: str = "auto",
        token_budget: int = 16384,
        threads: int = 0,
        cache_dir: os.PathLike[str] | str | None = None,
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        from rag.accel import TorchEngine, pick_runtime, resolve_threads
        from rag.ov_engine import OpenVINOEngine

        self.resolved: ResolvedModel = resolve_embedder(model, offline=offline)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.token_budget = token_budget
        try:
            self.model = SentenceTransformer(self.resolved.path, device=self.device)
        except Exception as e:
            raise ModelError(
                f"could not load embedding model {model!r} from {self.resolved.path}: {e}"
            ) from e
        self.dim: int = int(self.model.get_embedding_dimension())
        self.tokenizer = self.model.tokenizer
        self.max_seq_length: int = int(self.model.max_seq_length)
        self.threads = resolve_threads(threads) if self.device == "cpu" else threads
        if threads > 0 and self.device == "cpu":
            torch.set_num_threads(self.threads)
        plan = self._fast_plan() if runtime != "st" else None
        self.runtime = (
            "sentence-transformers" if plan is None else pick_runtime(runtime, self.device, self.dtype)
        )
        self._engine: Any = None
        if plan is None:
            if self.dtype != "float32":
                self.model.to(getattr(torch, self.dtype))
            return
        self._pooling, self._normalize, inner = plan
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.names = tuple(
            n
            for n in ("input_ids", "attention_mask", "token_type_ids")
            if n in self.tokenizer.model_input_names
        )
        if self.runtime == "openvino":
            cache = Path(cache_dir) if cache_dir is not None else Path(".rag/models").resolve()
            precision = "bf16" if self.dtype == "bfloat16" else "f32"
            try:
                ov = OpenVINOEngine(
                    inner,
                    model_dir=self.resolved.path,
                    kind="hidden",
                    names=self.names,
                    fn=_hidden_states,
                    cache_dir=cache,
                    precisions=[precision],
                    threads=self.threads,
                )
            except Exception as e:
                raise ModelError(
                    f"could not run embedder {model!r} on OpenVINO: {e}; use runtime=torch"
                ) from e
            self._engine = ov
        else:
            self._engine = TorchEngine(inner, device=self.device, dtype=self.dtype, fn=_hidden_states)

    def _fast_plan(self) -> tuple[str, bool, Any] | None:
        """(pooling, normalize, transformer) for Transformer + mean/CLS Pooling [+ Normalize] models."""
        mods = list(self.model)
        names = [type(m).__name__ for m in mods]
        if len(mods) not in (2, 3) or names[0] != "Transformer" or names[1] != "Pooling":
            return None
        if len(mods) == 3 and names[2] != "Normalize":
            return None
        mode = getattr(mods[1], "pooling_mode", None)
        inner = getattr(mods[0], "model", None)
        if mode not in ("mean", "cls") or inner is None or self.tokenizer is None:
            return None
        return mode, len(mods) == 3, inner

    @property
    def name(self) -> str:
        return self.resolved.requested

    def info(self) -> dict[str, Any]:
        return {
            "model": self.resolved.requested,
            "source": self.resolved.source,
            "device": self.device,
            "dtype": self.dtype,
            "dim": self.dim,
            "runtime": self.runtime,
            "trained": True,  # the embedder is always the real model (packaged, local or hub): no stand-in
        }

    def _encode_fast(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        from rag.accel import pack_batches, pad_batch

        enc = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_seq_length,
            padding=False,
            return_attention_mask=False,
        )
        ids = enc["input_ids"]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        batches = pack_batches([len(x) for x in ids], self.token_budget)
        done = 0
        for n, b in enumerate(batches):
            x, mask = pad_batch(ids, b, self.pad_id, PAD_MULTIPLE)
            feeds = {"input_ids": x, "attention_mask": mask}
            if "token_type_ids" in self.names:
                feeds["token_type_ids"] = pad_batch(enc["token_type_ids"], b, 0, PAD_MULTIPLE)[0]
            h = self._engine(feeds)  # (rows, width, dim) float32
            if self._pooling == "cls":
                v = h[:, 0]
            else:
                m = mask[:, :, None].astype(np.float32)
                v = (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
            if self._normalize:
                v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            out[b] = v
            done += len(b)
            if progress and (n % 10 == 9 or n == len(batches) - 1):
                log.info("embedded %d/%d texts", done, len(texts))
        return out

    def _encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        if self._engine is not None:
            return self._encode_fast(texts, progress=progress)
        vecs = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress,
        )
        return np.asarray(vecs, dtype=np.float32)

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise InvalidInput("query must be a non-empty string")
        return self._encode(queries)

    def embed_query(self, query: str) -> np.ndarray:
        return self.embed_queries([query])[0]

    def embed_documents(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._encode(texts, progress=progress)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def make_embedder(config: EmbedderConfig | Settings) -> Embedder:
    """The embedder the configuration asks for: the one factory (library, CLI, Embedder deployment).
    A parameter ``x`` of ``Embedder`` takes the setting ``embedding_x``."""
    from rag.settings import Settings

    cfg = config.slice("embedder") if isinstance(config, Settings) else config
    kw = cfg.kwargs_for(Embedder.__init__, "embedding_")
    return Embedder(batch_size=cfg.embed_batch_size, offline=cfg.offline, cache_dir=cfg.model_cache, **kw)
