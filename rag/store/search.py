"""Dense search, with filters, that returns exactly ``k`` rows whenever ``k`` rows match.

One search policy for both stores: ``plan_search`` is a generator that *yields* the statements it needs
(``Step``) and receives their rows; ``Store`` and ``AsyncStore`` drive it over a sync or async connection.
Every search runs in one read-only transaction. ``rag.store.hybrid`` plans the lexical and hybrid modes with
the same parts (the dense side of a hybrid search follows these strategies too).

Strategies (``SearchHits.strategy``, so callers can report which one ran):

=================== =========================================================================================
``hnsw``            the HNSW index; ``hnsw.ef_search`` = max(ef_search_min, k, k x factor) (at most 1000),
                    since pgvector's default of 40 would cap ``LIMIT 100`` at 40 rows
``hnsw+iterative``  a filtered search on the HNSW index with pgvector 0.8's iterative scan
                    (``hnsw.iterative_scan = relaxed_order``; the rows are re-sorted by distance), which keeps
                    scanning the graph until ``k`` rows pass the filter (or ``hnsw.max_scan_tuples``);
                    ef_search is multiplied by ``filtered_ef_factor`` (default 2) for the recall it loses
``exact``           an exact scan (the query behind an ``OFFSET 0`` fence, so the planner cannot order it by
                    the ANN index: filters still use their indexes): asked for (``exact=True``); what the
                    planner chose because the filter
                    is selective enough to make it cheaper (a btree / GIN index scan of the matching rows,
                    then a top-k sort); or a filtered query for which the planner estimates at most
                    ``EXACT_ROWS_PER_K`` (120) x k matching rows, where the iterative scan costs about as
                    much and loses recall (measured: 5 % of 200k rows, k=100)
``...->exact``      the index path returned fewer than ``k`` rows (a filter more selective than the
                    iterative scan's budget, a server without iterative scans, a collection under ``k``
                    rows): the exact scan ran after it, so the answer still has ``min(k, matches)`` rows
=================== =========================================================================================

The planner's choice is read with ``EXPLAIN`` before the query runs (an index scan ordered by the distance
operator is the approximate path; anything else is exact, e.g. a sequential scan of a table too small for
the index to pay, or of an attached table without one), so ``strategy`` is what ran, not what was hoped
for. ``plan_cache_mode = force_custom_plan`` keeps every query planned with its own filter values, even once
psycopg prepares it.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psycopg import sql

from rag.errors import DimensionMismatch, InvalidInput
from rag.store.filters import SearchFilter
from rag.store.indexes import ann_order, candidates, is_hnsw
from rag.store.lexical import LexicalIndex
from rag.validation import validate_collection_name

__all__ = [
    "DISTANCES",
    "EXACT_ROWS_PER_K",
    "MAX_EF_SEARCH",
    "SearchHits",
    "Step",
    "Target",
    "ann_scan_rows",
    "ann_strategy",
    "check_k",
    "check_vector",
    "dense_select",
    "ef_search",
    "hits_from_rows",
    "index_scanned",
    "owned_target",
    "plan_search",
    "row_columns",
    "settings_step",
    "uses_ann_index",
    "where",
]

MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search
# A filtered query runs exactly when the planner estimates at most this many matching rows per row asked for
EXACT_ROWS_PER_K = 120

# distance -> (operator, HNSW operator class). dense_score: cosine 1 - d; l2 -d; ip -d (= the inner product).
DISTANCES: dict[str, tuple[str, str]] = {
    "cosine": ("<=>", "vector_cosine_ops"),
    "l2": ("<->", "vector_l2_ops"),
    "ip": ("<#>", "vector_ip_ops"),
}


class SearchHits(list[dict[str, Any]]):
    """The search result: a list of hit dicts, best first, plus ``strategy`` (which path ran)."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), strategy: str = "hnsw") -> None:
        super().__init__(rows)
        self.strategy = strategy

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (Ray) with its strategy
        return (SearchHits, (list(self), self.strategy))

    def __repr__(self) -> str:
        return f"SearchHits({list.__repr__(self)}, strategy={self.strategy!r})"


