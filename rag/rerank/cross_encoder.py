"""The cross-encoder backend: a sentence-transformers ``CrossEncoder`` with a fast path.

Two configurations:

- ``sort=False, dtype="float32"``: exactly ``CrossEncoder.predict`` (PyTorch, fp32, ``batch_size`` pairs per
  forward pass in input order). The parity reference.
- default (``sort=True``, ``dtype="auto"``): pairs are tokenized once (one fast-tokenizer batch call),
  identical pairs scored once, sorted by token length and packed into forward passes of at most
  ``token_budget`` padded tokens. Every pair is scored by the screen (``rag.rerank.screen``: bf16 where the
  CPU has it, fp16 on CUDA, int8 where it measures faster); then, per query, the best ``refine_top`` pairs
  and any pair within ``refine_margin`` logits of the last of them are scored again in fp32, so the head of
  each ranking is the fp32 one (bf16 alone reorders close scores: about 84% of top-8 positions match fp32 on
  Cranfield). ``runtime="auto"`` runs the model on OpenVINO when it is installed (CPU), else on PyTorch.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rag.errors import ConfigError, ModelError, RerankerError
from rag.rerank.base import Scores, ScoreTimings, refuse_instructions
from rag.rerank.screen import CALIBRATION_KEY, calibration_pairs, plan_screen, timing_pairs
from rag.validation import Pair, validate_pairs

__all__ = ["CrossEncoderReranker", "model_revision"]

log = logging.getLogger(__name__)

Engine = Callable[[dict[str, np.ndarray]], np.ndarray]  # feeds -> logits


class CrossEncoderReranker:
    """sentence-transformers cross-encoder: sorted, budgeted, screened and refined (module docstring)."""

    enabled = True
    default_instruction = None  # a cross-encoder takes no instruction

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
        from rag.accel import nncf_available, pick_device, pick_dtype, pick_runtime, resolve_threads
        from rag.models import resolve_cross_encoder

        self.resolved = resolve_cross_encoder(model, cache_dir=Path(cache_dir), offline=offline)
        self.device = pick_device(device)
        self.dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(screen) or pick_dtype(dtype, self.device)
        self.max_length, self.batch_size, self.token_budget, self.sort = (
            max_length,
            batch_size,
            token_budget,
            sort,
        )
        self.threads = resolve_threads(threads) if self.device == "cpu" else threads
        # the parity configuration (sort=False) is plain PyTorch; the fast path picks its runtime
        self.runtime = pick_runtime(runtime, self.device, self.dtype) if sort else "torch"
        self.plan = plan_screen(
            screen=screen,
            requested_dtype=dtype,
            dtype=self.dtype,
            device=self.device,
            sort=sort,
            runtime=self.runtime,
            refine_top=refine_top,
            nncf=nncf_available(),
        )
        self.refine_margin = refine_margin
        self.screen_speed_ms: dict[str, float] = {}
        self._load(model)
        self._lock = threading.Lock()  # one forward pass at a time per replica
        self._exact: Engine | None = None  # the fp32 engine of the refine step
        self.engine: Any  # the screen's runtime engine: rag.ov_engine.OpenVINOEngine or rag.accel.TorchEngine
        if self.runtime == "openvino":
            self._fast = self._openvino(model, Path(cache_dir), ir_dir, refine_top)
        else:
            self._fast = self._torch()
        if self.plan.screen == "int8" and not self.plan.refine_top:
            log.warning("rerank_screen=int8 with rerank_refine_top=0: the int8 scores are final")

    # -- construction steps --------------------------------------------------------------------------
    def _load(self, model: str) -> None:
        """The model, its tokenizer and the tokenizer's input names (one label: a reranker)."""
        import torch
        from sentence_transformers import CrossEncoder

        if self.device == "cpu":
            torch.set_num_threads(self.threads)
        try:
            self.ce = CrossEncoder(self.resolved.path, device=self.device, max_length=self.max_length)
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
        inputs = ("input_ids", "attention_mask", "token_type_ids")
        self.names = tuple(n for n in inputs if n in self.tokenizer.model_input_names)

    def _torch(self) -> Engine:
        """The screen in the chosen dtype and, when something is refined, the fp32 original beside it."""
        from rag.accel import TorchEngine

        model = copy.deepcopy(self.model) if self.plan.refine_top else self.model
        if self.plan.refine_top:
            self._exact = TorchEngine(self.model, device=self.device, dtype="float32", fn=_seq_cls_logits)
        self.engine = TorchEngine(model, device=self.device, dtype=self.dtype, fn=_seq_cls_logits)
        return self.engine

    def _openvino(self, model: str, cache_dir: Path, ir_dir: Any, refine_top: int) -> Engine:
        """The OpenVINO IRs the plan needs; with ``rerank_screen=auto`` and an int8 candidate, int8 is timed
        against the float screen once (cached with the IR) and the slower one is dropped."""
        from rag.ov_engine import OpenVINOEngine

        try:
            ov = OpenVINOEngine(
                self.model,
                model_dir=self.resolved.path,
                kind="seqcls",
                names=self.names,
                fn=_seq_cls_logits,
                cache_dir=cache_dir,
                precisions=self.plan.precisions(),
                threads=self.threads,
                calibration=self._calibration_sample,
                calibration_key=CALIBRATION_KEY,
                prebuilt_dir=ir_dir,
            )
        except ConfigError:
            raise
        except Exception as e:
            raise ModelError(f"could not run reranker {model!r} on OpenVINO: {e}; use runtime=torch") from e
        self.engine = ov
        self._exact = _precision(ov, "f32") if (self.plan.refine_top or self.plan.try_int8) else None
        fp = self.plan.float_precision
        if self.plan.needs_measurement:
            what = f"demo request 4x32, refine {refine_top} +{self.refine_margin}, int8 vs {fp}"
            self.screen_speed_ms = ov.cached_timing(what, lambda: self._time_screens(ov, ["int8", fp]))
            self.plan = self.plan.measured(self.screen_speed_ms, refine_top)
            if self.plan.screen == "int8" and fp != "f32":
                ov.drop(fp)
            elif self.plan.screen != "int8":
                ov.drop("int8")
        if not self.plan.refine_top:
            self._exact = None
        return _precision(ov, "int8" if self.plan.screen == "int8" else fp)

    def _calibration_sample(self) -> list[dict[str, Any]]:
        """The int8 calibration feeds: ``screen.calibration_pairs`` in 16 padded batches of 8."""
        from rag.accel import pad_batch

        pairs = calibration_pairs()
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
        """Best-of-2 milliseconds of the demo request, the screen in each of ``precisions`` followed by the
        fp32 refine: what ``rerank_screen=auto`` compares."""
        pairs = timing_pairs()
        out: dict[str, float] = {}
        for p in precisions:
            self._fast = _precision(ov, p)
            self.score(pairs)  # warm-up
            ts = []
            for _ in range(2):
                t = time.perf_counter()
                self.score(pairs)
                ts.append((time.perf_counter() - t) * 1e3)
            out[p] = round(min(ts), 1)
        return out

    # -- what it is ----------------------------------------------------------------------------------
    @property
    def screen(self) -> str:
        return self.plan.screen

    @property
    def refine_top(self) -> int:
        return self.plan.refine_top

    def info(self) -> dict[str, Any]:
        return {
            "backend": "cross-encoder",
            "model": self.resolved.requested,
            "revision": model_revision(self.resolved.path),
            "source": self.resolved.source,
            "device": self.device,
            "dtype": self.dtype,
            "screen": self.screen,
            "screen_choice": self.plan.choice,
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

    # -- scoring -------------------------------------------------------------------------------------
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
        self, engine: Engine, feats: dict[str, list[list[int]]], idx: Sequence[int], out: np.ndarray
    ) -> tuple[int, int]:
        """Score pairs ``idx`` (logits into ``out``); returns (forward passes, padded tokens)."""
        from rag.accel import pad_batch

        ids = feats["input_ids"]
        batches = self._batches([len(ids[i]) for i in idx])
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
        self, engine: Engine, feats: dict[str, list[list[int]]], queries: Sequence[str], fast: np.ndarray
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

    def pair_overhead(self, instruction: str | None) -> int:
        return int(self.tokenizer.num_special_tokens_to_add(pair=True))

    def score(self, pairs: Sequence[Pair], instructions: Sequence[str | None] | None = None) -> Scores:
        """One score per pair, and this call's timings (thread-safe).

        Tokenization runs outside the model lock: concurrent callers (a Serve replica with
        ``max_concurrent_batches=2``) tokenize the next batch while the current one is on the model.
        """
        refuse_instructions("cross-encoder", instructions)
        pairs = validate_pairs(pairs)
        if not pairs:
            return Scores()
        import torch

        t0 = time.perf_counter()
        # identical pairs (the same document twice, or two batched requests for one query) are scored once
        slot: dict[Pair, int] = {}
        where = [slot.setdefault(p, len(slot)) for p in pairs]
        uniq = list(slot)
        feats = self._tokenize(uniq)
        t1 = time.perf_counter()
        logits = np.zeros(len(uniq), dtype=np.float32)
        refined = 0
        t2 = t1
        try:
            with self._lock:
                passes, padded = self._run(self._fast, feats, range(len(uniq)), logits)
                t2 = time.perf_counter()
                if self.refine_top and self._exact is not None:
                    logits, refined, p2, pad2 = self._refine(self._exact, feats, [u[0] for u in uniq], logits)
                    passes, padded = passes + p2, padded + pad2
        except RuntimeError as e:  # CUDA OOM, bad shapes, OpenVINO errors...
            raise RerankerError(f"reranker forward pass failed: {e}") from e
        t3 = time.perf_counter()
        with torch.inference_mode():
            scores = self.activation(torch.from_numpy(logits)).tolist()
        timings = ScoreTimings(
            tokenize_ms=(t1 - t0) * 1e3,
            inference_ms=(t3 - t1) * 1e3,
            refine_ms=(t3 - t2) * 1e3 if self.refine_top else 0.0,
            pairs=len(pairs),
            unique_pairs=len(uniq),
            refined_pairs=refined,
            forward_passes=passes,
            tokens=sum(len(x) for x in feats["input_ids"]),
            padded_tokens=padded,
        )
        return Scores((scores[w] for w in where), timings)


def model_revision(path: str) -> str:
    """The model's revision: the hub snapshot's commit, else a hash of the model files' names, sizes and
    modification times (a local folder or the stand-in)."""
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


def _precision(ov: Any, precision: str) -> Engine:
    """``ov`` (an OpenVINOEngine) in one of its compiled precisions."""

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        result: np.ndarray = ov(feeds, precision)
        return result

    return run
