"""Load and figures for the tiers that inject faults into a live app (imported as ``traffic``).

Used by the chaos tier (tests/test_chaos.py: replica kills, a database outage) and the multinode tier
(tests/test_multinode.py: a node killed, a rolling update): open-loop /search traffic, what each caller got,
what callers got while a fault lasted and how long until answers were normal again, and the report both tiers
write under pytest's basetemp.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from helpers import QUERIES

__all__ = [
    "EVERY_S",
    "SLOW_S",
    "Answer",
    "Load",
    "assert_no_bugs",
    "figures",
    "kinds",
    "recovered",
    "write_report",
]

SLOW_S = 5.0  # an answer slower than this waited for a timeout or a new replica, not "at once"
EVERY_S = 0.4  # light load: 2.5 searches a second


@dataclass
class Answer:
    start: float
    end: float
    status: int  # 0: no HTTP answer (transport error)
    kind: str  # "reranked", "dense:<reason>", "<status>:<error_type>", "transport:<exc>"
    retry_after: str | None = None
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Load:
    """Open-loop load: a /search every ``every_s`` seconds, each on its own thread, until stopped; spread
    round-robin over ``urls`` (the entry points a load balancer would use).

    Open loop, so a fault that makes requests wait shows up as many waiting requests, not as one per client.
    ``sent`` counts the requests sent; after the block each has exactly one answer (HTTP, or a transport
    error as status 0)."""

    def __init__(self, *urls: str, every_s: float = EVERY_S) -> None:
        self.urls, self.every_s = urls, every_s
        self.answers: list[Answer] = []
        self.sent = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Load:
        self._pool = ThreadPoolExecutor(max_workers=96)
        self._client = httpx.Client(timeout=90, limits=httpx.Limits(max_connections=96))
        t = threading.Thread(target=self._dispatch, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        self._pool.shutdown(wait=True)
        self._client.close()

    def _dispatch(self) -> None:
        n = 0
        while not self._stop.is_set():
            self._pool.submit(self._one, self.urls[n % len(self.urls)], QUERIES[n % len(QUERIES)])
            n += 1
            self.sent = n
            self._stop.wait(self.every_s)

    def _one(self, url: str, q: str) -> None:
        t0 = time.monotonic()
        try:
            r = self._client.post(url + "/search", json={"query": q})
        except httpx.TransportError as e:
            self.answers.append(Answer(t0, time.monotonic(), 0, f"transport:{type(e).__name__}"))
            return
        t1 = time.monotonic()
        if r.status_code == 200:
            rr = r.json()["reranker"]
            kind = "reranked" if rr["reranked"] else f"dense:{rr['reason']}"
            self.answers.append(Answer(t0, t1, 200, kind, error=rr.get("detail") or ""))
            return
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text[:200], "error_type": "not_json"}
        self.answers.append(
            Answer(
                t0,
                t1,
                r.status_code,
                f"{r.status_code}:{body.get('error_type')}",
                r.headers.get("retry-after"),
                str(body.get("error")),
            )
        )

    def wait_until(self, pred: Callable[[list[Answer]], bool], timeout_s: float) -> bool:
        """Until ``pred(answers)`` is true (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pred(list(self.answers)):
                return True
            time.sleep(0.2)
        return False


def recovered(after: float, n: int = 4) -> Callable[[list[Answer]], bool]:
    """The last ``n`` answers started after ``after`` are all reranked 200s."""

    def pred(answers: list[Answer]) -> bool:
        tail = sorted((a for a in answers if a.start > after), key=lambda a: a.start)[-n:]
        return len(tail) == n and all(a.kind == "reranked" for a in tail)

    return pred


def kinds(answers: list[Answer]) -> dict[str, int]:
    """How many answers of each kind ("reranked", "dense:<reason>", "503:unavailable", ...)."""
    out: dict[str, int] = {}
    for a in answers:
        out[a.kind] = out.get(a.kind, 0) + 1
    return dict(sorted(out.items()))


def figures(answers: list[Answer], fault_at: float) -> dict[str, Any]:
    """What callers got from the fault until the app answered normally again, and how long that lasted.

    Normal: a reranked 200 within ``SLOW_S``. The fault lasts (for callers) until the first normal answer
    started after it; a slower one waited for a timeout or for a new replica, which to its caller is the
    fault too. Slow answers that started later are a new replica warming up (``slow_after``)."""
    # requests in flight at the fault (started within a second before it) and all later ones
    after = sorted((a for a in answers if a.end > fault_at and a.start > fault_at - 1), key=lambda a: a.start)

    def normal(a: Answer) -> bool:
        return a.kind == "reranked" and a.seconds < SLOW_S

    ends = [a.start for a in after if a.start > fault_at and normal(a)]
    fault_end = ends[0] if ends else float("inf")
    during = [a for a in after if a.start < fault_end]
    bad = [a for a in during if not normal(a)]
    bad_kinds: dict[str, int] = {}
    for a in bad:
        k = a.kind + (" (slow)" if a.seconds >= SLOW_S else "")
        bad_kinds[k] = bad_kinds.get(k, 0) + 1
    later = [a for a in after if a.start >= fault_end]
    return {
        "answers": len(during),
        "abnormal": len(bad),
        "kinds": bad_kinds,
        "slowest_s": round(max((a.seconds for a in during), default=0.0), 2),
        "slow": sum(a.seconds >= SLOW_S for a in during),
        "recovery_s": round(max((a.end for a in bad), default=fault_at) - fault_at, 2),
        "slow_after": sum(a.seconds >= SLOW_S or a.kind != "reranked" for a in later),
        "slowest_after_s": round(max((a.seconds for a in later), default=0.0), 2),
        "raw": [(round(a.start - fault_at, 2), round(a.seconds, 2), a.kind) for a in after],
    }


def assert_no_bugs(answers: list[Answer]) -> None:
    """No 500, no non-JSON answer, no dropped connection: every failure is a typed, retryable answer."""
    bugs = [a for a in answers if a.status == 0 or (a.status >= 500 and a.status != 503)]
    assert not bugs, [(a.kind, a.error) for a in bugs]
    for a in answers:
        if a.status == 503:
            assert a.retry_after is not None, a


def write_report(
    report: dict[str, dict[str, Any]], path: Path, title: str, config: Any = None, extra: str = ""
) -> None:
    """The figures as JSON at ``path`` and on the terminal (``raw`` left out; then ``extra``): through
    pytest's terminal reporter when ``config`` is given (its capture would swallow a print to stderr)."""
    if not report:
        return
    path.write_text(json.dumps(report, indent=1, sort_keys=True))
    lines = ["", f"{title} (also in {path}):"]
    for name, r in report.items():
        lines.append(f"  {name}: {json.dumps({k: v for k, v in r.items() if k != 'raw'}, sort_keys=True)}")
    if extra:
        lines.append(extra)
    tr = config.pluginmanager.get_plugin("terminalreporter") if config is not None else None
    if tr is None:
        print("\n".join(lines), file=sys.__stderr__)
        return
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        tr.ensure_newline()
        for line in lines:
            tr.write_line(line)
