"""OpenVINO's CPU plugin as an inference engine, and the int8 copy of a model (``rag.accel``'s other half).

``OpenVINOEngine`` converts a torch module once to OpenVINO IR, cached on disk (keyed by the model files,
the conversion's version and OpenVINO's), and compiles the precisions asked for (bf16, f32, int8). On this
project's CPUs OpenVINO's bf16 runs the same model about 1.3x faster than PyTorch's (docs/BENCHMARKS.md).
int8: ``quantize_ir`` makes a post-training-quantized copy of a cached IR with NNCF (calibrated on the
caller's sample), cached next to it; ``OpenVINOEngine.cached_timing`` keeps the one-off measurement
``rerank_screen=auto`` decides by.
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

from rag.accel import Wrapper, nncf_available

__all__ = ["INT8_VERSION", "IR_VERSION", "OpenVINOEngine", "cpu_model", "int8_path", "quantize_ir"]

log = logging.getLogger(__name__)

IR_VERSION = 2  # bump when the conversion changes: cached IR folders are keyed by it
INT8_VERSION = 1  # bump when the quantization recipe changes: cached int8 IR folders are keyed by it


def _fingerprint(model_dir: Path, kind: str) -> str:
    import openvino

    h = hashlib.sha256(f"{kind}|{IR_VERSION}|{openvino.__version__}|{model_dir.resolve()}".encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".txt"}:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class OpenVINOEngine:
    """OpenVINO CPU plugin. The torch module is converted once to OpenVINO IR, cached under ``cache_dir``.

    ``precisions``: what to compile (``"bf16"``, ``"f32"``, ``"int8"``); ``__call__`` picks one of them.
    ``"int8"`` is the NNCF-quantized copy of the IR (``quantize_ir``, cached in a subfolder of the IR's,
    keyed by ``INT8_VERSION`` and ``calibration_key``), built from ``calibration()`` when not cached yet;
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
        wrapped = Wrapper.make(module, self.names, fn)
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
    return xml.parent / f"int8-v{INT8_VERSION}-{calibration_key or 'default'}" / "model.xml"


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
