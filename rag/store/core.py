"""What ``Store`` and ``AsyncStore`` share: configuration, the pool's arguments, and every read as a program.

A program is a generator that yields the statements it needs (``Step``) and receives their rows, as
``rag.store.search.plan_search`` does; a store runs it in one transaction with ``drive`` (``Store``) or
``await adrive`` (``AsyncStore``), which differ only by ``await``. So the stores hold no planning of their
own: the registry lookup, the server's capabilities, validation, the choice of policy per mode, and the
handling of an attached table that changed under a search are written once, here (the way psycopg_pool's
``BasePool`` and pgvector-python's ``register_vector_info`` serve their sync and async halves).

A program raises its validation errors before its first statement, so a bad request never takes a
connection; a program that needs no statement (a cached lookup) never takes one either.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any, TypeVar

import numpy as np

from rag.settings import DEFAULT_BINARY_RERANK_FACTOR
from rag.store.filters import SearchFilter, parse_filter
from rag.store.hybrid import Fusion, plan
from rag.store.schema import (
    LEXICAL_INFO_SQL,
    REGISTRY_COLUMNS,
    SERVER_INFO_SQL,
    lexical_info_from_row,
    server_info_from_row,
)
from rag.store.search import SearchHits, Step, Target, check_k, check_vector, ef_search
from rag.store.tables import BROKEN, dense_only_notice, missing, table_changed, target_from_row
from rag.validation import check_mode, check_text, validate_collection_name

__all__ = ["Program", "StoreCore"]

T = TypeVar("T")
Program = Generator[Step, Any, T]


class StoreCore:
    """Configuration and programs of a store (see the module docstring). ``fusion``: hybrid's RRF."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        timeout_s: float = 5.0,
        ef_search_min: int = 40,
        ef_search_factor: float = 1.5,
        filtered_ef_factor: float = 2.0,
        fusion: Fusion | None = None,
        binary_rerank_factor: float = DEFAULT_BINARY_RERANK_FACTOR,
    ) -> None:
        self.url = url
        self.min_size, self.max_size, self.timeout_s = min_size, max_size, timeout_s
        self.ef_search_min = ef_search_min
        self.ef_search_factor = ef_search_factor
        self.filtered_ef_factor = filtered_ef_factor
        self.fusion = fusion or Fusion()
        self.binary_rerank_factor = binary_rerank_factor  # candidates per row of a ``binary`` index
        self._targets: dict[str, Target] = {}
        self._server: dict[str, Any] | None = None
        self._lexical: dict[str, Any] | None = None

    def pool_kwargs(self, name: str) -> dict[str, Any]:
        """Arguments of ``ConnectionPool`` / ``AsyncConnectionPool`` (the store opens it, not creation)."""
        return {
            "conninfo": self.url,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "timeout": self.timeout_s,
            "kwargs": {"connect_timeout": max(1, int(self.timeout_s))},
            "open": False,
            "name": name,
        }

    # -- programs ----------------------------------------------------------------------------------
    def target_program(self, collection: str) -> Program[Target]:
        """Where ``collection`` lives (owned or attached), cached; CollectionError if it does not exist."""
        t = self._targets.get(collection)
        if t is not None:
            return t
        validate_collection_name(collection)
        rows = yield Step(f"SELECT {REGISTRY_COLUMNS} FROM rag_collections WHERE name = %s", [collection])
        if not rows:
            raise missing(collection)
        self._targets[collection] = t = target_from_row(rows[0])
        return t

    def server_program(self) -> Program[dict[str, Any]]:
        """``{"postgresql": "18.6", "pgvector": "0.8.1", "iterative_scan": True}``, cached."""
        if self._server is None:
            rows = yield Step(SERVER_INFO_SQL)
            self._server = server_info_from_row(rows[0])
        return dict(self._server)

    def lexical_program(self) -> Program[dict[str, Any]]:
        """``{"lexical": "bm25" | "fts", "pg_textsearch": "1.0.0" | None}``: the server's offer, cached."""
        if self._lexical is None:
            rows = yield Step(LEXICAL_INFO_SQL)
            self._lexical = lexical_info_from_row(rows[0])
        return dict(self._lexical)

    def notices_program(self) -> Program[list[str]]:
        """One line per attached collection without a lexical index (searched dense only)."""
        rows = yield Step(
            "SELECT name, attached FROM rag_collections"
            " WHERE kind = 'attached' AND lexical IS NULL ORDER BY name"
        )
        return [dense_only_notice(name, f"{a['schema']}.{a['table']}") for name, a in rows]

    def index_types_program(self) -> Program[dict[str, str]]:
        """Every collection's vector index type (``rag.store.indexes``), by name."""
        rows = yield Step("SELECT name, index_type FROM rag_collections ORDER BY name")
        return {name: index_type for name, index_type in rows}

    def ping_program(self) -> Program[None]:
        yield Step("SELECT 1")

    def search_program(
        self,
        collection: str,
        vector: np.ndarray,
        k: int,
        *,
        filter: SearchFilter | Mapping[str, Any] | None = None,
        exact: bool = False,
        query: str | None = None,
        mode: str = "dense",
    ) -> Program[SearchHits]:
        """One search (validated now, before any statement): ``k`` rows whenever ``k`` match ``filter``,
        best first; ``mode`` dense, lexical or hybrid (``rag.store.hybrid``); ``.strategy`` says which
        path ran. ``query``: the text, needed by the lexical and hybrid modes."""
        check_k(k)
        mode = check_mode(mode)
        filt = parse_filter(filter)
        if query is not None:
            check_text(query, "query")
        return self._search(collection, vector, k, filt, exact, query, mode)

    def _search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int,
        filt: SearchFilter | None,
        exact: bool,
        query: str | None,
        mode: str,
    ) -> Program[SearchHits]:
        yield Step("SET TRANSACTION READ ONLY", fetch=False)
        t = yield from self.target_program(collection)
        v = check_vector(vector, t.dim, collection)
        if filt is not None:
            filt.to_sql(t.columns)  # a metadata filter on a table without metadata fails here, not in SQL
        iterative = bool((yield from self.server_program())["iterative_scan"])
        factor = self.filtered_ef_factor if filt is not None else 1.0

        def ef(n: int) -> int:
            return ef_search(n, self.ef_search_min, self.ef_search_factor, factor)

        policy = plan(
            mode,
            t,
            v,
            k,
            filt,
            text=query,
            fusion=self.fusion,
            exact=exact,
            ef=ef,
            iterative=iterative,
            rerank_factor=self.binary_rerank_factor,
        )
        try:
            return (yield from policy)
        except BROKEN as e:
            if t.kind != "attached":
                raise
            self._targets.pop(collection, None)
            raise table_changed(t, e) from e
