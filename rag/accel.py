"""Inference fast path shared by the reranker and the embedder.

- ``pick_device`` / ``pick_dtype``: bf16 where the CPU has it natively (AVX512-BF16 or AMX), fp16 on CUDA.
- ``resolve_threads``: the CPUs this process may use (affinity, cgroup quota, ``OMP_NUM_THREADS`` as Ray
  sets it to a replica's ``num_cpus``), unless a count is given.
- ``pack_batches``: sequences sorted by length, packed by a padded-token budget (little compute on padding).
- Engines that run a BERT-style encoder on padded numpy batches: ``TorchEngine`` (eager PyTorch, any device)
  and ``OpenVINOEngine`` (OpenVINO's CPU plugin, bf16 or f32; the model is converted once and cached on disk).
  On this project's CPUs OpenVINO's bf16 runs the same model about 1.3x faster than PyTorch's (see
  docs/BENCHMARKS.md); ``pick_runtime("auto")`` takes it when the ``openvino`` package is installed.
- int8: ``quantize_ir`` makes a post-training-quantized copy of a cached IR with NNCF (calibrated on the
  caller's sample), cached next to it; ``OpenVINOEngine(precisions=[..., "int8"])`` compiles it, and
  ``OpenVINOEngine.cached_timing`` keeps the one-off measurement ``rerank_screen=auto`` decides by.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "OpenVINOEngine",
    "TorchEngine",
    "available_cpus",
    "cpu_model",
    "cpu_supports_bf16",
    "int8_path",
    "nncf_available",
    "openvino_available",
    "pack_batches",
    "pad_batch",
    "pick_device",
    "pick_dtype",
    "pick_runtime",
    "quantize_ir",
    "resolve_threads",
]

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
_IR_VERSION = 2  # bump when the conversion changes: cached IR folders are keyed by it
_INT8_VERSION = 1  # bump when the quantization recipe changes: cached int8 IR folders are keyed by it


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
    rows: Sequence[Sequence[int]], idx: Sequence[int], pad_id: int = 0, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask) int64 arrays for ``rows[i] for i in idx``, right-padded to the longest."""
    width = max(len(rows[i]) for i in idx)
    if multiple > 1:
        width = -(-width // multiple) * multiple
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    for r, i in enumerate(idx):
        n = len(rows[i])
        ids[r, :n] = rows[i]
        mask[r, :n] = 1
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


class _Wrapper:  # built lazily: torch.nn is not imported at module import time
    @staticmethod
    def make(module: Any, names: Sequence[str], fn: Callable[[Any, dict], Any]) -> Any:
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = module

            def forward(self, input_ids, attention_mask, token_type_ids=None):  # type: ignore[no-untyped-def]
                feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
                if token_type_ids is not None:
                    feeds["token_type_ids"] = token_type_ids
                return fn(self.inner, feeds)

        return Wrapped().eval()


def _fingerprint(model_dir: Path, kind: str) -> str:
    import openvino

    h = hashlib.sha256(f"{kind}|{_IR_VERSION}|{openvino.__version__}|{model_dir.resolve()}".encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".txt"}:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class OpenVINOEngine:
    """OpenVINO CPU plugin. The torch module is converted once to OpenVINO IR, cached under ``cache_dir``.

    ``precisions``: what to compile (``"bf16"``, ``"f32"``, ``"int8"``); ``__call__`` picks one of them.
    ``"int8"`` is the NNCF-quantized copy of the IR (``quantize_ir``, cached in a subfolder of the IR's,
    keyed by ``_INT8_VERSION`` and ``calibration_key``), built from ``calibration()`` when not cached yet;
    its non-quantized operations run in f32. ``prebuilt_dir``: a read-only cache (an image's, see the
    Dockerfile) whose IR folders are used when they hold this model; what is missing there is built under
    ``cache_dir``.
    """

    name = "openvino"
    _convert_lock = threading.Lock()

    def __init__(
        self,
        module: Any,
        *,
        model_dir: str | os.PathLike[str],
        kind: str,
        names: Sequence[str],
        fn: Callable[[Any, dict], Any],
        cache_dir: str | os.PathLike[str],
        precisions: Sequence[str] = ("bf16",),
        threads: int = 0,
        calibration: Callable[[], list[dict[str, np.ndarray]]] | None = None,
        calibration_key: str = "",
        prebuilt_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        import openvino as ov

        self.names = tuple(names)
        self.threads = threads
        key = _fingerprint(Path(model_dir), kind)
        name = f"{Path(model_dir).name}-{kind}-{key}"
        folder = self.writable = Path(cache_dir) / "openvino" / name
        if prebuilt_dir and (Path(prebuilt_dir) / "openvino" / name / "model.xml").exists():
            folder = Path(prebuilt_dir) / "openvino" / name  # read-only (an image's), used as it is
        xml = folder / "model.xml"
        with self._convert_lock:
            if not xml.exists():
                self._convert(module, fn, folder)
        core = ov.Core()
        with contextlib.suppress(Exception):  # a compile cache is an optimisation only
            self.writable.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(self.writable / "blobs")})
        self.xml = xml
        self.int8_xml: Path | None = None
        model = core.read_model(str(xml))
        self.compiled = {}
        self.requests = {}
        for p in precisions:
            cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": p, "PERFORMANCE_HINT": "LATENCY"}
            m = model
            if p == "int8":
                self.int8_xml = int8_path(xml, calibration_key)
                if not self.int8_xml.exists():  # not prebuilt: quantize into the writable cache
                    self.int8_xml = int8_path(self.writable / "model.xml", calibration_key)
                with self._convert_lock:
                    if not self.int8_xml.exists():
                        if calibration is None:
                            raise ValueError("the int8 precision needs a calibration sample")
                        quantize_ir(xml, self.int8_xml, calibration(), self.names)
                m = core.read_model(str(self.int8_xml))
                cfg["INFERENCE_PRECISION_HINT"] = "f32"  # what is not quantized runs in f32
            if threads > 0:
                cfg["INFERENCE_NUM_THREADS"] = threads
            self.compiled[p] = core.compile_model(m, "CPU", cfg)
            self.requests[p] = self.compiled[p].create_infer_request()
        self.precisions = tuple(precisions)
        self._lock = threading.Lock()

    def drop(self, precision: str) -> None:
        """Release one compiled precision (``rerank_screen=auto`` measured it and chose another)."""
        self.requests.pop(precision, None)
        self.compiled.pop(precision, None)
        self.precisions = tuple(p for p in self.precisions if p != precision)

    def cached_timing(self, key: str, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
        """``measure()`` once per ``key`` (+ this CPU model and thread count), cached in a JSON file in the
        writable IR folder (a prebuilt folder's file is read too): a replica on a known machine type reads
        the figure instead of timing."""
        import json

        cache = self.writable / "screen-speed.json"
        key = f"{cpu_model()}|{self.threads} threads|{key}"
        seen: dict[str, Any] = {}
        for f in dict.fromkeys([(self.int8_xml or self.xml).parent / cache.name, cache]):  # prebuilt, ours
            with contextlib.suppress(OSError, ValueError):
                seen.update(json.loads(f.read_text()))
        if isinstance(seen.get(key), dict):
            return {k: float(v) for k, v in seen[key].items()}
        out = measure()
        seen[key] = out
        with contextlib.suppress(OSError):
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(seen, indent=1))
            tmp.replace(cache)
        return out

    def _convert(self, module: Any, fn: Callable[[Any, dict], Any], folder: Path) -> None:
        import shutil
        import tempfile

        import openvino as ov
        import torch

        log.info("converting the model to OpenVINO IR in %s (once)", folder)
        wrapped = _Wrapper.make(module, self.names, fn)
        # the example has padding (mask zeros), so no data-dependent "no padding" shortcut is traced in
        feeds = {
            "input_ids": torch.full((2, 16), 5, dtype=torch.int64),
            "attention_mask": torch.ones((2, 16), dtype=torch.int64),
            "token_type_ids": torch.zeros((2, 16), dtype=torch.int64),
        }
        feeds["attention_mask"][1, 8:] = 0
        example = tuple(feeds[n] for n in self.names)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constant here
            ovm = ov.convert_model(wrapped, example_input=example)
        for inp, name in zip(ovm.inputs, self.names, strict=True):
            inp.get_tensor().set_names({name})
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        try:
            ov.save_model(ovm, str(tmp / "model.xml"), compress_to_fp16=False)
            with contextlib.suppress(OSError):  # another process converted it first: keep theirs
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def __call__(self, feeds: dict[str, np.ndarray], precision: str | None = None) -> np.ndarray:
        p = precision or self.precisions[0]
        with self._lock:
            out = self.requests[p].infer([feeds[n] for n in self.names])
            return np.array(out[0], dtype=np.float32, copy=True)


