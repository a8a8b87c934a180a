"""Query and document embeddings (sentence-transformers), L2-normalised for cosine search."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rag.errors import InvalidInput, ModelError
from rag.models import ResolvedModel, resolve_embedder

__all__ = ["Embedder", "pick_device", "pick_dtype"]

log = logging.getLogger(__name__)


def pick_device(device: str) -> str:
    """'auto' -> cuda if available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def pick_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on CPUs with native bf16, float16 on CUDA, else float32."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "float16"
    if device == "cpu" and cpu_supports_bf16():
        return "bfloat16"
    return "float32"


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
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.resolved: ResolvedModel = resolve_embedder(model, offline=offline)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        try:
            self.model = SentenceTransformer(self.resolved.path, device=self.device)
        except Exception as e:
            raise ModelError(
                f"could not load embedding model {model!r} from {self.resolved.path}: {e}"
            ) from e
        if self.dtype != "float32":
            self.model.to(getattr(torch, self.dtype))
        self.dim: int = int(self.model.get_embedding_dimension())
        self.tokenizer = self.model.tokenizer
        self.max_seq_length: int = int(self.model.max_seq_length)

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
        }

    def _encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
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
