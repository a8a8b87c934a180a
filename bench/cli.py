"""``rag bench``: benchmarks (not timed tests). Each prints progress on stderr and a summary (or ``--json``).

    rag bench rerank   seed CrossEncoder.predict fp32 vs our reranker on Cranfield; fidelity; FLOPs, floor
    rag bench ingest   document embedding vs plain SentenceTransformer.encode; stage-1 nDCG@10 per dtype
    rag bench store    pgvector HNSW, 200k clustered synthetic vectors: build, latency, recall, ef_search;
                       --filters: filtered search; --modes: dense, lexical and hybrid search, index builds;
                       --index-types: hnsw, halfvec, binary, diskann side by side (size, buffers, recall)
    rag bench fusion   hybrid fusion's parameters (RRF k, weights, depth; min-max score fusion) on Cranfield
    rag bench serve    load test of a running Serve app's /search at several concurrencies; JSON + PNG
    rag bench cache    the rerank score cache off and on: Zipf-distributed repeated /search, p50/p95, hit rate
    rag bench soak     minutes of mixed load on a running app: statuses, p50/p99 per route, replica RSS
    rag bench fairness small searches' rerank wait while one large /v2/rerank runs (issue 20)
    rag bench llm-rerank  pairs/s of the LLM reranker: the offline stand-in and a random 0.6B-sized Qwen3

The work lives in ``rag.benchmarks``; heavy libraries load inside the commands, never at import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rag.settings import Settings

app = typer.Typer(
    help="Benchmarks: reranker, ingest embedding, pgvector store, Serve load test (see docs/BENCHMARKS.md).",
    no_args_is_help=True,
)

DatasetOpt = Annotated[
    Path | None,
    typer.Option(
        help="Cranfield in BEIR layout (default: ../shared/datasets/cranfield).", show_default=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the full result as JSON on stdout.")]
UrlOpt = Annotated[str, typer.Option(help="The running app (127.0.0.1/localhost only).")]
OutOpt = Annotated[Path | None, typer.Option(help="Also write the JSON result to this file.")]
ApiKeyOpt = Annotated[
    str | None, typer.Option(help="Bearer key (default: the first of RAG_API_KEYS, when set).")
]


def _settings(**overrides: Any) -> Settings:
    from rag.settings import get_settings

    return get_settings().with_overrides(**overrides)


def _api_key(given: str | None) -> str | None:
    return given or next(iter(_settings().slice("search").api_key_list()), None)


def _finish(result: dict[str, Any], as_json: bool, out: Path | None, text: str) -> None:
    from bench.common import write_json

    write_json(result, out)
    typer.echo(json.dumps(result, indent=2, default=str) if as_json else text)


@app.command()
def rerank(
    dataset: DatasetOpt = None,
    queries: Annotated[int, typer.Option(help="Requests timed (spread over the 225 queries).")] = 20,
    fidelity_queries: Annotated[
        int, typer.Option(help="Queries in the fidelity check (0: skip); fp32 references are cached.")
    ] = 225,
    candidates: Annotated[int, typer.Option(help="Dense candidates per request.")] = 100,
    dtype: Annotated[
        str | None, typer.Option(help="Override RAG_RERANK_DTYPE (auto, bfloat16, float32).")
    ] = None,
    runtime: Annotated[
        str | None, typer.Option(help="Override RAG_RERANK_RUNTIME (auto, openvino, torch).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Override RAG_RERANK_THREADS (0: the CPUs we may use).")
    ] = None,
    token_budget: Annotated[int | None, typer.Option(help="Override RAG_RERANK_TOKEN_BUDGET.")] = None,
    refine_top: Annotated[
        int | None, typer.Option(help="Override RAG_RERANK_REFINE_TOP (0: bf16 only).")
    ] = None,
    skip_seed: Annotated[
        bool, typer.Option(help="Do not time the seed's code (fidelity uses cached refs).")
    ] = False,
    st_bf16: Annotated[
        bool, typer.Option(help="Also time sentence-transformers in bf16 (its predict sorts by length).")
    ] = True,
    fidelity_reference: Annotated[
        str, typer.Option(help="fp32 reference: seed (CrossEncoder.predict) or fp32-screen (faster).")
    ] = "seed",
    as_json: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """The seed's plain code vs our reranker on Cranfield candidate sets, side by side.

    100 dense candidates per query (exact cosine over all-MiniLM-L6-v2 embeddings, no database needed).

    Reports p50/p95 ms per request, pairs/s, the ratio, the measured fp32/bf16 matmul peak, the model's
    GFLOP per request and the fraction of the floor achieved, and fidelity to fp32 over --fidelity-queries
    queries. A full run takes 30-40 min on 2 cores (fp32 references of 225 queries; later runs reuse them).
    """
    from bench import rerank as rb

    s = _settings(
        rerank_dtype=dtype,
        rerank_runtime=runtime,
        rerank_threads=threads,
        rerank_token_budget=token_budget,
        rerank_refine_top=refine_top,
    )
    r = rb.run(
        s,
        dataset=dataset,
        queries=queries,
        fidelity_queries=fidelity_queries,
        k=candidates,
        skip_seed=skip_seed,
        st_bf16=st_bf16,
        fidelity_reference=fidelity_reference,
    )
    _finish(r, as_json, out, rb.summary(r))


@app.command()
def ingest(
    dataset: DatasetOpt = None,
    repeats: Annotated[int, typer.Option(help="Timed passes over the corpus per variant (median).")] = 3,
    as_json: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Ingest embedding speed vs plain SentenceTransformer.encode, and retrieval quality per dtype.

    On Cranfield (1,400 abstracts): plain SentenceTransformer.encode (fp32) vs Embedder.embed_documents
    (fast path, fp32 and the default dtype), and stage-1 nDCG@10 / recall@100 of
    exact cosine search with each (must stay >= 0.34; fp32 gives about 0.358)."""
    from bench import ingest as ib

    r = ib.run(_settings(), dataset=dataset, repeats=repeats)
    _finish(r, as_json, out, ib.summary(r))


