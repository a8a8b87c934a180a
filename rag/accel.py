"""Inference fast path shared by the reranker and the embedder.

- ``pick_device`` / ``pick_dtype``: bf16 where the CPU has it natively (AVX512-BF16 or AMX), fp16 on CUDA.
- ``resolve_threads``: the CPUs this process may use (affinity, cgroup quota, ``OMP_NUM_THREADS`` as Ray
  sets it to a replica's ``num_cpus``), unless a count is given.
- ``pack_batches``: sequences sorted by length, packed by a padded-token budget (little compute on padding).
- Engines that run a BERT-style encoder on padded numpy batches: ``TorchEngine`` (eager PyTorch, any device)
  here, and ``rag.ov_engine.OpenVINOEngine`` (OpenVINO's CPU plugin, bf16, f32 or int8; converted once and
  cached on disk), which ``pick_runtime("auto")`` takes when the ``openvino`` package is installed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "INPUT_NAMES",
    "TorchEngine",
    "Wrapper",
    "available_cpus",
    "cpu_flags",
    "cpu_supports_bf16",
    "nncf_available",
    "openvino_available",
    "pack_batches",
    "pad_batch",
    "pick_device",
    "pick_dtype",
    "pick_runtime",
    "resolve_threads",
]

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


# -- hardware choices -------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def pick_device(device: str) -> str:
    """'auto' -> cuda if available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on CPUs with native bf16, float16 on CUDA, else float32.

    Never float16 on a CPU by choice: PyTorch's CPU fp16 matmul is emulated (hundreds of times slower here).
    """
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "float16"
    if device == "cpu" and cpu_supports_bf16():
        return "bfloat16"
    return "float32"


def available_cpus() -> int:
    """CPUs this process may run on: scheduler affinity, capped by a cgroup v2 CPU quota (containers)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def resolve_threads(threads: int = 0) -> int:
    """``threads`` if > 0, else the CPUs we may use, capped by torch's intra-op count.

    torch's default count follows ``OMP_NUM_THREADS``, which Ray sets to a replica's ``num_cpus``, so in a
    Serve replica this is the CPUs the replica was given.
    """
    if threads > 0:
        return threads
    import torch

    return max(1, min(available_cpus(), torch.get_num_threads()))


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def nncf_available() -> bool:
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return True


def pick_runtime(runtime: str, device: str, dtype: str) -> str:
    """'auto' -> 'openvino' on CPU when it is installed (bf16 or f32), else 'torch'."""
    if runtime != "auto":
        if runtime == "openvino" and device != "cpu":
            from rag.errors import ConfigError

            raise ConfigError(f"the openvino runtime runs on the CPU, not on {device!r}: use runtime=torch")
        if runtime == "openvino" and not openvino_available():
            from rag.errors import ConfigError

            raise ConfigError("runtime=openvino needs the openvino package: pip install openvino")
        return runtime
    if device == "cpu" and dtype in ("bfloat16", "float32") and openvino_available():
        return "openvino"
    return "torch"


# -- batching ---------------------------------------------------------------------------------------
def pack_batches(
    lengths: Sequence[int],
    token_budget: int,
    *,
    max_batch: int = 0,
    sort: bool = True,
    overhead: int = 256,
    quadratic: float = 0.0,
) -> list[list[int]]:
    """Indices grouped into forward passes.

    ``sort``: ascending length, split to minimise the padded work: each pass costs ``rows * longest *
    (1 + quadratic * longest)`` (padded tokens; the quadratic term is attention, ``1 / (6 * hidden)`` for a
    BERT layer) plus ``overhead`` tokens, and holds at most ``token_budget`` padded tokens (and ``max_batch``
    rows when > 0). Exact dynamic programme over the sorted lengths. Not sorted: input order in chunks of
    ``max_batch``.
    """
    n = len(lengths)
    if not sort:
        step = max_batch or n or 1
        return [list(range(i, min(n, i + step))) for i in range(0, n, step)]
    if n == 0:
        return []
    idx = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    ln = np.asarray(lengths, dtype=np.float64)[idx]
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        longest = ln[i - 1]
        rows = max(1, int(token_budget // max(longest, 1)))  # batch i-rows .. i-1 fits the budget
        if max_batch:
            rows = min(rows, max_batch)
        lo = max(0, i - rows)
        j = np.arange(lo, i)
        cost = best[lo:i] + (i - j) * longest * (1.0 + quadratic * longest) + overhead
        k = int(np.argmin(cost))
        best[i], cut[i] = cost[k], lo + k
    out: list[list[int]] = []
    i = n
    while i > 0:
        out.append(idx[cut[i] : i].tolist())
        i = int(cut[i])
    return out[::-1]


def pad_batch(
    rows: Sequence[Sequence[int]],
    idx: Sequence[int],
    pad_id: int = 0,
    multiple: int = 1,
    *,
    left: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask) int64 arrays for ``rows[i] for i in idx``, padded to the longest: on the right,
    or on the left with ``left=True`` (a causal LM reads its answer at the last position)."""
    width = max(len(rows[i]) for i in idx)
    if multiple > 1:
        width = -(-width // multiple) * multiple
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    for r, i in enumerate(idx):
        n = len(rows[i])
        cols = slice(width - n, width) if left else slice(0, n)
        ids[r, cols] = rows[i]
        mask[r, cols] = 1
    return ids, mask


# -- engines ----------------------------------------------------------------------------------------
class TorchEngine:
    """Eager PyTorch (SDPA attention). ``fn(module, feeds) -> tensor`` picks the output."""

    name = "torch"

    def __init__(self, module: Any, *, device: str, dtype: str, fn: Callable[[Any, dict], Any]) -> None:
        import torch

        self.device = device
        self.dtype = dtype
        self.module = module.eval()
        if dtype != "float32":
            self.module.to(getattr(torch, dtype))
        self.fn = fn

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = {k: torch.from_numpy(v).to(self.device) for k, v in feeds.items()}
            return self.fn(self.module, t).float().cpu().numpy()


class Wrapper:  # built lazily: torch.nn is not imported at module import time
    @staticmethod
    def make(module: Any, names: Sequence[str], fn: Callable[[Any, dict], Any]) -> Any:
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = module

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
                feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
                if token_type_ids is not None:
                    feeds["token_type_ids"] = token_type_ids
                return fn(self.inner, feeds)

        return Wrapped().eval()
