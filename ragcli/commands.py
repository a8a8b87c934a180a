"""``rag ingest``, ``rag query``, ``rag serve`` and ``rag eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rag.settings import get_settings
from ragcli import INGEST_SKIPPED, CollectionOpt, _echo_json, _json_option, _settings, app

__all__ = ["eval_cmd", "ingest", "query", "serve"]


# --------------------------------------------------------------------------------------------------
# rag ingest
# --------------------------------------------------------------------------------------------------
@app.command()
def ingest(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Files (.txt .md .rst .jsonl), folders, or BEIR folders.", show_default=False),
    ] = None,
    demo: Annotated[
        bool, typer.Option(help="Index the Python standard library's docstrings (no download).")
    ] = False,
    if_empty: Annotated[
        bool, typer.Option(help="Do nothing when the collection already has chunks.")
    ] = False,
    collection: CollectionOpt = None,
    chunk_tokens: Annotated[int | None, typer.Option(help="Chunk size in tokens [RAG_CHUNK_TOKENS].")] = None,
    chunk_overlap: Annotated[int | None, typer.Option(help="Overlap in tokens [RAG_CHUNK_OVERLAP].")] = None,
    index_type: Annotated[
        str | None,
        typer.Option(
            help="Vector index of a NEW collection [RAG_INDEX_TYPE]: binary (the default: bit HNSW + re-rank "
            "by full vectors, 1/6 of hnsw's memory), hnsw (float32, lowest latency), halfvec or diskann "
            "(pgvectorscale). An existing one keeps its own. docs/retrieval.md compares them.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Chunk, embed and store documents. Re-running adds nothing new; changed documents are replaced.

    A file that cannot be stored (not UTF-8, a NUL byte, an undecodable name, a bad JSONL line) is skipped
    with a warning naming it; the rest is written. Exit status: 0 everything ingested, 3 finished but
    skipped some inputs (listed), 2 an error (nothing of the failing batch written)."""
    from rag.ingest import IngestReport, iter_demo, iter_paths
    from rag.ingest import ingest as run_ingest
    from rag.pipeline import Pipeline

    if not paths and not demo:
        raise typer.BadParameter("give one or more PATHs, or --demo for the stdlib demo corpus")
    if index_type is not None:
        from rag.store.indexes import INDEX_TYPES

        if index_type not in INDEX_TYPES:
            raise typer.BadParameter(f"pick one of {', '.join(INDEX_TYPES)}", param_hint="--index-type")
    s = _settings(
        collection=collection, chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap, index_type=index_type
    )
    p = Pipeline(s)
    has = p.store.index_types().get(s.collection)
    if index_type is not None and has is not None and has != index_type:
        raise typer.BadParameter(
            f"collection {s.collection!r} has a {has} index, chosen when it was created: ingest into another "
            f"--collection, or drop it first (`rag db drop-collection {s.collection}`)",
            param_hint="--index-type",
        )
    if if_empty and p.store.count(s.collection) > 0:
        typer.echo(
            f"collection {s.collection!r} already has {p.store.count(s.collection)} chunks: nothing to do"
        )
        return
    report = IngestReport(s.collection)
    docs = iter_demo() if demo else iter_paths(paths or [], report.skipped)
    total = None
    if demo:
        docs = list(docs)
        total = len(docs)
    run_ingest(
        docs,
        embedder=p.embedder,
        store=p.store,
        collection=s.collection,
        chunk_tokens=s.chunk_tokens,
        chunk_overlap=s.chunk_overlap,
        batch_docs=s.ingest_batch_docs,
        progress=not as_json,
        total=total,
        report=report,
    )
    if as_json:
        _echo_json(report.as_dict())
    else:
        for skip in report.skipped:
            typer.secho(f"skipped {skip}", fg=typer.colors.YELLOW, err=True)
        typer.echo(report.summary())
    if report.skipped:
        raise typer.Exit(INGEST_SKIPPED)


