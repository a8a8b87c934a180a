"""``rag``: the command line. db, attach/detach, ingest, query, serve, eval, bench.

Every command reads its defaults from ``Settings`` (env prefix ``RAG_``); flags override them. Errors the
user can fix print one line (``error: ...``) and exit with status 2; nothing prints a stack trace.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from rag.errors import RagError
from rag.settings import Settings, get_settings

app = typer.Typer(
    help="Two-stage retrieval: pgvector candidates, cross-encoder rerank, served by Ray Serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(
    help="The embedded PostgreSQL + pgvector (used when RAG_DATABASE_URL is unset).", no_args_is_help=True
)
app.add_typer(db_app, name="db")

CollectionOpt = Annotated[
    str | None,
    typer.Option("--collection", "-c", help="Collection to use [default: RAG_COLLECTION or 'default']."),
]


def _settings(**overrides: Any) -> Settings:
    return get_settings().with_overrides(**overrides)


INGEST_SKIPPED = 3  # `rag ingest` finished, but skipped some inputs


def _json_option(value: str | None, name: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"{name} must be JSON ({e.msg} at character {e.pos})") from e


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading reports, progress bars) off the user's terminal."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("transformers", "sentence_transformers", "huggingface_hub", "pgserver", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)

    warnings.showwarning = show
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")


# --------------------------------------------------------------------------------------------------
# rag db
# --------------------------------------------------------------------------------------------------
def _embedded():
    from rag.db import EmbeddedPostgres

    return EmbeddedPostgres(get_settings().pgdata)


@db_app.command("start")
def db_start() -> None:
    """Start the embedded PostgreSQL (data in RAG_DATA_DIR/pgdata; survives stop/start)."""
    s = get_settings()
    if s.database_url:
        typer.echo("RAG_DATABASE_URL is set: the embedded database is not used.")
        return
    url = _embedded().start()  # logs a warning when it reconciled the data folder's pgvector version
    from rag.store import migrate

    migrate(url)  # also the CPU self-check: one pgvector distance, a clear error if the server dies on it
    typer.echo(f"embedded PostgreSQL running: {url}")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL (data is kept)."""
    typer.echo("stopped" if _embedded().stop() else "not running")


@db_app.command("status")
def db_status() -> None:
    """Show whether the embedded PostgreSQL runs, where its data is, and its collections."""
    s = get_settings()
    if s.database_url:
        from rag.errors import redact_url

        typer.echo(f"external database (RAG_DATABASE_URL): {redact_url(s.database_url)}")
        url = s.database_url
    else:
        st = _embedded().status()
        typer.echo(f"embedded PostgreSQL: {'running' if st.running else 'stopped'} (data: {st.pgdata})")
        if not st.running:
            raise typer.Exit(1)
        url = st.url or ""
    from rag.store import Store

    with Store(url, min_size=0, max_size=1) as store:
        info, lex = store.server_info(), store.lexical_info()
        bm25 = f"BM25 (pg_textsearch {lex['pg_textsearch']})" if lex["pg_textsearch"] else "full-text search"
        typer.echo(
            f"  PostgreSQL {info['postgresql']}, pgvector {info['pgvector']} "
            f"(iterative index scans: {'yes' if info['iterative_scan'] else 'no'}); lexical search: {bm25}"
        )
        for c in store.collections():
            if c.get("kind") == "attached" and c.get("error"):
                typer.secho(f"  collection {c['name']}: {c['error']}", fg=typer.colors.RED)
                continue
            if c.get("kind") == "attached":
                typer.echo(
                    f"  collection {c['name']}: attached table {c['table']}, {c['chunks']} rows, "
                    f"{c['dim']}-dim, {c['distance']} (read only), lexical index {c['lexical'] or 'none'}"
                )
                continue
            typer.echo(
                f"  collection {c['name']}: {c['documents']} documents, {c['chunks']} chunks, "
                f"{c['dim']}-dim ({c['embedding_model']}), lexical index {c['lexical'] or 'none'}"
            )


@db_app.command("url")
def db_url() -> None:
    """Print the database URL in use (starts the embedded server if needed)."""
    from rag.db import database_url

    typer.echo(database_url(get_settings()))


@db_app.command("drop-collection")
def db_drop(
    name: Annotated[str, typer.Argument(help="Collection to delete, with all its documents.")],
) -> None:
    """Delete a collection and everything ingested into it."""
    from rag.pipeline import Pipeline

    p = Pipeline(_settings(collection=name))
    typer.echo(f"dropped {name}" if p.store.drop_collection(name) else f"no collection {name!r}")


