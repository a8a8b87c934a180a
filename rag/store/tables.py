"""Attached tables: a user's existing pgvector table served as a collection, read only.

``Store.attach(name, table, ...)`` maps the table's columns onto a hit's keys (``id``, ``content``,
``source``, ``embedding``, optional ``metadata`` jsonb and ``doc_id``), reads the distance from the
embedding column's HNSW index (its operator class), validates, and records the mapping in
``rag_collections`` (kind ``attached``), where every process finds it by collection name. Searches of an
attached table run in read-only transactions; nothing here writes to it (only to ``rag_collections``).

Lexical search (``rag.store.lexical``): a BM25 index or a ``tsvector`` column of the table is found at attach
(or named with ``--lexical-column``) and recorded; without one the collection is searched dense only, which
attach and start-up say in one line (``AttachReport.notices``, ``Store.dense_only_notices``).

Hit keys of an attached table: ``doc_id`` is the ``doc_id`` column, else the id as text; ``chunk_index`` is 0;
``metadata`` is ``{}`` without a metadata column; ``dense_score`` is ``1 - distance`` for cosine and
``-distance`` for L2 and inner product (for ``ip`` that is the inner product itself).

Validation (at attach, and at start-up via ``validate_attached``) fails with one ``ConfigError`` line that
names the fix: table or column missing, no SELECT privilege, embedding not a ``vector(N)``, a dimension other
than the embedder's, metadata not jsonb, a distance that does not match the HNSW index. A missing HNSW index
is a warning that prints the ``CREATE INDEX`` to run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from rag.errors import CollectionError, ConfigError
from rag.store.lexical import LexicalIndex, detect
from rag.store.search import DISTANCES, Target, owned_target
from rag.validation import validate_collection_name

__all__ = [
    "BROKEN",
    "ROLES",
    "AttachReport",
    "dense_only_notice",
    "inspect_table",
    "missing",
    "table_changed",
    "target_from_row",
]

ROLES = ("id", "content", "source", "embedding", "metadata", "doc_id")  # the last two are optional
_TEXT_TYPES = {"text", "varchar", "bpchar", "name"}
_OPCLASS_DISTANCE = {opc: d for d, (_, opc) in DISTANCES.items()}


@dataclass
class AttachReport:
    """What ``attach`` found and recorded."""

    name: str
    table: str  # schema-qualified
    columns: dict[str, str | None]
    distance: str
    distance_from: str  # "index" | "given" | "default"
    dim: int
    rows: int
    index: str | None  # the HNSW index searches use, if any
    warnings: list[str] = field(default_factory=list)
    lexical: dict[str, Any] | None = None  # LexicalIndex.as_json(): how lexical and hybrid modes search it
    notices: list[str] = field(default_factory=list)  # e.g. no lexical index: dense only

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fail(name: str, msg: str) -> ConfigError:
    return ConfigError(f"attached collection {name!r}: {msg}")


def _resolve(conn: psycopg.Connection, name: str, table: str) -> tuple[int, str, str]:
    parts = table.split(".")
    if len(parts) > 2 or not all(parts):
        raise _fail(name, f"table {table!r} is not a table name: give TABLE or SCHEMA.TABLE")
    schema, rel = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
    row = conn.execute(
        "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
        "AND (n.nspname = %s OR (%s::text IS NULL AND n.nspname = ANY(current_schemas(false)))) "
        "ORDER BY array_position(current_schemas(false), n.nspname) LIMIT 1",
        [rel, schema, schema],
    ).fetchone()
    if row is None:
        where = (
            f"schema {schema!r}"
            if schema
            else "schemas " + ", ".join(conn.execute("SELECT current_schemas(false)").fetchone()[0])
        )
        raise _fail(
            name,
            f"table {table!r} does not exist (looked in {where}): create it, attach the right one "
            f"(`rag attach {name} --table SCHEMA.TABLE`), or `rag detach {name}`",
        )
    if not conn.execute("SELECT has_table_privilege(%s::oid, 'SELECT')", [row[0]]).fetchone()[0]:
        user = conn.execute("SELECT current_user").fetchone()[0]
        raise _fail(name, f"user {user!r} may not read {row[1]}.{row[2]}: GRANT SELECT ON it TO {user}")
    return int(row[0]), str(row[1]), str(row[2])


def inspect_table(
    conn: psycopg.Connection,
    name: str,
    table: str,
    columns: Mapping[str, str | None],
    *,
    distance: str | None,
    embed_dim: int | None,
    lexical_column: str | None = None,
    text_search_config: str = "english",
) -> tuple[AttachReport, dict[str, Any]]:
    """Validate an attachment; return the report and the registry's ``attached`` jsonb. Reads only."""
    validate_collection_name(name)
    if distance is not None and distance not in DISTANCES:
        raise _fail(
            name, f"distance {distance!r} is not one of {', '.join(DISTANCES)}: pass --distance cosine"
        )
    oid, schema, rel = _resolve(conn, name, table)
    label = f"{schema}.{rel}"
    cols = {
        r[0]: (r[1], int(r[2]), bool(r[3]), r[4], int(r[5]))
        for r in conn.execute(
            "SELECT a.attname, t.typname, a.atttypmod, a.attnotnull, format_type(a.atttypid, a.atttypmod),"
            " a.attnum FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            [oid],
        ).fetchall()
    }
    for role in ROLES:
        col = columns.get(role)
        if col is None and role in ("metadata", "doc_id"):
            continue
        if col not in cols:
            flag = role.replace("_", "-")
            raise _fail(
                name,
                f"{label} has no column {col!r} for the {role} (its columns: {', '.join(cols)}): "
                f"pass --{flag}-column NAME",
            )
    emb = str(columns["embedding"])
    typ, typmod, not_null, shown, attnum = cols[emb]
    if typ != "vector":
        raise _fail(
            name,
            f"{label}.{emb} is {shown}, not a pgvector vector(N): pass --embedding-column with the vector "
            "column (halfvec/sparsevec are not supported)",
        )
    if typmod < 1:
        raise _fail(
            name,
            f"{label}.{emb} is a vector without a dimension: declare it "
            f"(ALTER TABLE {label} ALTER COLUMN {emb} TYPE vector(N)); rag never alters an attached table",
        )
    if embed_dim is not None and typmod != embed_dim:
        raise _fail(
            name,
            f"{label}.{emb} holds {typmod}-dimension vectors but the embedding model produces {embed_dim}: "
            f"set RAG_EMBEDDING_MODEL to the model that filled the table, or `rag detach {name}`",
        )
    meta = columns.get("metadata")
    if meta is not None and cols[meta][0] != "jsonb":
        raise _fail(
            name, f"{label}.{meta} is {cols[meta][3]}; the metadata column must be jsonb: leave it out"
        )
    indexes = conn.execute(
        "SELECT i.relname, am.amname, opc.opcname FROM pg_index x "
        "JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_am am ON am.oid = i.relam "
        "JOIN pg_opclass opc ON opc.oid = x.indclass[0] "
        "WHERE x.indrelid = %s AND x.indnatts = 1 AND x.indkey[0] = %s AND x.indpred IS NULL "
        "AND x.indisvalid AND am.amname = 'hnsw' ORDER BY i.relname",
        [oid, attnum],
    ).fetchall()
    usable = [(idx, _OPCLASS_DISTANCE[opc]) for idx, _, opc in indexes if opc in _OPCLASS_DISTANCE]
    warnings: list[str] = []
    index: str | None = None
    if distance is None:
        distance_from = "index" if usable else "default"
        distance = usable[0][1] if usable else "cosine"
        index = usable[0][0] if usable else None
    else:
        distance_from = "given"
        match = [idx for idx, d in usable if d == distance]
        if usable and not match:
            idx, d = usable[0]
            raise _fail(
                name,
                f"distance {distance!r} does not match the HNSW index {idx} on {label}.{emb} ({d}): attach "
                f"with --distance {d} (or leave --distance out), or create an index for {distance}: "
                f"{create_index_sql(conn, schema, rel, emb, distance)}",
            )
        index = match[0] if match else None
    if index is None:
        warnings.append(
            f"attached collection {name!r}: {label}.{emb} has no HNSW index for {distance}, so every search "
            "is an exact scan of the table: create one with "
            + create_index_sql(conn, schema, rel, emb, distance)
        )
    rows = int(
        conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, rel))).fetchone()[0]
    )
    if rows == 0:
        warnings.append(f"attached collection {name!r}: {label} has no rows yet")
    found = detect(
        conn,
        oid=oid,
        schema=schema,
        label=label,
        columns={c: (v[0], v[4]) for c, v in cols.items()},
        content_column=str(columns["content"]),
        lexical_column=lexical_column,
        default_config=text_search_config,
    )
    if found.problem:
        raise _fail(name, found.problem)
    if found.warning:
        warnings.append(f"attached collection {name!r}: {found.warning}")
    notices = [dense_only_notice(name, label, found.notice)] if found.notice else []
    mapping = {role: columns.get(role) for role in ROLES}
    types = {role: cols[c][0] for role, c in mapping.items() if c is not None}
    spec = {
        "schema": schema,
        "table": rel,
        "columns": mapping,
        "types": types,
        "distance": distance,
        "distance_from": distance_from,
        "not_null": not_null,
    }
    lexical = found.lexical.as_json() if found.lexical else None
    if lexical_column is not None:
        spec["lexical_column"] = lexical_column
    report = AttachReport(
        name, label, mapping, distance, distance_from, typmod, rows, index, warnings, lexical, notices
    )
    return report, spec


