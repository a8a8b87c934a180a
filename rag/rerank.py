"""Stage 2: rerankers. A reranker scores a flat list of (query, document) pairs; ranking is core logic.

- ``CrossEncoderReranker``: a sentence-transformers ``CrossEncoder``. In ``float32`` with ``sort=False`` it
  is exactly ``CrossEncoder.predict``; by default it sorts pairs by length, packs them into batches by a
  padded-token budget, screens in int8 (an NNCF-quantized OpenVINO copy, where it measures faster) or bf16
  where the CPU has native bf16 (fp16 on CUDA), rescores each query's head in fp32, and runs on OpenVINO
  when installed (see the class docstring and docs/BENCHMARKS.md).
- ``CohereReranker``: Cohere's hosted Rerank v2 API (or anything that speaks it) via ``cohere.ClientV2``.
- ``NoReranker``: stage 2 disabled; the pipeline keeps the dense order.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rag.errors import ConfigError, InvalidInput, ModelError, RerankerError
from rag.settings import RerankerConfig, Settings
from rag.validation import check_text

__all__ = [
    "CohereReranker",
    "CrossEncoderReranker",
    "NoReranker",
    "Pair",
    "Reranker",
    "make_reranker",
]

log = logging.getLogger(__name__)

Pair = tuple[str, str]


@runtime_checkable
class Reranker(Protocol):
    """``score(pairs)`` returns one relevance score per (query, document) pair, in input order."""

    enabled: bool

    def score(self, pairs: Sequence[Pair]) -> list[float]: ...

    def info(self) -> dict[str, Any]: ...


def validate_pairs(pairs: Sequence[Pair]) -> None:
    for i, p in enumerate(pairs):
        if not (
            isinstance(p, tuple | list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str)
        ):
            raise InvalidInput(
                f"pair {i} must be a (query, document) pair of strings, got {type(p).__name__}"
            )
        check_text(p[0], f"pair {i} query")
        check_text(p[1], f"pair {i} document")


class NoReranker:
    """Stage 2 disabled (``RAG_RERANKER=none``)."""

    enabled = False

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        raise RerankerError("reranking is disabled (RAG_RERANKER=none)")

    def info(self) -> dict[str, Any]:
        return {"backend": "none", "model": None, "device": None, "dtype": None, "trained": None}


class CrossEncoderReranker:
    """sentence-transformers cross-encoder with a fast path: sorted, budgeted, bf16 screen + fp32 refine.

    Two configurations:

    - ``sort=False, dtype="float32"``: exactly ``CrossEncoder.predict`` (PyTorch, fp32, ``batch_size`` pairs
      per forward pass in input order). The parity reference.
    - default (``sort=True``, ``dtype="auto"``): pairs are tokenized once (one fast-tokenizer batch call),
      identical pairs scored once, sorted by token length and packed into forward passes of at most
      ``token_budget`` padded tokens. Every pair is scored in bf16 where the CPU has it (fp16 on CUDA);
      then, per query, the best ``refine_top`` pairs and any pair within ``refine_margin`` logits of the
      last of them are scored again in fp32, so the head of each ranking is the fp32 one (bf16 alone
      reorders close scores: about 84% of top-8 positions match fp32 on Cranfield). ``runtime="auto"``
      runs the model on OpenVINO when it is installed (CPU), else on eager PyTorch.

    ``screen`` picks the screen's precision: ``"fp32"`` (no refine needed), ``"bf16"``, ``"int8"`` (OpenVINO
    on CPU: an NNCF post-training-quantized copy of the IR, calibrated once on (query, passage) pairs of the
    stdlib demo corpus and cached next to the IR), or ``"auto"``: the ``dtype`` rule, and, when ``dtype`` is
    ``"auto"`` too, NNCF is installed and the CPU has no native bf16 (where it has, bf16 won every
    measurement), int8 if a one-off micro-measurement (cached with the IR) finds it faster than fp32 here.
    The fp32 refine of each query's head is the same for all.
    """

    enabled = True

    def __init__(
        self,
        model: str,
        *,
        cache_dir: os.PathLike[str] | str = ".rag/models",
        device: str = "auto",
        dtype: str = "auto",
        max_length: int = 512,
        batch_size: int = 32,
        token_budget: int = 8192,
        sort: bool = True,
        threads: int = 0,
        offline: bool = False,
        runtime: str = "auto",
        refine_top: int = 8,
        refine_margin: float = 0.1,
        screen: str = "auto",
        ir_dir: os.PathLike[str] | str | None = None,
    ) -> None:
        import copy
        from pathlib import Path

        import torch
        from sentence_transformers import CrossEncoder

        from rag.accel import (
            OpenVINOEngine,
            TorchEngine,
            nncf_available,
            pick_device,
            pick_dtype,
            pick_runtime,
            resolve_threads,
        )
        from rag.models import resolve_cross_encoder

        self.resolved = resolve_cross_encoder(model, cache_dir=Path(cache_dir), offline=offline)
        self.device = pick_device(device)
        if screen not in SCREENS:
            raise ConfigError(f"rerank_screen must be one of {', '.join(SCREENS)}, got {screen!r}")
        self.dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(screen) or pick_dtype(dtype, self.device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.sort = sort
        self.threads = resolve_threads(threads) if self.device == "cpu" else threads
        if self.device == "cpu":
            torch.set_num_threads(self.threads)
        # Parity configuration (sort=False) is plain PyTorch; the fast path picks its runtime.
        self.runtime = pick_runtime(runtime, self.device, self.dtype) if sort else "torch"
        if screen == "int8" and not (sort and self.device == "cpu" and self.runtime == "openvino"):
            raise ConfigError(
                "rerank_screen=int8 runs on OpenVINO on the CPU with the sorted fast path: set "
                "RAG_RERANK_RUNTIME=openvino (or auto, with the openvino package installed) and "
                f"RAG_RERANK_DEVICE=cpu (now: runtime {self.runtime}, device {self.device}, sort {sort})"
            )
        try_int8 = screen == "int8" or (
            screen == "auto"
            and dtype == "auto"
            and refine_top > 0  # auto never makes int8 scores final: the head is always rescored in fp32
            and sort
            and self.device == "cpu"
            and self.runtime == "openvino"
            # With native bf16 the bf16 screen won every measurement (docs/BENCHMARKS.md, int8 section): the
            # int8 screen's larger error sends 3-4x more pairs to the fp32 refine. Measure int8 against fp32.
            and self.dtype == "float32"
            and nncf_available()
        )
        self.screen = "int8" if screen == "int8" else self.dtype
        self.screen_choice = f"rerank_screen={screen}" + ("" if screen != "auto" else f" -> {self.dtype}")
        if screen == "auto" and self.dtype == "bfloat16":
            self.screen_choice += " (native bf16 measured faster than the int8 screen: int8 not tried)"
        self.screen_speed_ms: dict[str, float] = {}
        self.refine_top = refine_top if (sort and self.screen != "float32") else 0
        self.refine_margin = refine_margin
        try:
            self.ce = CrossEncoder(self.resolved.path, device=self.device, max_length=max_length)
        except Exception as e:
            raise ModelError(f"could not load reranker {model!r} from {self.resolved.path}: {e}") from e
        if self.ce.num_labels != 1:
            raise ModelError(
                f"reranker {model!r} has {self.ce.num_labels} labels: a reranker needs exactly one"
            )
        self.model = self.ce.model.eval()
        self.tokenizer = self.ce.tokenizer
        self.activation = self.ce.activation_fn
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        hidden = int(getattr(self.model.config, "hidden_size", 0) or 0)
        self._quadratic = 1.0 / (6 * hidden) if hidden else 0.0  # attention vs dense work per token
        self.names = tuple(
            n
            for n in ("input_ids", "attention_mask", "token_type_ids")
            if n in self.tokenizer.model_input_names
        )
        self._lock = threading.Lock()  # one forward pass at a time per replica
        self.last_timings: dict[str, float] = {}
        logits = _seq_cls_logits
        self._fast: Any
        self._exact: Any = None  # the fp32 engine of the refine step
        if self.runtime == "openvino":
            float_p = "bf16" if self.dtype == "bfloat16" else "f32"
            precisions = (["int8"] if try_int8 else []) + ([float_p] if screen != "int8" else [])
            if (self.refine_top or try_int8) and "f32" not in precisions:
                precisions.append("f32")
            try:
                ov = OpenVINOEngine(
                    self.model,
                    model_dir=self.resolved.path,
                    kind="seqcls",
                    names=self.names,
                    fn=logits,
                    cache_dir=cache_dir,
                    precisions=precisions,
                    threads=self.threads,
                    calibration=self._calibration_sample,
                    calibration_key=CALIBRATION_KEY,
                    prebuilt_dir=ir_dir,
                )
            except ConfigError:
                raise
            except Exception as e:
                raise ModelError(
                    f"could not run reranker {model!r} on OpenVINO: {e}; use runtime=torch"
                ) from e
            self.engine: Any = ov
            if screen == "auto" and try_int8:
                self.refine_top = refine_top  # the comparison is screen + the same fp32 refine
                self._exact = lambda feeds: ov(feeds, "f32")
                speed = ov.cached_timing(
                    f"demo request 4x32, refine {refine_top} +{refine_margin}, int8 vs {float_p}",
                    lambda: self._time_screens(ov, ["int8", float_p]),
                )
                self.screen_speed_ms = speed
                self.screen = "int8" if speed["int8"] < speed[float_p] else self.dtype
                self.screen_choice = (
                    f"rerank_screen=auto -> {self.screen}: a 4x32-pair demo request (screen + fp32 refine) "
                    f"takes int8 {speed['int8']} ms, {float_p} {speed[float_p]} ms here (measured once, "
                    "cached with the IR)"
                )
                if self.screen == "int8" and float_p != "f32":
                    ov.drop(float_p)
                elif self.screen != "int8":
                    ov.drop("int8")
                self.refine_top = refine_top if self.screen != "float32" else 0
            if self.screen == "int8" and not self.refine_top:
                log.warning("rerank_screen=int8 with rerank_refine_top=0: the int8 scores are final")
            screen_p = "int8" if self.screen == "int8" else float_p
            self._fast = lambda feeds: ov(feeds, screen_p)
            if self.refine_top:
                self._exact = lambda feeds: ov(feeds, "f32")
        else:
            if self.refine_top:  # bf16/fp16 copy for the screen, the fp32 original for the refine step
                self._exact = TorchEngine(self.model, device=self.device, dtype="float32", fn=logits)
                self._fast = TorchEngine(
                    copy.deepcopy(self.model), device=self.device, dtype=self.dtype, fn=logits
                )
            else:
                self._fast = TorchEngine(self.model, device=self.device, dtype=self.dtype, fn=logits)
            self.engine = self._fast

    def info(self) -> dict[str, Any]:
        return {
            "backend": "cross-encoder",
            "model": self.resolved.requested,
            "revision": model_revision(self.resolved.path),
            "source": self.resolved.source,
            "device": self.device,
            "dtype": self.dtype,
            "screen": self.screen,
            "screen_choice": self.screen_choice,
            "screen_speed_ms": self.screen_speed_ms or None,
            "runtime": self.runtime,
            "threads": self.threads,
            "refine": (
                f"float32 rescoring of each query's top {self.refine_top} (+{self.refine_margin} logits)"
                if self.refine_top
                else None
            ),
            "refine_top": self.refine_top,
            "refine_margin": self.refine_margin,
            "sorted": self.sort,
            "batch_size": self.batch_size,
            "token_budget": self.token_budget if self.sort else None,
            "trained": self.resolved.trained,
            "max_length": self.max_length,
        }

    def _calibration_sample(self) -> list[dict[str, Any]]:
        """The int8 calibration sample: (query, passage) pairs from the stdlib demo corpus (``rag ingest
        --demo``), never evaluation data. Every 20th of the first 1280 docstrings (64); each one's first 12
        words are a query, paired with its own docstring and with another one; 16 padded batches of 8."""
        from rag.accel import pad_batch

        docs = _demo_docs()
        pairs: list[Pair] = []
        for i, d in enumerate(docs):
            q = _demo_query(d)
            pairs += [(q, d), (q, docs[(7 * i + 3) % len(docs)])]
        feats = self._tokenize(pairs)
        out = []
        for lo in range(0, len(pairs), 8):
            rows = list(range(lo, min(lo + 8, len(pairs))))
            ids, mask = pad_batch(feats["input_ids"], rows, self.pad_id)
            f = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in feats:
                f["token_type_ids"] = pad_batch(feats["token_type_ids"], rows, 0)[0]
            out.append(f)
        return out

    def _time_screens(self, ov: Any, precisions: Sequence[str]) -> dict[str, float]:
        """Best-of-2 milliseconds of one demo-corpus request (4 queries x 32 passages), the screen in each of
        ``precisions`` followed by the fp32 refine: what ``rerank_screen=auto`` compares."""
        docs = _demo_docs()
        pairs = [
            (_demo_query(docs[16 * q]), docs[(16 * q + j) % len(docs)]) for q in range(4) for j in range(32)
        ]
        out: dict[str, float] = {}
        for p in precisions:
            self._fast = lambda feeds, p=p: ov(feeds, p)
            self.score(pairs)  # warm-up
            ts = []
            for _ in range(2):
                t = time.perf_counter()
                self.score(pairs)
                ts.append((time.perf_counter() - t) * 1e3)
            out[p] = round(min(ts), 1)
        return out

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Pair indices grouped into forward passes (see ``rag.accel.pack_batches``)."""
        from rag.accel import pack_batches

        if not self.sort:
            return pack_batches(lengths, self.token_budget, max_batch=self.batch_size, sort=False)
        return pack_batches(lengths, self.token_budget, quadratic=self._quadratic)

    def _tokenize(self, pairs: Sequence[Pair]) -> dict[str, list[list[int]]]:
        enc = self.tokenizer(
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            truncation="longest_first",
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
        )
        return {k: enc[k] for k in self.names if k != "attention_mask"}

    def _run(
        self, engine: Any, feats: dict[str, list[list[int]]], idx: Sequence[int], out: np.ndarray
    ) -> tuple[int, int]:
        """Score pairs ``idx`` (logits into ``out``); returns (forward passes, padded tokens)."""
        from rag.accel import pad_batch

        ids = feats["input_ids"]
        lengths = [len(ids[i]) for i in idx]
        batches = self._batches(lengths)
        padded = 0
        for b in batches:
            rows = [idx[j] for j in b]
            x, mask = pad_batch(ids, rows, self.pad_id)
            feeds = {"input_ids": x, "attention_mask": mask}
            if "token_type_ids" in feats:
                feeds["token_type_ids"] = pad_batch(feats["token_type_ids"], rows, 0)[0]
            out[rows] = engine(feeds).reshape(len(rows), -1)[:, 0]
            padded += x.size
        return len(batches), padded

    def _refine(
        self, engine: Any, feats: dict, queries: Sequence[str], fast: np.ndarray
    ) -> tuple[np.ndarray, int, int, int]:
        """fp32 rescoring of each query's head: (logits, pairs rescored, forward passes, padded tokens).

        Round 1 rescores, per query, the ``refine_top`` best pairs by the fast pass and any pair within
        ``refine_margin`` logits of the last of them. The largest fast-vs-fp32 error seen so far, ``e``, then
        bounds the fast scores of the rest: while a pair not yet rescored has ``fast + 2e`` at or above its
        query's ``refine_top``-th fp32 score, it could still belong to the head, so it is rescored too.
        """
        groups: dict[str, list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault(q, []).append(i)
        exact = fast.copy()
        done = np.zeros(len(fast), dtype=bool)
        todo: list[int] = []
        for idx in groups.values():
            k = min(self.refine_top, len(idx))
            kth = np.sort(fast[idx])[::-1][k - 1]
            todo.extend(i for i in idx if fast[i] >= kth - self.refine_margin)
        passes = padded = 0
        for _ in range(8):  # converges in one or two rounds; bounded all the same
            if not todo:
                break
            todo.sort()
            p, pad = self._run(engine, feats, todo, exact)
            passes, padded = passes + p, padded + pad
            done[todo] = True
            err = float(np.max(np.abs(exact[done] - fast[done])))
            todo = []
            for idx in groups.values():
                k = min(self.refine_top, len(idx))
                ii = np.asarray(idx)
                kth = np.sort(exact[ii[done[ii]]])[::-1][k - 1]
                todo.extend(int(i) for i in ii[~done[ii]] if fast[i] + 2 * err >= kth)
        return exact, int(done.sum()), passes, padded

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        scores, self.last_timings = self.score_timed(pairs)
        return scores

    def score_timed(self, pairs: Sequence[Pair]) -> tuple[list[float], dict[str, float]]:
        """``score`` plus this call's timings (thread-safe, unlike reading ``last_timings`` afterwards).

        Tokenization runs outside the model lock: concurrent callers (a Serve replica with
        ``max_concurrent_batches=2``) tokenize the next batch while the current one is on the model.
        """
        if not pairs:
            return [], {}
        validate_pairs(pairs)
        import torch

        t0 = time.perf_counter()
        # identical pairs (the same document twice, or two batched requests for one query) are scored once
        slot: dict[tuple[str, str], int] = {}
        where = [slot.setdefault((p[0], p[1]), len(slot)) for p in pairs]
        uniq = list(slot)
        feats = self._tokenize(uniq)
        t1 = time.perf_counter()
        logits = np.zeros(len(uniq), dtype=np.float32)
        refined = 0
        try:
            with self._lock:
                passes, padded = self._run(self._fast, feats, range(len(uniq)), logits)
                t2 = time.perf_counter()
                if self.refine_top:
                    logits, refined, p2, pad2 = self._refine(self._exact, feats, [u[0] for u in uniq], logits)
                    passes, padded = passes + p2, padded + pad2
        except RuntimeError as e:  # CUDA OOM, bad shapes, OpenVINO errors...
            raise RerankerError(f"reranker forward pass failed: {e}") from e
        t3 = time.perf_counter()
        with torch.inference_mode():
            scores = self.activation(torch.from_numpy(logits)).tolist()
        timings = {
            "tokenize_ms": (t1 - t0) * 1e3,
            "inference_ms": (t3 - t1) * 1e3,
            "refine_ms": (t3 - t2) * 1e3 if self.refine_top else 0.0,
            "pairs": len(pairs),
            "unique_pairs": len(uniq),
            "refined_pairs": refined,
            "forward_passes": passes,
            "tokens": sum(len(x) for x in feats["input_ids"]),
            "padded_tokens": padded,
        }
        return [float(scores[w]) for w in where], timings


SCREENS = ("auto", "fp32", "bf16", "int8")
# keys the cached int8 IR (with rag.accel's _INT8_VERSION): the sample is a function of the stdlib's version
CALIBRATION_KEY = f"demo64x2-py{sys.version_info.major}{sys.version_info.minor}"


def _demo_docs() -> list[str]:
    """64 stdlib docstrings (every 20th of the demo corpus' first 1280): the int8 calibration text."""
    from rag.ingest import iter_demo

    return [d.content for d in list(iter_demo(limit=1280))[::20]][:64]


def _demo_query(doc: str) -> str:
    return " ".join(doc.split("\n\n", 1)[-1].split()[:12])  # a docstring's first 12 words


def model_revision(path: str) -> str:
    """The model's revision: the hub snapshot's commit, else a hash of the model files' names, sizes and
    modification times (a local folder or the stand-in)."""
    import hashlib
    from pathlib import Path

    p = Path(path)
    if p.parent.name == "snapshots":
        return p.name
    h = hashlib.sha256(str(p.resolve()).encode())
    try:
        for f in sorted(p.iterdir()):
            if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".txt"}:
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    except OSError:
        pass
    return h.hexdigest()[:16]


