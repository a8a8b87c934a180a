"""``AttachedTables``, the mixin of ``Store`` that attaches, detaches and re-validates attached tables.

It writes ``rag_collections`` only, never the tables themselves; the inspection is ``rag.store.tables``.
"""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from rag.errors import CollectionError
from rag.store.lexical import LexicalIndex
from rag.store.search import Target
from rag.store.tables import AttachReport, _fail, inspect_table
from rag.validation import validate_collection_name

__all__ = ["AttachedTables"]


class AttachedTables:
    """Mixin of ``Store``: attach, detach, re-validate attached tables (writes ``rag_collections`` only)."""

    connection: Any  # Callable[[], AbstractContextManager[psycopg.Connection]]
    _targets: dict[str, Target]
    text_search_config: str

    def attach(
        self,
        name: str,
        table: str,
        *,
        id_column: str = "id",
        content_column: str = "content",
        source_column: str = "source",
        embedding_column: str = "embedding",
        metadata_column: str | None = None,
        doc_id_column: str | None = None,
        distance: str | None = None,
        embed_dim: int | None = None,
        lexical_column: str | None = None,
    ) -> AttachReport:
        """Validate ``table`` and record it as collection ``name`` (re-attaching replaces the mapping).

        ``distance`` (cosine, l2, ip) defaults to the HNSW index's; ``embed_dim`` is the embedder's
        dimension, checked against the embedding column's. ``lexical_column``: the tsvector column, or the
        text column with a BM25 index, that lexical and hybrid searches use (default: found, if the table
        has one; ``report.notices`` says when it has none). Raises ``ConfigError`` naming the fix."""
        columns = {
            "id": id_column,
            "content": content_column,
            "source": source_column,
            "embedding": embedding_column,
            "metadata": metadata_column,
            "doc_id": doc_id_column,
        }
        with self.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('rag_collections'))")
            row = conn.execute("SELECT kind FROM rag_collections WHERE name = %s", [name]).fetchone()
            if row is not None and row[0] != "attached":
                raise _fail(
                    name,
                    f"{name!r} is already an owned collection (made by `rag ingest`): attach the table "
                    "under another name",
                )
            report, spec = inspect_table(
                conn,
                name,
                table,
                columns,
                distance=distance,
                embed_dim=embed_dim,
                lexical_column=lexical_column,
                text_search_config=self.text_search_config,
            )
            lexical = Jsonb(report.lexical) if report.lexical else None
            conn.execute(
                "INSERT INTO rag_collections (name, kind, dim, attached, lexical) "
                "VALUES (%s, 'attached', %s, %s, %s) ON CONFLICT (name) DO UPDATE "
                "SET dim = EXCLUDED.dim, attached = EXCLUDED.attached, lexical = EXCLUDED.lexical",
                [name, report.dim, Jsonb(spec), lexical],
            )
        self._targets.pop(name, None)
        return report

    def detach(self, name: str) -> bool:
        """Forget attached collection ``name`` (the table is not touched). False if it was not attached."""
        validate_collection_name(name)
        with self.connection() as conn, conn.transaction():
            row = conn.execute("SELECT kind FROM rag_collections WHERE name = %s", [name]).fetchone()
            if row is not None and row[0] != "attached":
                raise CollectionError(
                    f"collection {name!r} is owned, not attached: delete it with "
                    f"`rag db drop-collection {name}` if that is what you want"
                )
            cur = conn.execute("DELETE FROM rag_collections WHERE name = %s AND kind = 'attached'", [name])
        self._targets.pop(name, None)
        return cur.rowcount > 0

    def validate_attached(self, embed_dim: int) -> list[str]:
        """Re-validate every attached collection against the database and the embedder's dimension.

        Raises ``ConfigError`` (one line naming the fix) on the first hard error, e.g. a recorded lexical
        index that is gone; returns the warnings (e.g. no HNSW index, with the ``CREATE INDEX`` to run). Call
        it at service start-up, with ``dense_only_notices`` for the collections searched dense only."""
        warnings: list[str] = []
        with self.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            rows = conn.execute(
                "SELECT name, attached, lexical FROM rag_collections WHERE kind = 'attached' ORDER BY name"
            ).fetchall()
            for name, a, lexical in rows:
                recorded = LexicalIndex.from_json(lexical)
                report, _ = inspect_table(
                    conn,
                    name,
                    f"{a['schema']}.{a['table']}",
                    a["columns"],
                    distance=a["distance"],
                    embed_dim=embed_dim,
                    lexical_column=recorded.column if recorded else None,
                    text_search_config=recorded.config if recorded else self.text_search_config,
                )
                warnings.extend(report.warnings)
        self._targets.clear()
        return warnings
