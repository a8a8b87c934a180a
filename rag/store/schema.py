"""The service's own schema (the ``rag_collections`` registry, migrations) and what the server is.

``rag_collections`` lists every collection by name, of two kinds: ``owned`` (``rag ingest`` writes its
``rag_docs_<name>`` / ``rag_chunks_<name>`` tables) and ``attached`` (a user's existing table, read only;
its column mapping is the ``attached`` jsonb). Every process that opens the database sees both by name.
"""

from __future__ import annotations

from typing import Any

import psycopg

from rag.errors import StoreUnavailable, redact_url

__all__ = [
    "REGISTRY_COLUMNS",
    "SCHEMA_VERSION",
    "SERVER_INFO_SQL",
    "first_line",
    "migrate",
    "server_info_from_row",
    "unavailable",
]

SCHEMA_VERSION = 2

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE IF NOT EXISTS rag_collections (
        name                 text PRIMARY KEY,
        dim                  integer NOT NULL,
        embedding_model      text NOT NULL,
        hnsw_m               integer NOT NULL,
        hnsw_ef_construction integer NOT NULL,
        created_at           timestamptz NOT NULL DEFAULT now()
    );
    """,
    # Attached tables share the registry; owned collections get the indexes filters need.
    2: """
    ALTER TABLE rag_collections
        ADD COLUMN kind text NOT NULL DEFAULT 'owned' CHECK (kind IN ('owned', 'attached')),
        ADD COLUMN attached jsonb,
        ALTER COLUMN embedding_model DROP NOT NULL,
        ALTER COLUMN hnsw_m DROP NOT NULL,
        ALTER COLUMN hnsw_ef_construction DROP NOT NULL;
    DO $$
    DECLARE r record;
    BEGIN
        FOR r IN SELECT name FROM rag_collections WHERE kind = 'owned' LOOP
            EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I (source text_pattern_ops)',
                           'rag_chunks_' || r.name || '_source', 'rag_chunks_' || r.name);
            EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I USING gin (metadata jsonb_path_ops)',
                           'rag_chunks_' || r.name || '_meta', 'rag_chunks_' || r.name);
        END LOOP;
    END $$;
    """,
}

# What a collection lookup reads from the registry (in this order).
REGISTRY_COLUMNS = "name, kind, dim, embedding_model, attached, created_at"

# One round trip: server version, pgvector's installed version, and whether its library (loaded by the
# cast) defines hnsw.iterative_scan (pgvector >= 0.8).
SERVER_INFO_SQL = (
    "SELECT current_setting('server_version'),"
    " (SELECT extversion FROM pg_extension WHERE extname = 'vector'),"
    " ('[1]'::vector IS NOT NULL) AND current_setting('hnsw.iterative_scan', true) IS NOT NULL"
)


def server_info_from_row(row: tuple[Any, ...]) -> dict[str, Any]:
    version = str(row[0]).split()[0]  # '18.3 (Debian 18.3-1.pgdg13+1)' -> '18.3'
    return {"postgresql": version, "pgvector": row[1], "iterative_scan": bool(row[2])}


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def unavailable(url: str, err: BaseException) -> StoreUnavailable:
    return StoreUnavailable(
        f"cannot reach PostgreSQL at {redact_url(url)}: {first_line(err)}. "
        "Start the embedded database with `rag db start` (used when RAG_DATABASE_URL is unset), "
        "or fix RAG_DATABASE_URL."
    )


def migrate(url: str, *, timeout_s: float = 5.0) -> int:
    """Create the pgvector extension and apply pending schema migrations. Returns the schema version."""
    try:
        conn = psycopg.connect(url, connect_timeout=max(1, int(timeout_s)), autocommit=True)
    except psycopg.OperationalError as e:
        raise unavailable(url, e) from e
    with conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except (psycopg.errors.FeatureNotSupported, psycopg.errors.UndefinedFile) as e:  # no pgvector files
            raise StoreUnavailable(
                f"the vector extension is not installed on {redact_url(url)}: install pgvector on that "
                "server, or unset RAG_DATABASE_URL to use the embedded PostgreSQL (which has it)"
            ) from e
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('rag_schema'))")
            conn.execute("CREATE TABLE IF NOT EXISTS rag_schema (version integer NOT NULL)")
            row = conn.execute("SELECT max(version) FROM rag_schema").fetchone()
            current = (row[0] if row else None) or 0
            if current > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"the database schema is version {current}, newer than this code's {SCHEMA_VERSION}: "
                    "upgrade rag-serve"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                conn.execute(_MIGRATIONS[version])
                conn.execute("INSERT INTO rag_schema (version) VALUES (%s)", [version])
            return SCHEMA_VERSION