# --------------------------------------------------------------------------------------------------
# rag attach / detach (docs/attached-tables.md)
# --------------------------------------------------------------------------------------------------
@app.command()
def attach(
    name: Annotated[str, typer.Argument(help="Collection name to serve the table as.")],
    table: Annotated[str, typer.Option("--table", help="Existing table: TABLE or SCHEMA.TABLE.")],
    id_column: Annotated[str, typer.Option(help="Row id column.")] = "id",
    content_column: Annotated[str, typer.Option(help="Text column.")] = "content",
    source_column: Annotated[str, typer.Option(help="Source column.")] = "source",
    embedding_column: Annotated[str, typer.Option(help="vector(N) column.")] = "embedding",
    metadata_column: Annotated[
        str | None, typer.Option(help="Optional jsonb column (metadata filters).")
    ] = None,
    doc_id_column: Annotated[
        str | None, typer.Option(help="Optional document id column [default: the id].")
    ] = None,
    distance: Annotated[
        str | None, typer.Option(help="cosine, l2 or ip [default: the HNSW index's, else cosine].")
    ] = None,
    dim: Annotated[
        int | None,
        typer.Option(help="Embedder dimension to check against [default: load the embedding model's]."),
    ] = None,
    lexical_column: Annotated[
        str | None,
        typer.Option(
            help="tsvector column, or text column with a BM25 index, for lexical and hybrid search "
            "[default: found if the table has one, else dense only]."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Serve an existing pgvector table as collection NAME, read only (rag never writes to it)."""
    from rag.pipeline import Pipeline

    p = Pipeline(_settings())
    rep = p.store.attach(
        name,
        table,
        id_column=id_column,
        content_column=content_column,
        source_column=source_column,
        embedding_column=embedding_column,
        metadata_column=metadata_column,
        doc_id_column=doc_id_column,
        distance=distance,
        embed_dim=dim if dim is not None else p.embedder.dim,
        lexical_column=lexical_column,
    )
    if as_json:
        _echo_json(rep.as_dict())
        return
    for w in rep.warnings:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    for n in rep.notices:
        typer.echo(f"note: {n}", err=True)
    typer.echo(
        f"attached {rep.table} as collection {name!r}: {rep.rows} rows, {rep.dim}-dim, {rep.distance} "
        f"(from the {rep.distance_from}), index {rep.index or 'none'}; query it with `--collection {name}`"
    )


@app.command()
def detach(name: Annotated[str, typer.Argument(help="Attached collection to forget.")]) -> None:
    """Stop serving an attached table (the table itself is left alone)."""
    from rag.pipeline import Pipeline

    done = Pipeline(_settings()).store.detach(name)
    typer.echo(f"detached {name} (the table is unchanged)" if done else f"no attached collection {name!r}")


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
    s = _settings(collection=collection, chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap)
    p = Pipeline(s)
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
        typer.Option(help="Serve config YAML [serve_config.cpu.yaml without a GPU, else serve_config.yaml]."),
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
        typer.Option(help="Stage-1 mode to evaluate; repeat for several [all: dense, lexical, hybrid]."),
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
    out: Annotated[Path, typer.Option(help="Folder for the JSON results and PNG chart.")] = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable results.")] = False,
) -> None:
    """Each stage-1 mode (dense, lexical, hybrid) alone and reranked: recall@top_k, recall@fetch_k, nDCG@10,
    MRR@10; a JSON and a PNG chart in --out. Reranked figures from the offline stand-in reranker measure
    plumbing, not relevance (the output says so)."""
    from rag.eval import ensure_corpus, evaluate, load_dataset, save_results
    from rag.pipeline import Pipeline
    from rag.settings import SEARCH_MODES
    from rag.validation import check_mode, validate_search

    s = get_settings()
    validate_search("x", fetch_k, top_k, max_fetch_k=s.max_fetch_k)
    for m in mode or ():
        check_mode(m)
    ds = load_dataset(dataset)
    coll = collection or (ds.name if ds.corpus is not None else s.collection)
    p = Pipeline(s.with_overrides(collection=coll, **({"reranker": "none"} if no_rerank else {})))
    ensure_corpus(p, ds, coll, progress=not as_json)
    res = evaluate(
        p,
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


def _mount_bench() -> None:
    try:
        from bench.cli import app as bench_app
    except ImportError:  # benchmarks are optional in a trimmed install
        return
    app.add_typer(bench_app, name="bench")


_mount_bench()


def main() -> None:
    """Entry point: one place turns expected errors into a one-line message and exit status 2."""
    _quiet_libraries()
    try:
        app()
    except RagError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except ValidationError as e:  # a bad RAG_* variable or flag value
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "settings"
            typer.secho(f"error: {where}: {err['msg']}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