@dataclass(frozen=True)
class Target:
    """Where a collection's rows are and how its columns map onto a hit's keys.

    ``columns`` maps ``id``, ``doc_id``, ``source``, ``chunk_index``, ``content``, ``metadata`` (absent
    when the table has none) and ``embedding`` to SQL expressions. Owned collections and attached tables
    both become a ``Target``; search does not care which it has.
    """

    name: str
    kind: str  # "owned" | "attached"
    table: sql.Composable
    label: str  # the table's name, for messages
    dim: int
    distance: str
    columns: Mapping[str, sql.Composable]
    not_null: bool = True  # the embedding column is NOT NULL (else NULL rows are filtered out)
    info: Mapping[str, Any] = field(default_factory=dict)
    lexical: LexicalIndex | None = None  # None: dense only
    index: str = "hnsw"  # rag.store.indexes.INDEX_TYPES (an attached table: its own HNSW index)


def owned_target(name: str, dim: int, lexical: LexicalIndex | None = None, index: str = "hnsw") -> Target:
    validate_collection_name(name)
    cols = {c: sql.Identifier(c) for c in ("id", "doc_id", "source", "chunk_index", "content", "metadata")}
    cols["embedding"] = sql.Identifier("embedding")
    return Target(
        name,
        "owned",
        sql.Identifier(f"rag_chunks_{name}"),
        f"rag_chunks_{name}",
        dim,
        "cosine",
        cols,
        lexical=lexical,
        index=index,
    )


@dataclass(frozen=True)
class Step:
    query: sql.Composable | str
    params: Sequence[Any] = ()
    fetch: bool = True


def ef_search(k: int, floor: int, factor: float, filtered_factor: float = 1.0) -> int:
    """hnsw.ef_search for a query of ``k``: at least k (else pgvector returns fewer rows), times a margin;
    times ``filtered_factor`` for a filtered query (an iterative scan loses recall at the same ef)."""
    return min(MAX_EF_SEARCH, int(max(floor, k, int(k * factor)) * filtered_factor))


def check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > MAX_EF_SEARCH:
        raise InvalidInput(f"k must be an integer between 1 and {MAX_EF_SEARCH}, got {k!r}")


def check_vector(vec: np.ndarray, dim: int, collection: str) -> np.ndarray:
    v = np.asarray(vec, dtype=np.float32).reshape(-1)
    if v.shape[0] != dim:
        raise DimensionMismatch(
            f"collection {collection!r} stores {dim}-dimension vectors but got a {v.shape[0]}-dimension "
            "query vector: query with the embedding model the collection was built with, or ingest into "
            "another --collection"
        )
    return v


def row_columns(t: Target) -> sql.Composable:
    """``id, doc_id, source, chunk_index, content, metadata`` of a hit, then ``{embedding} {op} %s AS
    distance`` (the query vector is its one parameter)."""
    c = t.columns
    return sql.SQL(
        "{id} AS id, {doc_id} AS doc_id, coalesce({source}, '') AS source, {chunk_index} AS chunk_index,"
        " coalesce({content}, '') AS content, {meta} AS metadata, {emb} {op} %s AS distance"
    ).format(
        id=c["id"],
        doc_id=c["doc_id"],
        source=c["source"],
        chunk_index=c["chunk_index"],
        content=c["content"],
        meta=c.get("metadata", sql.SQL("'{}'::jsonb")),
        emb=c["embedding"],
        op=sql.SQL(DISTANCES[t.distance][0]),
    )