@app.command()
def store(
    vectors: Annotated[
        int,
        typer.Option("--vectors", "--rows", help="Synthetic vectors to load (clustered, 384 dimensions)."),
    ] = 200_000,
    dim: Annotated[int, typer.Option(help="Vector dimension.")] = 384,
    clusters: Annotated[int, typer.Option(help="Gaussian clusters the vectors are drawn from.")] = 2000,
    queries: Annotated[int, typer.Option(help="Held-out query vectors (recall, latency).")] = 200,
    k: Annotated[int, typer.Option(help="Neighbours per query.")] = 100,
    ef_search: Annotated[str, typer.Option(help="Comma-separated hnsw.ef_search values to sweep.")] = (
        "100,120,160,200,300,400,600,800"
    ),
    maintenance_work_mem: Annotated[
        str, typer.Option(help="For the index build (--index-types: 1GB means rows x 3 KB, >= 1GB).")
    ] = "1GB",
    parallel_workers: Annotated[
        int, typer.Option(help="max_parallel_maintenance_workers for the build.")
    ] = 1,
    keep: Annotated[bool, typer.Option(help="Keep the temporary collection afterwards.")] = False,
    filters: Annotated[
        bool,
        typer.Option(
            "--filters",
            help="Filtered search instead: filters matching 50%, 5% and 0.1% of rows (recall@k vs exact "
            "filtered search, p50/p99, rows returned, strategy), with and without iterative scans.",
        ),
    ] = False,
    modes: Annotated[
        bool,
        typer.Option(
            "--modes",
            help="Search modes instead: dense, lexical and hybrid p50/p99 with and without a 5% filter, "
            "with BM25 (pg_textsearch) and the built-in full-text search; each lexical index's build time "
            "and size.",
        ),
    ] = False,
    index_types: Annotated[
        str | None,
        typer.Option(
            help="Index types instead, side by side (comma-separated: hnsw,halfvec,binary,diskann), in a "
            "dedicated embedded server: build time, size on disk and in shared buffers, p50/p99, recall@k.",
            show_default=False,
        ),
    ] = None,
    sweep_ef: Annotated[
        str, typer.Option(help="--index-types: ef_search (diskann: search list size) values.")
    ] = "150,300,600",
    rerank_factors: Annotated[str, typer.Option(help="--index-types: binary re-rank factors.")] = "4,8,16",
    warmup: Annotated[
        int, typer.Option(help="--index-types: warm-up queries before buffers are counted.")
    ] = 500,
    shared_buffers: Annotated[
        str | None, typer.Option(help="--index-types: the server's shared_buffers (rows x 5 KB, >= 1GB).")
    ] = None,
    as_json: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """pgvector HNSW at 200k+ vectors: build time, latency and recall per ef_search (or --filters, --modes).

    COPY (rag.store) into a temporary collection, build the HNSW index, then p50/p99 latency and recall@k
    against exact search for each ef_search; reports the smallest ef_search with
    recall >= 0.95. Uses RAG_DATABASE_URL, else the embedded server (started if needed). About 10 minutes.
    With --filters: the same data with sources and metadata, searched through Store.search(filter=...) at
    the configured ef_search (--ef-search is ignored; --queries defaults to 200 there too)."""
    from bench import store as sb

    if index_types:
        from bench import store_indexes as si

        r = si.run_index_types(
            _settings(),
            index_types=[x.strip() for x in index_types.split(",") if x.strip()],
            n=vectors,
            dim=dim,
            clusters=clusters,
            n_queries=queries,
            warmup=warmup,
            k=k,
            ef_values=[int(x) for x in sweep_ef.split(",") if x.strip()],
            rerank_factors=[float(x) for x in rerank_factors.split(",") if x.strip()],
            shared_buffers=shared_buffers,
            maintenance_work_mem=None if maintenance_work_mem == "1GB" else maintenance_work_mem,
            parallel_workers=parallel_workers,
            out=out,
        )
        _finish(r, as_json, out, si.index_types_summary(r))
        return
    if modes:
        from bench import store_modes as sm

        r = sm.run_modes(
            _settings(),
            n=vectors,
            dim=dim,
            clusters=clusters,
            n_queries=queries,
            k=k,
            maintenance_work_mem=maintenance_work_mem,
            parallel_workers=parallel_workers,
            keep=keep,
        )
        _finish(r, as_json, out, sm.modes_summary(r))
        return
    if filters:
        r = sb.run_filters(
            _settings(),
            n=vectors,
            dim=dim,
            clusters=clusters,
            n_queries=queries,
            k=k,
            maintenance_work_mem=maintenance_work_mem,
            parallel_workers=parallel_workers,
            keep=keep,
        )
        _finish(r, as_json, out, sb.filters_summary(r))
        return
    efs = [int(x) for x in ef_search.split(",") if x.strip()]
    r = sb.run(
        _settings(),
        n=vectors,
        dim=dim,
        clusters=clusters,
        n_queries=queries,
        k=k,
        ef_values=efs,
        maintenance_work_mem=maintenance_work_mem,
        parallel_workers=parallel_workers,
        keep=keep,
    )
    _finish(r, as_json, out, sb.summary(r))


@app.command()
def fusion(
    dataset: DatasetOpt = None,
    collection: Annotated[
        str | None, typer.Option("--collection", "-c", help="Collection (the dataset folder's name).")
    ] = None,
    fetch_k: Annotated[int, typer.Option(help="Stage-1 candidates.")] = 100,
    top_k: Annotated[int, typer.Option(help="recall@top_k.")] = 8,
    as_json: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Hybrid fusion's parameters on Cranfield: RRF k, lexical weight and depth, and min-max score fusion,
    computed from the store's own dense and lexical rankings; checks the service's setting against the
    store's hybrid search. Ingests the dataset on first use (as `rag eval`). A few minutes."""
    from bench import fusion as fb
    from bench.common import find_cranfield
    from rag.eval import ensure_corpus, load_beir
    from rag.pipeline import Pipeline

    ds = load_beir(find_cranfield(dataset))
    coll = collection or ds.name
    p = Pipeline(_settings(collection=coll, reranker="none"))
    ensure_corpus(p, ds, coll)
    r = fb.run(p, ds, collection=coll, top_k=top_k, fetch_k=fetch_k)
    _finish(r, as_json, out, fb.summary(r))


@app.command()
def cost(
    dataset: DatasetOpt = None,
    collection: Annotated[
        str | None, typer.Option("--collection", "-c", help="Collection (the dataset folder's name).")
    ] = None,
    queries: Annotated[int, typer.Option(help="Queries embedded and searched (of the dataset's).")] = 200,
    rerank_queries: Annotated[int, typer.Option(help="Of those, queries whose candidates are reranked.")] = 5,
    fetch_k: Annotated[int, typer.Option(help="Stage-1 candidates (and pairs reranked per query).")] = 100,
    mode: Annotated[str, typer.Option(help="Stage-1 mode: dense, lexical or hybrid.")] = "dense",
    as_json: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """CPU time per search of each stage (embed, retrieve on both sides of the connection, rerank), and the
    searches/s per core it gives: the figures docs/scaling.md sizes a cluster from. Cranfield queries against
    a collection of this machine's database, ingested on first use (as `rag eval`). A few minutes."""
    from bench import stage_cost as sc
    from bench.common import find_cranfield
    from rag.eval import ensure_corpus, load_beir
    from rag.pipeline import Pipeline
    from rag.validation import check_mode

    check_mode(mode)
    ds = load_beir(find_cranfield(dataset))
    coll = collection or ds.name
    p = Pipeline(_settings(collection=coll, rerank_cache=False))
    ensure_corpus(p, ds, coll)
    qs = list(ds.queries.values())[:queries]
    r = sc.run(p, qs, collection=coll, fetch_k=fetch_k, mode=mode, rerank_queries=rerank_queries)
    _finish(r, as_json, out, sc.summary(r))


@app.command()
def serve(
    url: UrlOpt = "http://127.0.0.1:8000",
    metrics_url: Annotated[
        str | None,
        typer.Option(help="Ray metrics endpoint (default: http://127.0.0.1:RAG_METRICS_PORT/metrics)."),
    ] = None,
    concurrency: Annotated[str, typer.Option(help="Comma-separated client concurrencies.")] = "1,4,16",
    duration: Annotated[float, typer.Option(help="Seconds of load per concurrency (max 600).")] = 60.0,
    warmup: Annotated[float, typer.Option(help="Seconds of unrecorded load before each level.")] = 5.0,
    collection: Annotated[
        str | None, typer.Option(help="Collection to search (default: the service's).")
    ] = None,
    fetch_k: Annotated[int, typer.Option(help="Candidates per request.")] = 100,
    top_k: Annotated[int, typer.Option(help="Results per request.")] = 8,
    dataset: DatasetOpt = None,
    inprocess: Annotated[
        bool, typer.Option(help="Also measure the in-process reranker's pairs/s first (server idle).")
    ] = True,
    rerank_json: Annotated[
        Path | None,
        typer.Option(help="Take in-process pairs/s from a `rag bench rerank --out` file instead."),
    ] = None,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON and PNG go.")] = Path("results"),
    as_json: JsonOpt = False,
) -> None:
    """Load test of the running Serve app's /search at several concurrencies (JSON + PNG).

    Closed-loop httpx + asyncio clients (loopback only): p50/p95/p99 latency, requests/s, errors and the
    reranker batch sizes seen (from Ray's metrics) at each concurrency, the served pairs/s at
    the highest concurrency against the in-process reranker's; saved as JSON and a PNG plot."""
    from bench import serve as vb

    s = _settings()
    levels = [int(x) for x in concurrency.split(",") if x.strip()]
    r = vb.run(
        s,
        url=url,
        metrics_url=metrics_url or f"http://127.0.0.1:{s.metrics_port}/metrics",
        levels=levels,
        duration=duration,
        warmup=warmup,
        collection=collection,
        fetch_k=fetch_k,
        top_k=top_k,
        dataset=dataset,
        inprocess=inprocess,
        rerank_json=rerank_json,
        out_dir=out_dir,
    )
    _finish(r, as_json, None, vb.summary(r))


@app.command()
def cache(
    requests: Annotated[int, typer.Option(help="/search requests per mode.")] = 200,
    distinct: Annotated[int, typer.Option(help="Distinct queries the requests are drawn from.")] = 50,
    zipf_s: Annotated[float, typer.Option(help="Zipf exponent of the query frequencies.")] = 1.1,
    seed: Annotated[int, typer.Option(help="Seed of the query sequence.")] = 0,
    fetch_k: Annotated[int, typer.Option(help="Candidates reranked per request.")] = 100,
    top_k: Annotated[int, typer.Option(help="Results per request.")] = 8,
    collection: Annotated[
        str, typer.Option(help="Collection searched (ingested from the demo corpus when missing).")
    ] = "bench_cache",
    demo_docs: Annotated[int, typer.Option(help="Demo documents ingested when the collection is new.")] = 600,
    config: Annotated[
        Path | None, typer.Option(help="Serve config (default: serve_config.cpu.yaml).")
    ] = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The rerank score cache, off then on, in one run: starts its own local Serve app twice (the Reranker
    redeployed with rerank_cache false, then true) and sends the same Zipf-distributed sequence of /search
    requests one at a time; p50/p95 latency and the pair hit rate per mode (docs/BENCHMARKS.md)."""
    from bench import cache as cb

    r = cb.run(
        _settings(),
        config=config,
        requests=requests,
        distinct=distinct,
        zipf_s=zipf_s,
        seed=seed,
        fetch_k=fetch_k,
        top_k=top_k,
        collection=collection,
        demo_docs=demo_docs,
    )
    _finish(r, as_json, out, cb.summary(r))


@app.command()
def soak(
    url: UrlOpt = "http://127.0.0.1:8000",
    duration: Annotated[float, typer.Option(help="Seconds of load (issue 12's soak: 600).")] = 600.0,
    warmup: Annotated[
        float,
        typer.Option(help="Seconds of the same load first, not recorded; the RSS baseline is after it."),
    ] = 60.0,
    queries: Annotated[
        int, typer.Option(help="Distinct queries (docstring first lines, demo corpus).")
    ] = 100,
    concurrency: Annotated[int, typer.Option(help="Closed-loop clients.")] = 4,
    documents: Annotated[int, typer.Option(help="Documents per rerank-route call.")] = 20,
    fetch_k: Annotated[int, typer.Option(help="Candidates per /search.")] = 100,
    top_k: Annotated[int, typer.Option(help="Results per request.")] = 8,
    api_key: ApiKeyOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the route and query sequence.")] = 0,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Steady mixed load on the running app: /search (reranked and dense), the three rerank routes, /embed
    and /v1/embeddings. Prints requests, statuses and p50/p99 per route, 5xx that were not a deliberate
    503 + Retry-After, and each Serve replica's RSS at start and end. Exits 1 when the target (no such
    5xx, RSS growth < 10%) is missed."""
    from bench import soak as sk

    r = sk.run(
        url=url,
        duration=duration,
        warmup=warmup,
        queries=queries,
        concurrency=concurrency,
        documents=documents,
        top_k=top_k,
        fetch_k=fetch_k,
        api_key=_api_key(api_key),
        seed=seed,
    )
    _finish(r, as_json, out, sk.summary(r))
    if not r["pass"]:
        raise typer.Exit(1)


@app.command()
def fairness(
    url: UrlOpt = "http://127.0.0.1:8000",
    documents: Annotated[int, typer.Option(help="Documents of the one large /v2/rerank.")] = 1000,
    chars: Annotated[int, typer.Option(help="Characters per document of the large request.")] = 1000,
    clients: Annotated[int, typer.Option(help="Closed-loop /search clients.")] = 2,
    fetch_k: Annotated[int, typer.Option(help="Candidates per /search.")] = 30,
    before: Annotated[float, typer.Option(help="Seconds of searching before the large request.")] = 20.0,
    api_key: ApiKeyOpt = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue 20's fairness scenario on the running app: searches/s and each search's rerank wait, before
    and while one large /v2/rerank runs (the app needs RAG_MAX_BODY_BYTES above the large body's size)."""
    from bench import fairness as fr

    r = fr.run(
        url=url,
        documents=documents,
        chars=chars,
        clients=clients,
        fetch_k=fetch_k,
        before=before,
        api_key=_api_key(api_key),
    )
    _finish(r, as_json, out, fr.summary(r))


@app.command("llm-rerank")
def llm_rerank(
    pairs: Annotated[int, typer.Option(help="Pairs timed on the stand-in.")] = 64,
    real_pairs: Annotated[
        int, typer.Option(help="Pairs timed on a random Qwen3-Reranker-0.6B-sized model (0: skip).")
    ] = 8,
    tokens: Annotated[int, typer.Option(help="Tokens per prompt (stand-in tokenizer).")] = 200,
    repeats: Annotated[int, typer.Option(help="Timed repeats on the stand-in; the best counts.")] = 3,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Pairs/s of the LLM reranker (RAG_RERANKER=llm) on this machine: the offline stand-in, and a randomly
    initialised model at Qwen3-Reranker-0.6B's size built in memory (timing only; nothing is downloaded).
    Device, dtype, threads and token budget come from the RAG_RERANK_* settings."""
    from bench import llm_rerank as lr

    r = lr.run(_settings(offline=True), pairs=pairs, real_pairs=real_pairs, tokens=tokens, repeats=repeats)
    _finish(r, as_json, out, lr.summary(r))
