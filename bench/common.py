"""Shared benchmark plumbing: the machine and its load, matmul peak, Cranfield, dense candidates, output.

Benchmarks are not timed tests: on a shared machine every figure is recorded with the load it ran under.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from rag.errors import ConfigError

__all__ = [
    "Cranfield",
    "cpu_busy",
    "dense_candidates",
    "find_cranfield",
    "load_cranfield",
    "machine_info",
    "matmul_peak",
    "pct",
    "say",
    "write_json",
]

CRANFIELD_HINT = "../shared/datasets/cranfield"


def say(msg: str, *, quiet: bool = False) -> None:
    """Progress on stderr (stdout stays clean for --json)."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def pct(values: Sequence[float], q: float) -> float:
    """Percentile (linear interpolation), NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat; NaN where unavailable)."""

    def snap() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v) - idle, sum(v)

    a = snap()
    time.sleep(seconds)
    b = snap()
    if a is None or b is None or b[1] == a[1]:
        return float("nan")
    return (b[0] - a[0]) / (b[1] - a[1])


def rss_bytes(pid: int | str = "self") -> int:
    """Resident bytes of a process on this machine (``VmRSS`` in /proc); OSError when it is gone."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")


def load_now() -> dict[str, float]:
    """Load averages and the busy fraction right now: recorded next to every figure."""
    la = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"loadavg_1m": round(la[0], 2), "loadavg_5m": round(la[1], 2), "cpu_busy": round(cpu_busy(), 3)}


def machine_info() -> dict[str, Any]:
    """CPU model, cores, bf16/AMX flags, library versions, date (UTC)."""
    from rag.accel import available_cpus, cpu_flags

    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": available_cpus(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    for mod in ("torch", "transformers", "sentence_transformers", "openvino"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def matmul_peak(threads: int = 0, n: int = 2048, repeats: int = 7, device: str = "cpu") -> dict[str, float]:
    """Measured dense matmul rate (TFLOP/s, median of ``repeats``): fp32 and bf16 (CPU), + fp16 on CUDA."""
    import torch

    from rag.accel import cpu_supports_bf16, resolve_threads

    out: dict[str, Any] = {"device": device, "n": n}
    if device.startswith("cuda"):
        n = max(n, 8192)
        out["n"] = n
        dtypes = [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]
        sync = torch.cuda.synchronize
    else:
        torch.set_num_threads(resolve_threads(threads))
        out["threads"] = torch.get_num_threads()
        dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if cpu_supports_bf16() else [])

        def sync() -> None:
            return None

    for name, dt in dtypes:
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        for _ in range(2):
            a @ b
        sync()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            sync()
            ts.append(time.perf_counter() - t)
        out[f"{name}_tflops"] = round(2 * n**3 / statistics.median(ts) / 1e12, 4)
        out[f"{name}_tflops_best"] = round(2 * n**3 / min(ts) / 1e12, 4)
    return out


# -- Cranfield ---------------------------------------------------------------------------------------
@dataclass
class Cranfield:
    root: Path
    doc_ids: list[str]
    docs: list[str]  # title + " " + text, as the dataset's reference figure uses
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in ("corpus.jsonl", "queries.jsonl"):
            st = (self.root / f).stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:12]


def find_cranfield(path: Path | None = None) -> Path:
    """The Cranfield folder: ``path``, else ../shared/datasets/cranfield next to the repo or the cwd."""
    if path is not None:
        cands = [Path(path).expanduser()]
    else:
        repo = Path(__file__).resolve().parents[2]
        cands = [Path.cwd() / CRANFIELD_HINT, repo / CRANFIELD_HINT]
    for c in cands:
        if (c / "corpus.jsonl").is_file():
            return c.resolve()
    raise ConfigError(
        f"the Cranfield dataset was not found at {cands[0]}: benchmarks need a BEIR folder "
        "(corpus.jsonl, queries.jsonl, qrels/test.tsv); pass --dataset PATH. It lives in ../shared/ on "
        "developer machines and CI only; it is never copied into the repo."
    )


def load_cranfield(path: Path | None = None) -> Cranfield:
    root = find_cranfield(path)
    doc_ids, docs = [], []
    for line in (root / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            doc_ids.append(str(r["_id"]))
            docs.append(f"{r.get('title', '')} {r.get('text', '')}".strip())
    qids, queries = [], []
    for line in (root / "queries.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            qids.append(str(r["_id"]))
            queries.append(r["text"])
    qrels: dict[str, dict[str, int]] = {}
    qfile = root / "qrels" / "test.tsv"
    if qfile.is_file():
        for n, line in enumerate(qfile.read_text(encoding="utf-8").splitlines()):
            parts = line.split("\t")
            if len(parts) >= 3 and (n > 0 or parts[-1].strip().lstrip("-").isdigit()):
                qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return Cranfield(root, doc_ids, docs, qids, queries, qrels)


def dense_candidates(
    ds: Cranfield, embedder: Any, k: int = 100, *, cache_dir: Path | None = None, quiet: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` over the corpus for every query: (indices [Q, k], scores [Q, k]).

    Embeddings come from ``embedder`` (rag.embed.Embedder) and are cached under ``cache_dir`` by dataset,
    model and dtype, so repeated benchmark runs skip the corpus embedding.
    """
    key = f"{ds.fingerprint()}-{embedder.name.replace('/', '_')}-{embedder.dtype}-{embedder.runtime}"
    f = cache_dir / f"cranfield-emb-{key}.npz" if cache_dir else None
    if f is not None and f.exists():
        z = np.load(f)
        dv, qv = z["docs"], z["queries"]
    else:
        say(f"embedding {len(ds.docs)} documents and {len(ds.queries)} queries ...", quiet=quiet)
        dv = embedder.embed_documents(ds.docs)
        qv = embedder.embed_queries(ds.queries)
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            np.savez(f, docs=dv, queries=qv)
    sim = qv @ dv.T
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(sim, top, axis=1)


def write_json(obj: Any, path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def emit(result: dict[str, Any], as_json: bool, text: str) -> None:
    """Print ``result`` as JSON (stdout) or ``text``."""
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text)
