"""The cross-encoder's screen: the precision every pair is scored in before each query's head is rescored in
fp32 (``CrossEncoderReranker``'s refine).

``plan_screen`` decides from the settings and the hardware, before any model loads: the float dtype, whether
the screen is int8 or that dtype, whether int8 must first be measured against it (``rerank_screen=auto``),
and how many pairs per query the fp32 refine rescores. ``ScreenPlan.measured`` applies the measurement.

The int8 screen is an NNCF post-training-quantized copy of the OpenVINO IR, calibrated once on (query,
passage) pairs of the stdlib demo corpus (``calibration_pairs``; never evaluation data) and cached next to
the IR; ``timing_pairs`` is the demo request the auto choice times (4 queries x 32 passages).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from rag.errors import ConfigError
from rag.validation import Pair

__all__ = [
    "CALIBRATION_KEY",
    "SCREENS",
    "ScreenPlan",
    "calibration_pairs",
    "plan_screen",
    "timing_pairs",
]

SCREENS = ("auto", "fp32", "bf16", "int8")
# keys the cached int8 IR (with rag.ov_engine.INT8_VERSION): the sample is a function of the stdlib's version
CALIBRATION_KEY = f"demo64x2-py{sys.version_info.major}{sys.version_info.minor}"


@dataclass(frozen=True)
class ScreenPlan:
    """The screen decision. ``screen`` is ``"int8"`` or the float ``dtype``; ``try_int8``: an OpenVINO int8
    copy is built (the screen itself, or the candidate that ``measured`` compares); ``refine_top``: pairs per
    query rescored in fp32 (0: the screen's scores are final)."""

    requested: str  # the rerank_screen setting
    dtype: str
    screen: str
    try_int8: bool
    refine_top: int
    choice: str  # the decision in words (GET /info's screen_choice)

    @property
    def float_precision(self) -> str:
        """The OpenVINO precision of the float screen."""
        return "bf16" if self.dtype == "bfloat16" else "f32"

    @property
    def needs_measurement(self) -> bool:
        """``rerank_screen=auto`` with an int8 candidate: time it against the float screen first."""
        return self.try_int8 and self.requested == "auto"

    def precisions(self) -> list[str]:
        """The OpenVINO IR precisions to build: int8 when tried, the float screen unless int8 was asked
        for, and f32 whenever anything is rescored in it."""
        fp = [self.float_precision] if self.requested != "int8" else []
        out = (["int8"] if self.try_int8 else []) + fp
        if (self.refine_top or self.try_int8) and "f32" not in out:
            out.append("f32")
        return out

    def measured(self, speed_ms: dict[str, float], refine_top: int) -> ScreenPlan:
        """The auto choice once int8 and the float screen were timed (``speed_ms`` per precision)."""
        fp = self.float_precision
        screen = "int8" if speed_ms["int8"] < speed_ms[fp] else self.dtype
        choice = (
            f"rerank_screen=auto -> {screen}: a 4x32-pair demo request (screen + fp32 refine) takes int8 "
            f"{speed_ms['int8']} ms, {fp} {speed_ms[fp]} ms here (measured once, cached with the IR)"
        )
        return replace(
            self, screen=screen, refine_top=refine_top if screen != "float32" else 0, choice=choice
        )


def plan_screen(
    *,
    screen: str,
    requested_dtype: str,
    dtype: str,
    device: str,
    sort: bool,
    runtime: str,
    refine_top: int,
    nncf: bool,
) -> ScreenPlan:
    """The screen for these settings (``dtype``: the float dtype chosen for ``device`` from ``screen`` or
    ``requested_dtype``; ``runtime``: the runtime the fast path runs on; ``nncf``: NNCF is installed).
    ConfigError names the fix when the settings cannot work."""
    if screen not in SCREENS:
        raise ConfigError(f"rerank_screen must be one of {', '.join(SCREENS)}, got {screen!r}")
    if screen == "int8" and not (sort and device == "cpu" and runtime == "openvino"):
        raise ConfigError(
            "rerank_screen=int8 runs on OpenVINO on the CPU with the sorted fast path: set "
            "RAG_RERANK_RUNTIME=openvino (or auto, with the openvino package installed) and "
            f"RAG_RERANK_DEVICE=cpu (now: runtime {runtime}, device {device}, sort {sort})"
        )
    # auto measures int8 only where it can win: the OpenVINO fast path on a CPU without native bf16 (with it,
    # bf16 won every measurement, docs/BENCHMARKS.md), and never with its scores final (refine_top > 0)
    measure = (
        screen == "auto"
        and requested_dtype == "auto"
        and refine_top > 0
        and sort
        and device == "cpu"
        and runtime == "openvino"
        and nncf
    )
    try_int8 = screen == "int8" or (measure and dtype == "float32")
    chosen = "int8" if screen == "int8" else dtype
    choice = f"rerank_screen={screen}" + ("" if screen != "auto" else f" -> {dtype}")
    if screen == "auto" and dtype == "bfloat16":
        choice += " (native bf16 measured faster than the int8 screen: int8 not tried)"
    refine = refine_top if (sort and chosen != "float32") or try_int8 else 0
    return ScreenPlan(screen, dtype, chosen, try_int8, refine, choice)


def _demo_docs() -> list[str]:
    """64 stdlib docstrings (every 20th of the demo corpus' first 1280): the int8 calibration text."""
    from rag.ingest import iter_demo

    return [d.content for d in list(iter_demo(limit=1280))[::20]][:64]


def _demo_query(doc: str) -> str:
    return " ".join(doc.split("\n\n", 1)[-1].split()[:12])  # a docstring's first 12 words


def calibration_pairs() -> list[Pair]:
    """The int8 calibration pairs: each demo docstring's first 12 words as a query, paired with its own
    docstring and with another one (128 pairs)."""
    docs = _demo_docs()
    pairs: list[Pair] = []
    for i, d in enumerate(docs):
        q = _demo_query(d)
        pairs += [(q, d), (q, docs[(7 * i + 3) % len(docs)])]
    return pairs


def timing_pairs() -> list[Pair]:
    """The demo request ``rerank_screen=auto`` times: 4 queries x 32 passages of the demo corpus."""
    docs = _demo_docs()
    return [(_demo_query(docs[16 * q]), docs[(16 * q + j) % len(docs)]) for q in range(4) for j in range(32)]