def where(
    t: Target,
    filt: SearchFilter | None,
    *,
    dense: bool = True,
    extra: tuple[sql.Composable, list[Any]] | None = None,
) -> tuple[sql.Composable, list[Any]]:
    """`` WHERE ...`` (or nothing) for ``filt`` and an ``extra`` condition, and their parameters;
    ``dense``: rows need an embedding."""
    conds: list[sql.Composable] = []
    params: list[Any] = []
    if dense and not t.not_null:
        conds.append(sql.SQL("{} IS NOT NULL").format(t.columns["embedding"]))
    if filt is not None:
        cond, params = filt.to_sql(t.columns)
        conds.append(cond)
    if extra is not None:
        conds.append(extra[0])
        params = [*params, *extra[1]]
    return (sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")), params


def dense_select(
    t: Target,
    filt: SearchFilter | None,
    vector: np.ndarray,
    limit: int,
    *,
    exact: bool = False,
    rerank_factor: float = 1.0,
) -> tuple[sql.Composable, list[Any]]:
    """The dense query of ``limit`` rows, ``... ORDER BY distance LIMIT %s``, and all its parameters.
    ``exact``: behind an ``OFFSET 0`` fence, which keeps the planner from ordering by the ANN index (an exact
    top-k; filters still use their own indexes). An index type other than ``hnsw`` orders its candidates by
    its own expression (``rag.store.indexes.ann_order``; ``k x rerank_factor`` of them for ``binary``) in a
    subquery, which the outer query sorts by the full-precision distance."""
    cond, params = where(t, filt)
    inner = sql.SQL("SELECT {} FROM {}{}").format(row_columns(t), t.table, cond)
    if exact or t.index == "hnsw":
        if exact:
            inner = sql.SQL("SELECT * FROM ({} OFFSET 0) AS fenced").format(inner)
        return inner + sql.SQL(" ORDER BY distance LIMIT %s"), [vector, *params, limit]
    order = ann_order(t.index, t.columns["embedding"], t.dim, t.distance)
    q = sql.SQL("SELECT * FROM ({} ORDER BY {} LIMIT %s) AS candidates ORDER BY distance, 1 LIMIT %s").format(
        inner, order
    )
    return q, [vector, *params, vector, candidates(t.index, limit, rerank_factor), limit]


def _resorted(inner: sql.Composable) -> sql.Composable:
    # relaxed_order may return rows slightly out of order; a materialized CTE sorts them exactly.
    return sql.SQL("WITH hits AS MATERIALIZED ({}) SELECT * FROM hits ORDER BY distance, 1").format(inner)


def ann_scan_rows(plan: Any, skip_index: str | None = None) -> float | None:
    """In an ``EXPLAIN (FORMAT JSON)`` plan, the estimated rows of the index scan ordered by a distance
    (HNSW/IVF), i.e. how many rows the planner thinks pass the filter; None when no such scan is planned.
    ``skip_index``: an ordered index scan that is not the ANN one (a hybrid plan's BM25 scan)."""
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if (
                "Index" in str(node.get("Node Type", ""))
                and node.get("Order By")
                and (skip_index is None or node.get("Index Name") != skip_index)
            ):
                return float(node.get("Plan Rows", 0.0))
            stack.extend(v for v in node.values() if isinstance(v, list | dict))
    return None


def index_scanned(plan: Any, index: str) -> bool:
    """Whether an ``EXPLAIN (FORMAT JSON)`` plan scans the index named ``index``."""
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if node.get("Index Name") == index and "Index" in str(node.get("Node Type", "")):
                return True
            stack.extend(v for v in node.values() if isinstance(v, list | dict))
    return False


def uses_ann_index(plan: Any) -> bool:
    """Whether an ``EXPLAIN (FORMAT JSON)`` plan contains an index scan ordered by a distance (HNSW/IVF)."""
    return ann_scan_rows(plan) is not None


def hits_from_rows(t: Target, rows: Sequence[Sequence[Any]], strategy: str) -> SearchHits:
    """Hit dicts from ``id, doc_id, source, chunk_index, content, metadata, distance`` rows; a lexical or
    hybrid row adds ``lexical_rank`` and ``fused_score`` (see ``rag.store.hybrid``). ``dense_score`` is None
    for a row without an embedding (an attached table's NULL), found by the lexical side."""
    if t.distance == "cosine":

        def score(d: float | None) -> float | None:
            return None if d is None else 1.0 - float(d)
    else:

        def score(d: float | None) -> float | None:
            return None if d is None else -float(d)

    def hit(r: Sequence[Any]) -> dict[str, Any]:
        h = {
            "id": r[0],
            "doc_id": r[1],
            "source": r[2],
            "chunk_index": r[3],
            "content": r[4],
            "metadata": r[5] or {},
            "dense_score": score(r[6]),
        }
        if len(r) > 7:
            h["lexical_rank"] = None if r[7] is None else int(r[7])
            h["fused_score"] = float(r[8])
        return h

    return SearchHits((hit(r) for r in rows), strategy)


def settings_step(ef: int, *, filtered: bool, iterative: bool, index: str = "hnsw") -> Step:
    """``set_config`` for this transaction: custom plans, and the index's query-time knobs. HNSW types:
    ef_search, the iterative scan when filtered (always for ``binary``, whose candidates may outnumber
    ef_search). DiskANN: ``diskann.query_search_list_size`` and ``diskann.query_rescore`` = ``ef`` (every
    candidate in the search list is re-scored by its full vector, so ``ef`` plays the part of a re-rank
    depth); its scan is streaming, so a filter needs nothing more."""
    settings = [("plan_cache_mode", "force_custom_plan")]
    if is_hnsw(index):
        if filtered and not iterative:
            ef = MAX_EF_SEARCH  # post-filtering: as many candidates as pgvector allows
        settings.append(("hnsw.ef_search", str(ef)))
        if iterative and (filtered or index == "binary"):
            settings.append(("hnsw.iterative_scan", "relaxed_order"))
    else:
        settings.append(("diskann.query_search_list_size", str(ef)))
        settings.append(("diskann.query_rescore", str(ef)))
    return Step(
        sql.SQL("SELECT ")
        + sql.SQL(", ").join(
            sql.SQL("set_config({}, {}, true)").format(sql.Literal(n), sql.Literal(v)) for n, v in settings
        )
    )


def ann_strategy(t: Target, *, filtered: bool, iterative: bool) -> str:
    """The strategy name of an index path: the index type, ``+iterative`` for a filtered HNSW scan."""
    return t.index + ("+iterative" if filtered and iterative and is_hnsw(t.index) else "")


def plan_search(
    t: Target,
    vector: np.ndarray,
    k: int,
    filt: SearchFilter | None,
    *,
    exact: bool,
    ef: int,
    iterative: bool,
    exact_rows_per_k: float = EXACT_ROWS_PER_K,
    rerank_factor: float = 1.0,
) -> Generator[Step, Any, SearchHits]:
    """The dense policy (see the module docstring), inside a read-only transaction the caller began; send
    each step's rows (``None`` for non-fetching). ``ef``: the HNSW ef_search (DiskANN's search list size)."""
    query, params = dense_select(t, filt, vector, k, rerank_factor=rerank_factor)
    exact_query, exact_params = dense_select(t, filt, vector, k, exact=True)
    yield settings_step(ef, filtered=filt is not None, iterative=iterative, index=t.index)
    if exact:
        rows = yield Step(exact_query, exact_params)
        return hits_from_rows(t, rows, "exact")
    full = _resorted(query) if iterative and filt is not None and t.index == "hnsw" else query
    plan = yield Step(sql.SQL("EXPLAIN (FORMAT JSON) ") + full, params)
    estimate = ann_scan_rows(plan[0][0] if plan else None)
    if estimate is None:
        rows = yield Step(full, params)
        return hits_from_rows(t, rows, "exact")  # the planner chose an exact scan: complete by construction
    if filt is not None and estimate <= exact_rows_per_k * k:
        # few enough matching rows (the planner's estimate) that an exact scan costs about what the
        # iterative scan does, at full recall (docs/BENCHMARKS.md, filtered search)
        rows = yield Step(exact_query, exact_params)
        return hits_from_rows(t, rows, "exact")
    rows = yield Step(full, params)
    strategy = ann_strategy(t, filtered=filt is not None, iterative=iterative)
    if len(rows) >= k:
        return hits_from_rows(t, rows, strategy)
    rows = yield Step(exact_query, exact_params)
    return hits_from_rows(t, rows, strategy + "->exact")