# --------------------------------------------------------------------------------------------------
# rag query
# --------------------------------------------------------------------------------------------------
@app.command()
def query(
    text: Annotated[str, typer.Argument(help="The question to search for.")],
    fetch_k: Annotated[int | None, typer.Option(help="Stage-1 candidates [RAG_FETCH_K, 100].")] = None,
    top_k: Annotated[int | None, typer.Option(help="Results to return [RAG_TOP_K, 8].")] = None,
    no_rerank: Annotated[bool, typer.Option("--no-rerank", help="Stage 1 only (its order).")] = False,
    mode: Annotated[
        str | None, typer.Option(help="Stage 1: dense, lexical or hybrid [RAG_SEARCH_MODE, hybrid].")
    ] = None,
    collection: CollectionOpt = None,
    filter_json: Annotated[
        str | None,
        typer.Option(
            "--filter",
            help='Narrow stage 1, as JSON: \'{"source": {"prefix": "docs/"}, "metadata": {"lang": "en"}}\'.',
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print results, timings and reranker as JSON.")
    ] = False,
) -> None:
    """Search: embed, fetch candidates from pgvector, rerank, print the best with scores and timings."""
    from rag.pipeline import Pipeline

    s = _settings(collection=collection)
    flt = _json_option(filter_json, "--filter")
    res = Pipeline(s).search(text, fetch_k=fetch_k, top_k=top_k, rerank=not no_rerank, filter=flt, mode=mode)
    if as_json:
        _echo_json(
            {
                "results": res.hits,
                "timings_ms": res.timings_ms,
                "reranker": res.reranker,
                "reranked": res.reranked,
                "reason": res.reason,
            }
        )
        return
    for i, h in enumerate(res.hits, 1):
        snippet = " ".join(h["content"].split())[:160]
        dense = "-" if h["dense_score"] is None else f"{h['dense_score']:.4f}"
        typer.echo(f"{i:>2}. score={h['score']:.4f} dense={dense}  {h['id']}  [{h['source']}]")
        typer.echo(f"    {snippet}")
    t = res.timings_ms
    typer.echo(
        f"\ntimings: embed {t['embed']:.1f} ms, retrieve {t['retrieve']:.1f} ms, "
        f"rerank {t['rerank']:.1f} ms, total {t['total']:.1f} ms"
    )
    r = res.reranker
    if res.reranked:
        typer.echo(
            f"reranker: {r.get('backend')} {r.get('model')} on {r.get('device')} ({r.get('dtype')})"
            + ("" if r.get("trained", True) else "  [STAND-IN, untrained: ranking not meaningful]")
        )
    else:
        typer.echo(f"not reranked ({res.reason})")


# --------------------------------------------------------------------------------------------------
# rag serve
# --------------------------------------------------------------------------------------------------
@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Option(help="Serve config YAML (serve_config.cpu.yaml without a GPU, else serve_config.yaml)."),
    ] = None,
    collection: CollectionOpt = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [RAG_SERVE_PORT, 8000].")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Ray metrics export port [RAG_METRICS_PORT, 8080].")
    ] = None,
) -> None:
    """Start a local Ray, the embedded database (unless RAG_DATABASE_URL is set) and the Serve app.

    Ctrl-C shuts everything down."""
    from deployments.launch import serve as run_serve

    run_serve(_settings(collection=collection, serve_port=port, metrics_port=metrics_port), config)


# --------------------------------------------------------------------------------------------------
# rag eval
# --------------------------------------------------------------------------------------------------
@app.command("eval")
def eval_cmd(
    dataset: Annotated[
        Path,
        typer.Argument(
            help="A BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) or a "
            "questions .jsonl with expected_sources."
        ),
    ],
    no_rerank: Annotated[bool, typer.Option("--no-rerank", help="Evaluate stage 1 alone.")] = False,
    mode: Annotated[
        list[str] | None,
        typer.Option(help="Stage-1 mode to evaluate; repeat for several (all: dense, lexical, hybrid)."),
    ] = None,
    fetch_k: Annotated[int, typer.Option(help="Candidates for reranking.")] = 100,
    top_k: Annotated[int, typer.Option(help="Results kept (recall@top_k).")] = 8,
    collection: Annotated[
        str | None,
        typer.Option(
            "--collection",
            "-c",
            help="Collection [BEIR: the folder's name, ingested on first use; jsonl: RAG_COLLECTION].",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N queries.")] = None,
    url: Annotated[
        str | None,
        typer.Option(
            help="Evaluate a running service at this URL (its /search/stream, with its own models and "
            "database) instead of the library in this process; the collection must already be there. "
            "API key: RAG_API_KEY."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the JSON results and PNG chart.")] = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable results.")] = False,
) -> None:
    """Each stage-1 mode (dense, lexical, hybrid) alone and reranked: recall@top_k, recall@fetch_k, nDCG@10,
    MRR@10; a JSON and a PNG chart in --out. Reranked figures from the offline stand-in reranker measure
    plumbing, not relevance (the output says so). With --url, the same harness and report for a running
    service: what was actually deployed."""
    from rag.eval import ensure_corpus, evaluate, load_dataset, save_results
    from rag.eval_targets import EvalTarget, local_target, service_target
    from rag.settings import SEARCH_MODES
    from rag.validation import check_mode, validate_search

    s = get_settings()
    validate_search("x", fetch_k, top_k, max_fetch_k=s.max_fetch_k)
    for m in mode or ():
        check_mode(m)
    ds = load_dataset(dataset)
    target: EvalTarget
    if url is not None:
        from rag.client import Client

        client = Client(url)  # closed with the process; RAG_API_KEY from the settings
        target = service_target(client)
        coll = collection or (ds.name if ds.corpus is not None else target.default_collection)
    else:
        from rag.pipeline import Pipeline

        coll = collection or (ds.name if ds.corpus is not None else s.collection)
        p = Pipeline(s.with_overrides(collection=coll, **({"reranker": "none"} if no_rerank else {})))
        ensure_corpus(p, ds, coll, progress=not as_json)
        target = local_target(p)
    res = evaluate(
        target,
        ds,
        collection=coll,
        rerank=not no_rerank,
        fetch_k=fetch_k,
        top_k=top_k,
        limit=limit,
        progress=not as_json,
        modes=mode or SEARCH_MODES,
    )
    jpath, ppath = save_results(res, out)
    res["files"] = {"json": str(jpath), "png": str(ppath) if ppath else None}
    if as_json:
        _echo_json(res)
        return
    metric_names = [m for m in next(iter(res["systems"].values())) if "@" in m]
    typer.echo(f"\n{res['dataset']} ({res['queries']} queries, collection {coll!r})")
    typer.echo(f"{'system':<42}" + "".join(f"{m:>11}" for m in metric_names) + f"{'ms/query':>11}")
    for sysname, vals in res["systems"].items():
        label = f"{sysname}: {vals['description']}"
        typer.echo(
            f"{label:<42}"
            + "".join(f"{vals[m]:>11.4f}" for m in metric_names)
            + f"{vals['ms_per_query']:>11.1f}"
        )
    for note in res["notes"]:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW)
    typer.echo(f"saved {jpath}" + (f" and {ppath}" if ppath else ""))
