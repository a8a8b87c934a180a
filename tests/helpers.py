"""Helpers shared by the test modules (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import copy
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# Questions the stdlib demo corpus can answer: serve-tier traffic.
QUERIES = [
    "how do I parse a date from a string",
    "open a file and read its lines",
    "thread synchronization with a lock",
    "compress data with gzip",
    "sort a list in place",
    "join path components",
    "send an email message",
    "generate random numbers",
]
TEST_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def ingest_demo(store: Any, embedder: Any, prefix: str, limit: int, chars: int = 300) -> str:
    """A new collection of ``limit`` short stdlib docstrings (the first ``chars`` of each), via rag.ingest."""
    import uuid

    from rag.ingest import Document, ingest, iter_demo

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    docs = [Document(d.doc_id, d.content[:chars], d.source, d.metadata) for d in iter_demo(limit=limit)]
    ingest(docs, embedder=embedder, store=store, collection=name, chunk_tokens=96)
    return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_cluster(
    namespace: str, *, metrics_port: int | None = None, log_to_driver: bool = False
) -> Iterator[int]:
    """A local single-node Ray for one test module (never someone else's cluster); yields its metrics port.

    Shut down (Serve first) when the block ends, so two modules' clusters never meet in one session."""
    import ray
    from ray import serve

    port = metrics_port or free_port()
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        namespace=namespace,
        _metrics_export_port=port,
        log_to_driver=log_to_driver,
        runtime_env={"env_vars": dict(TEST_ENV)},
    )
    try:
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def cpu_app_config(db_url: str, state_dir: Path, collection: str, **args: Any) -> dict[str, Any]:
    """serve_config.cpu.yaml for tests on this machine: the test database, models offline, 0.5 CPU each."""
    from deployments.launch import CPU_CONFIG

    cfg = yaml.safe_load(CPU_CONFIG.read_text())
    app = cfg["applications"][0]
    app["args"].update(
        {
            "database_url": db_url,
            "data_dir": str(state_dir),
            "collection": collection,
            "offline": True,
            **args,
        }
    )
    app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(HF_HUB_OFFLINE="1")
    for d in app["deployments"]:
        d.setdefault("ray_actor_options", {})["num_cpus"] = 0.5
    return copy.deepcopy(cfg)


def wait_ready(url: str, timeout_s: float = 180) -> None:
    """Until GET /readyz answers 200."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = httpx.get(url + "/readyz", timeout=30)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.TransportError as e:
            last = str(e)
        assert time.monotonic() < deadline, f"{url} not ready after {timeout_s:.0f}s: {last}"
        time.sleep(0.5)


@contextlib.contextmanager
def in_process_batching(*deployment_classes: type) -> Iterator[None]:
    """Run Serve deployment classes in this process (``@serve.batch`` methods included) for a test.

    A ``@serve.batch`` method keeps its queue and knobs in its decorator's closure, shared by the class: once
    used here, the queue (an asyncio object) would make the class unpicklable for a later ``.bind()``. On
    exit the queues are dropped and the knobs restored, so the classes are as imported."""
    from ray.serve import batching

    wrappers, seen = [], set()

    def visit(fn: Any) -> None:
        if id(fn) in seen:
            return
        seen.add(id(fn))
        for cell in getattr(fn, "__closure__", None) or ():
            obj = cell.cell_contents
            if isinstance(obj, batching._LazyBatchQueueWrapper):
                wrappers.append((obj, obj.max_batch_size, obj.batch_wait_timeout_s))
            elif callable(obj):
                visit(obj)
        visit(getattr(fn, "__wrapped__", None))

    for cls in deployment_classes:
        for fn in vars(cls).values():
            visit(fn)
    # (the Reranker has none: its batch queues are made per instance, one per model, and need no restoring)
    try:
        yield
    finally:
        for w, size, wait in wrappers:
            w._queue, w.max_batch_size, w.batch_wait_timeout_s = None, size, wait
