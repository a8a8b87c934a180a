"""Chaos tier: faults injected into a live app (module-scoped Ray + Serve app, its own embedded PostgreSQL).

Each test starts light load (2.5 searches a second, open loop), injects one fault, and asserts what callers got while
it lasted and how fast the app recovered: a killed Reranker / Embedder / Retriever replica (``ray.kill`` on the
replica actor; Serve starts a new one), the database stopped for ~20 s and started again, a ``rag ingest``
SIGKILLed mid-write and re-run, and a client that hangs up mid-rerank.

The figures behind the "Failure modes" table of docs/serving.md are printed at the end of the module
(failed requests by kind while the fault lasts, the slowest answer, the recovery time).

The database is a pgserver instance of this module's own (stopping it must not hurt other modules).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import QUERIES, TEST_ENV, cpu_app_config, free_port, ingest_demo, ray_cluster, wait_ready
from traffic import SLOW_S, Answer, Load, assert_no_bugs, figures, recovered, write_report

pytestmark = [pytest.mark.serve, pytest.mark.chaos]

APP = "rag"
FETCH_K = 20
TOP_K = 5
IN_FLIGHT = 3  # requests that may be in flight when a fault strikes (and may wait for it)
REPORT: dict[str, dict[str, Any]] = {}


# --------------------------------------------------------------------------------------------------
# fixtures: a database of this module's own, a collection, the app
# --------------------------------------------------------------------------------------------------
class ChaosDB:
    """An embedded PostgreSQL that tests may stop and start again."""

    def __init__(self) -> None:
        import pgserver

        self.base = Path(tempfile.mkdtemp(prefix="rag-chaos-pg-"))
        self.base.chmod(0o755)
        self.srv = pgserver.get_server(self.base / "pgdata", cleanup_mode="delete")
        self.url = self.srv.get_uri()

    def stop(self) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.srv.pgdata, user=self.srv.system_user)

    def start(self) -> None:
        self.srv.ensure_postgres_running()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.start()  # cleanup expects a running server
        self.srv.cleanup()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def chaos_db():
    db = ChaosDB()
    yield db
    db.close()


@pytest.fixture(scope="module")
def chaos_store(chaos_db):
    from rag.store import Store

    s = Store(chaos_db.url, max_size=2)
    yield s
    with contextlib.suppress(Exception):
        s.close()


@pytest.fixture(scope="module")
def chaos_collection(chaos_store, embedder) -> str:
    return ingest_demo(chaos_store, embedder, "chaos", 120)


@pytest.fixture(scope="module")
def app_url(request, tmp_path_factory, chaos_db, state_dir, chaos_collection) -> str:
    from deployments.launch import deploy

    cfg = cpu_app_config(
        chaos_db.url,
        state_dir,
        chaos_collection,
        rerank_threads=1,
        fetch_k=FETCH_K,
        top_k=TOP_K,
        rerank_cache=False,
    )
    port = free_port()
    with ray_cluster("rag-chaos-tests", log_to_driver=False):
        deploy(cfg, host="127.0.0.1", port=port, wait=True, timeout_s=300)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield url
    write_report(
        REPORT, tmp_path_factory.getbasetemp() / "chaos-report.json", "chaos figures", request.config
    )


# --------------------------------------------------------------------------------------------------
# load, faults, figures
# --------------------------------------------------------------------------------------------------
def replica_names(deployment: str) -> dict[str, str]:
    """Names -> namespaces of ``deployment``'s replica actors (``SERVE_REPLICA::rag#<deployment>#<id>``)."""
    import ray

    return {
        a["name"]: a["namespace"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#")
    }


def kill_replica_under_load(url: str, deployment: str, name: str) -> tuple[list[Answer], dict[str, Any]]:
    """Kill the replica under load; wait for Serve's new one, then for normal answers again."""
    import ray

    names = replica_names(deployment)
    assert len(names) == 1, f"expected one {deployment} replica, found {names}"
    old = next(iter(names))
    actor = ray.get_actor(old, namespace=names[old])
    with Load(url) as load:
        assert load.wait_until(lambda a: sum(x.kind == "reranked" for x in a) >= 4, 120), load.answers
        fault_at = time.monotonic()
        ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 180
        while not (set(replica_names(deployment)) - {old}):
            assert time.monotonic() < deadline, f"Serve started no new {deployment} replica within 180s"
            time.sleep(0.2)
        ok = load.wait_until(recovered(time.monotonic(), n=6), 180)
        time.sleep(1.0)
    answers = list(load.answers)
    REPORT[name] = fig = figures(answers, fault_at)
    assert ok, f"{deployment} kill: the app did not recover within 180s: {fig}"
    return [a for a in answers if a.end > fault_at], fig


# --------------------------------------------------------------------------------------------------
# replica kills
# --------------------------------------------------------------------------------------------------
def test_the_breaker_can_read_a_handles_router(app_url):
    """The breakers' fast view (``routable_replicas``: Ray 2.60 router internals) works on this Ray: a live
    handle reports its one replica, not None (which would leave only the controller's slow view)."""
    from ray import serve

    from deployments._breaker import routable_replicas

    for deployment in ("Embedder", "Retriever", "Reranker"):
        h = serve.get_deployment_handle(deployment, APP)
        assert routable_replicas(h) is None  # not started: unknown, never "no replica"
        h.ready.remote().result(timeout_s=60)
        deadline = time.monotonic() + 30
        while routable_replicas(h) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert routable_replicas(h) == 1, deployment


def test_reranker_kill_answers_dense_order_at_once(app_url):
    answers, fig = kill_replica_under_load(app_url, "Reranker", "reranker_kill")
    assert_no_bugs(answers)
    assert all(a.status == 200 for a in answers), fig  # dense order, never an error
    degraded = [a for a in answers if a.kind != "reranked"]
    assert degraded and all(a.kind == "dense:reranker_error" for a in degraded), fig
    # nobody waits for the new replica (~20 s here), the rerank timeout (30 s) or Serve's controller to see
    # the death (its next health check: up to ~9 s on a busy machine): the handle's router drops the dead
    # replica on the first call to it, the breaker reads that within WATCH_EVERY_S, dense order comes at once
    fast = [a for a in degraded if a.seconds < 1.0]
    assert len(fast) >= 0.75 * len(degraded), fig
    assert fig["slowest_s"] < SLOW_S, fig


@pytest.mark.parametrize("deployment", ["Embedder", "Retriever"])
def test_stage1_kill_is_503_at_once(app_url, deployment):
    answers, fig = kill_replica_under_load(app_url, deployment, f"{deployment.lower()}_kill")
    assert_no_bugs(answers)
    failed = [a for a in answers if a.status != 200]
    # no 10 s timeouts: a request pending when the replica dies fails once Serve's controller sees it gone
    # (seconds; it lags on a busy machine), the later ones at once, until the new replica answers ready()
    assert failed and all(a.kind == "503:unavailable" for a in failed), fig
    assert any(a.seconds < 1.0 for a in failed), fig
    assert fig["slowest_s"] < 10, fig  # embed_timeout_s / retrieve_timeout_s


# --------------------------------------------------------------------------------------------------
# a client that hangs up mid-rerank
# --------------------------------------------------------------------------------------------------
def test_client_disconnect_mid_rerank_keeps_serving_others(app_url):
    with Load(app_url) as load:
        assert load.wait_until(lambda a: sum(x.kind == "reranked" for x in a) >= 2, 120)
        t0 = time.monotonic()
        for q in QUERIES[:6]:  # each hangs up while its 100 pairs are being scored
            with contextlib.suppress(httpx.TimeoutException):
                httpx.post(app_url + "/search", json={"query": q, "fetch_k": 100}, timeout=0.3)
        ok = load.wait_until(recovered(t0, n=6), 120)
    answers = [a for a in load.answers if a.end > t0]
    REPORT["client_disconnect"] = figures(list(load.answers), t0)
    assert ok, REPORT["client_disconnect"]
    assert all(a.kind == "reranked" for a in answers), REPORT["client_disconnect"]
    assert httpx.get(app_url + "/readyz", timeout=30).status_code == 200


# --------------------------------------------------------------------------------------------------
# the database stops for ~20 s
# --------------------------------------------------------------------------------------------------
OUTAGE_S = 20.0


def test_database_outage_fails_fast_and_recovers(app_url, chaos_db):
    readyz: list[tuple[float, int, dict]] = []
    with Load(app_url) as load:
        assert load.wait_until(lambda a: sum(x.kind == "reranked" for x in a) >= 4, 120)
        fault_at = time.monotonic()
        chaos_db.stop()
        try:
            while time.monotonic() - fault_at < OUTAGE_S:
                t = time.monotonic()
                with contextlib.suppress(httpx.TransportError):
                    r = httpx.get(app_url + "/readyz", timeout=30)
                    readyz.append((t - fault_at, r.status_code, r.json()))
                time.sleep(1.0)
        finally:
            chaos_db.start()
        up_at = time.monotonic()
        ok = load.wait_until(recovered(up_at), 120)
        time.sleep(1.0)
    answers = [a for a in load.answers if a.end > fault_at]
    fig = figures(list(load.answers), fault_at)
    fig["recovery_after_restart_s"] = round(max(0.0, fig["recovery_s"] - (up_at - fault_at)), 2)
    during = [a for a in answers if a.start > fault_at + 1 and a.end < up_at]
    fig["requests_during_outage"] = len(during)
    fig["slowest_during_outage_s"] = round(max((a.seconds for a in during), default=0.0), 2)
    fig["slow_during_outage"] = sum(a.seconds >= SLOW_S for a in during)
    late = [r for r in readyz if r[0] > 3]
    fig["readyz"] = sorted({r[2].get("database", {}).get("reason", "ready") for r in late})
    REPORT["database_outage"] = fig
    assert ok, f"not recovered within 120s of the restart: {fig}"
    assert_no_bugs(answers)
    failed = [a for a in answers if a.status != 200]
    assert failed, "the outage went unnoticed: did the database stop?"
    assert all(a.status == 503 for a in failed), fig
    assert all("database" in a.error for a in failed), {a.error for a in failed}
    # fail fast: besides the requests in flight when it stopped, nobody waits out a pool timeout
    assert sum(a.seconds >= SLOW_S for a in during) <= IN_FLIGHT, fig
    assert len(during) >= 10, fig  # so many answers in 20 s only if they come at once
    assert late and all(r[1] == 503 for r in late), readyz
    assert all("database unreachable" in r[2]["database"]["reason"] for r in late), readyz


# --------------------------------------------------------------------------------------------------
# a SIGKILLed ingest
# --------------------------------------------------------------------------------------------------
def _corpus(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    words = ["vector", "index", "query", "rerank", "batch", "replica", "pool", "shard", "token", "chunk"]
    for i in range(n):
        body = " ".join(words[(i * 7 + j) % len(words)] + str((i * j) % 97) for j in range(400))
        (folder / f"doc{i:04d}.txt").write_text(f"Document {i}.\n\n{body}\n")


def _rag_ingest(folder: Path, collection: str, url: str, state_dir: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        **TEST_ENV,
        "RAG_DATABASE_URL": url,
        "RAG_DATA_DIR": str(state_dir),
        "RAG_COLLECTION": collection,
        "RAG_OFFLINE": "1",
        "RAG_INGEST_BATCH_DOCS": "4",
    }
    cmd = [sys.executable, "-m", "ragcli", "ingest", str(folder), "--json"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _contents(store, collection: str) -> tuple[list[tuple], list[tuple]]:
    docs_t, chunks_t = f"rag_docs_{collection}", f"rag_chunks_{collection}"
    with store.connection() as conn:
        docs = conn.execute(
            f"SELECT d.doc_id, d.content_hash, d.n_chunks, count(c.id) FROM {docs_t} d "
            f"LEFT JOIN {chunks_t} c USING (doc_id) GROUP BY 1, 2, 3 ORDER BY 1"
        ).fetchall()
        chunks = conn.execute(
            f"SELECT id, doc_id, chunk_index, content_hash, embedding::text FROM {chunks_t} ORDER BY id"
        ).fetchall()
    return docs, chunks


def test_killed_ingest_leaves_no_half_written_document(chaos_store, chaos_db, state_dir, tmp_path):
    folder = tmp_path / "corpus"
    _corpus(folder, 160)
    killed, clean = "ing_" + uuid.uuid4().hex[:8], "ing_" + uuid.uuid4().hex[:8]
    p = _rag_ingest(folder, killed, chaos_db.url, state_dir)
    try:
        deadline = time.monotonic() + 240
        while True:  # kill it once a few batches are in, i.e. mid-write
            with contextlib.suppress(Exception):
                if chaos_store.count(killed) >= 12:
                    break
            assert p.poll() is None, f"ingest ended before it could be killed: {p.communicate()}"
            assert time.monotonic() < deadline, "ingest wrote nothing within 240s"
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    docs, _ = _contents(chaos_store, killed)
    half = [d for d in docs if d[2] != d[3]]
    REPORT["ingest_sigkill"] = {"documents_after_kill": len(docs), "half_written": len(half)}
    assert not half, half
    assert 0 < len(docs) < 160, len(docs)
    for coll in (killed, clean):
        r = _rag_ingest(folder, coll, chaos_db.url, state_dir)
        out, err = r.communicate(timeout=600)
        assert r.returncode == 0, err[-2000:]
    REPORT["ingest_sigkill"]["rerun_report"] = json.loads(out) if out.strip().startswith("{") else out[-200:]
    kd, kc = _contents(chaos_store, killed)
    cd, cc = _contents(chaos_store, clean)
    assert len(kd) == 160 and all(d[2] == d[3] for d in kd)
    assert kd == cd
    assert [c[:4] for c in kc] == [c[:4] for c in cc]
    vk = np.array([json.loads(c[4]) for c in kc])
    vc = np.array([json.loads(c[4]) for c in cc])
    assert np.allclose(vk, vc, atol=1e-4)  # the same vectors (batches differ, so bits may)
    for coll in (killed, clean):
        chaos_store.drop_collection(coll)
