"""``rag db`` (the embedded PostgreSQL) and ``rag attach`` / ``rag detach`` (docs/attached-tables.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from rag.settings import get_settings
from ragcli import _echo_json, _settings, app, db_app

if TYPE_CHECKING:
    from rag.db import EmbeddedPostgres

__all__ = ["attach", "db_drop", "db_start", "db_status", "db_stop", "db_url", "detach"]


def _embedded() -> EmbeddedPostgres:
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
        from rag.settings import redact_url

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
            f"(iterative index scans: {'yes' if info['iterative_scan'] else 'no'}); lexical search: {bm25}; "
            f"DiskANN: {('pgvectorscale ' + info['vectorscale']) if info['vectorscale'] else 'no'}"
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
                f"{c['dim']}-dim ({c['embedding_model']}), {c['index_type']} vector index, "
                f"lexical index {c['lexical'] or 'none'}"
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
        str | None, typer.Option(help="Optional document id column (default: the id).")
    ] = None,
    distance: Annotated[
        str | None, typer.Option(help="cosine, l2 or ip (default: the HNSW index's, else cosine).")
    ] = None,
    dim: Annotated[
        int | None,
        typer.Option(help="Embedder dimension to check against (default: load the embedding model's)."),
    ] = None,
    lexical_column: Annotated[
        str | None,
        typer.Option(
            help="tsvector column, or text column with a BM25 index, for lexical and hybrid search "
            "(default: found if the table has one, else dense only)."
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