def _seq_cls_logits(model: Any, feeds: dict) -> Any:
    return model(**feeds).logits


class CohereReranker:
    """Cohere Rerank v2 (``cohere.ClientV2``). Pairs are grouped by query: one API call per query."""

    enabled = True

    def __init__(
        self,
        *,
        api_key: str | None,
        model: str = "rerank-v3.5",
        base_url: str | None = None,
        timeout_s: float = 10.0,
        max_retries: int = 2,
    ) -> None:
        if not api_key:
            raise ConfigError(
                "the cohere reranker needs an API key: set CO_API_KEY (or RAG_COHERE_API_KEY), "
                "or choose another backend with RAG_RERANKER=cross-encoder"
            )
        import cohere

        self.model = model
        self.base_url = base_url
        self.max_retries = max_retries
        self.client = cohere.ClientV2(api_key=api_key, base_url=base_url, timeout=timeout_s)

    def info(self) -> dict[str, Any]:
        return {
            "backend": "cohere",
            "model": self.model,
            "device": "remote",
            "dtype": None,
            "trained": True,
            "base_url": self.base_url,
            "revision": None,
        }

    def _rerank(self, query: str, docs: list[str]) -> list[float]:
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                resp = self.client.rerank(model=self.model, query=query, documents=docs, top_n=len(docs))
                scores = [0.0] * len(docs)
                for r in resp.results:
                    scores[r.index] = float(r.relevance_score)
                return scores
            except Exception as e:
                last = e
                status = getattr(e, "status_code", None)
                if status is not None and 400 <= status < 500 and status != 429:
                    break  # a client error will not succeed on retry
                time.sleep(min(2.0, 0.2 * 2**attempt))
        raise RerankerError(f"Cohere rerank failed ({self.base_url or 'api.cohere.com'}): {last}") from last

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        validate_pairs(pairs)
        groups: dict[str, list[int]] = {}
        for i, (q, _) in enumerate(pairs):
            groups.setdefault(q, []).append(i)
        scores = [0.0] * len(pairs)
        for q, idx in groups.items():
            for i, s in zip(idx, self._rerank(q, [pairs[i][1] for i in idx]), strict=True):
                scores[i] = s
        return scores


def make_reranker(cfg: RerankerConfig | Settings) -> Reranker:
    """The reranker the configuration asks for: the one factory (library, CLI, Reranker deployment)."""
    c: Any = cfg
    if c.reranker == "none":
        return NoReranker()
    if c.reranker == "cohere":
        key = c.cohere_api_key.get_secret_value() if c.cohere_api_key else None
        return CohereReranker(
            api_key=key,
            model=c.cohere_model,
            base_url=c.cohere_base_url,
            timeout_s=c.cohere_timeout_s,
            max_retries=c.cohere_max_retries,
        )
    return CrossEncoderReranker(
        c.rerank_model,
        cache_dir=c.model_cache,
        device=c.rerank_device,
        dtype=c.rerank_dtype,
        max_length=c.rerank_max_length,
        batch_size=c.rerank_batch_size,
        token_budget=c.rerank_token_budget,
        threads=c.rerank_threads,
        offline=c.offline,
        runtime=c.rerank_runtime,
        refine_top=c.rerank_refine_top,
        refine_margin=c.rerank_refine_margin,
        screen=c.rerank_screen,
        ir_dir=c.rerank_ir_dir,
    )