# -- int8 -------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def int8_path(xml: Path, calibration_key: str) -> Path:
    """Where the int8 copy of the IR ``xml`` lives: a subfolder keyed by the recipe version and sample."""
    return xml.parent / f"int8-v{_INT8_VERSION}-{calibration_key or 'default'}" / "model.xml"


def quantize_ir(xml: Path, dest: Path, sample: list[dict[str, np.ndarray]], names: Sequence[str]) -> None:
    """NNCF post-training quantization of the IR ``xml`` (int8 weights and activations of the encoder's
    MatMuls; ``ModelType.TRANSFORMER`` keeps softmax, LayerNorm and GELU in float), calibrated on
    ``sample`` (padded feed dicts), written to ``dest`` atomically. Needs ``nncf`` (ConfigError otherwise)."""
    import shutil
    import tempfile

    if not nncf_available():
        from rag.errors import ConfigError

        raise ConfigError(
            "the int8 screen needs NNCF to quantize the model once: pip install nncf "
            "(or pip install 'rag-serve[int8]'), or set RAG_RERANK_SCREEN=auto"
        )
    import nncf
    import openvino as ov

    log.info("quantizing %s to int8 with NNCF (%d calibration batches, once)", xml, len(sample))
    core = ov.Core()
    model = core.read_model(str(xml))
    data = nncf.Dataset([[f[n] for n in names] for f in sample])
    # the pooler and classifier stay f32: a negligible share of the FLOPs, and on the stand-in they are
    # 40% of the int8 screen's largest error (0.38 -> 0.22 logits on Cranfield pairs)
    head = [
        op.get_friendly_name()
        for op in model.get_ops()
        if op.get_type_name() == "MatMul" and ".encoder." not in op.get_friendly_name()
    ]
    # NNCF logs and draws progress bars on stdout; stdout belongs to the caller (`rag query --json`): stderr
    from nncf.common.logging import nncf_logger

    for h in nncf_logger.handlers:
        if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.__stdout__):
            h.setStream(sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        qm = nncf.quantize(
            model,
            data,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(sample),
            ignored_scope=nncf.IgnoredScope(names=head, validate=False),
        )
    dest.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.parent.name + ".", dir=dest.parent.parent))
    try:
        ov.save_model(qm, str(tmp / dest.name), compress_to_fp16=False)
        with contextlib.suppress(OSError):  # another process quantized it first: keep theirs
            tmp.rename(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