def create_index_sql(conn: psycopg.Connection, schema: str, table: str, column: str, distance: str) -> str:
    return (
        sql.SQL("CREATE INDEX ON {} USING hnsw ({} {});")
        .format(sql.Identifier(schema, table), sql.Identifier(column), sql.SQL(DISTANCES[distance][1]))
        .as_string(conn)
    )


def target_from_row(row: tuple[Any, ...]) -> Target:
    """A ``Target`` from a registry row (``schema.REGISTRY_COLUMNS``): owned or attached."""
    name, kind, dim, _model, attached, _created, lexical, index_type = row
    lex = LexicalIndex.from_json(lexical)
    if kind != "attached":
        return owned_target(name, int(dim), lex, index_type or "hnsw")
    a = attached
    types = a["types"]

    def col(role: str) -> sql.Composable:
        ident = sql.Identifier(a["columns"][role])
        return ident if types[role] in _TEXT_TYPES else sql.SQL("{}::text").format(ident)

    mapping = a["columns"]
    columns: dict[str, sql.Composable] = {
        "id": col("id"),
        "doc_id": col("doc_id") if mapping.get("doc_id") else col("id"),
        "source": col("source"),
        "chunk_index": sql.SQL("0"),
        "content": col("content"),
        "embedding": sql.Identifier(mapping["embedding"]),
    }
    if mapping.get("metadata"):
        columns["metadata"] = sql.Identifier(mapping["metadata"])
    return Target(
        name,
        "attached",
        sql.Identifier(a["schema"], a["table"]),
        f"{a['schema']}.{a['table']}",
        int(dim),
        a["distance"],
        columns,
        not_null=bool(a.get("not_null", True)),
        info=a,
        lexical=lex,
    )


# What a search of an attached table meets when the table changed under it after attaching.
BROKEN = (
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedColumn,
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.DataException,
    psycopg.errors.UndefinedObject,  # its BM25 index was dropped
)


def table_changed(t: Target, err: BaseException) -> ConfigError:
    text = (str(err).strip().splitlines() or [repr(err)])[0]
    return _fail(
        t.name,
        f"searching {t.label} failed ({text}): the table changed since it was attached; fix it, re-attach "
        f"(`rag attach {t.name} --table {t.label} ...`) or `rag detach {t.name}`",
    )


def dense_only_notice(name: str, label: str, why: str | None = None) -> str:
    """The one line that says an attached collection is searched dense only."""
    return f"attached collection {name!r}: " + (
        why
        or f"{label} has no lexical index recorded, so it is searched dense only (attach it again to find "
        "a BM25 index or tsvector column, or name one with --lexical-column)"
    )


def missing(collection: str) -> CollectionError:
    return CollectionError(
        f"collection {collection!r} does not exist: ingest into it first "
        f"(`rag ingest --collection {collection} PATH` or `rag ingest --demo`), or attach an existing table "
        f"(`rag attach {collection} --table TABLE`)"
    )
