"""`rag bench cost` (bench/stage_cost.py): per-stage CPU time is measured on the right processes."""

from __future__ import annotations

from helpers import ingest_demo

from bench import stage_cost


def test_postgres_cpu_counts_the_server_that_did_the_work(store) -> None:
    pm = stage_cost.postmaster_pid(store)
    before = stage_cost.postgres_cpu_s(pm)
    with store.connection() as conn:  # about a CPU-second of work in one backend of this server
        conn.execute("SELECT count(*) FROM generate_series(1, 5000000) g WHERE g % 7 = 3").fetchone()
    assert stage_cost.postgres_cpu_s(pm) - before > 0.05


def test_run_reports_every_stage_per_search(pipeline, store, embedder) -> None:
    name = ingest_demo(store, embedder, "t_cost", limit=40)
    queries = ["how do I parse a date", "open a file for writing", "sort a list in place"]
    try:
        r = stage_cost.run(pipeline, queries, collection=name, fetch_k=10, rerank_queries=2)
        dense_only = stage_cost.run(pipeline, queries, collection=name, fetch_k=10, rerank_queries=0)
    finally:
        store.drop_collection(name)
    assert r["queries"] == 3 and r["chunks"] >= 40
    assert r["embed"]["cpu_ms"] > 0 and r["retrieve"]["client_cpu_ms"] > 0
    assert "postgres_cpu_ms" in r["retrieve"]  # 3 small searches can fall under one clock tick (10 ms)
    assert r["rerank"]["pairs"] == 20  # two queries x their 10 candidates
    assert r["rerank"]["cpu_ms_per_pair"] > 0
    text = stage_cost.summary(r)
    assert "| retrieve: PostgreSQL |" in text and "| rerank 10 pairs |" in text
    assert "rerank" not in dense_only and "| rerank" not in stage_cost.summary(dense_only)
