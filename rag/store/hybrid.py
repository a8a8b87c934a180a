"""Lexical and hybrid search: BM25 or full-text search alone, or fused with dense search in one statement.

``plan`` picks the policy for a mode; each is a generator of ``Step``s like ``rag.store.search.plan_search``.

=========== ==========================================================================================
``dense``   ``plan_search``: pgvector alone (strategies ``hnsw``, ``hnsw+iterative``, ``exact``, ...)
``lexical`` the lexical side alone: BM25 (``bm25``) or full-text search (``fts``), under the filter; the
            rows that hold a query term, best first, at most k. With BM25 the plan is read first (EXPLAIN):
            where the planner scores rows outside the BM25 index (a selective filter's own index), rows
            without a term score 0 and are dropped (strategy ``bm25-scored``)
``hybrid``  one statement: a subquery takes the dense top-N, another the lexical top-N (both under the
            filter), and a full join fuses them by reciprocal rank fusion, ``sum(weight / (rrf_k +
            rank))`` over the sides that returned a row, cut to k. N = max(depth_min, k x depth_factor), at
            most 1000. (Subqueries, not CTEs: pg_textsearch reads the scores off its index scan only where
            the scan is in the main plan, and re-scores every row of a CTE.)
            The dense side follows ``plan_search``'s strategies (EXPLAIN first; exact when the filter is
            selective; re-run exact when the index path returned fewer than N), so a hybrid search has k
            rows whenever k rows match the filter. ``strategy``: ``hybrid(<dense>, <bm25|fts>)``.
=========== ==========================================================================================

A collection without a lexical index (an attached table without one) searches ``hybrid`` as ``dense``, and
refuses ``lexical`` with InvalidInput naming the fix.

Hit keys beyond the dense ones (lexical and hybrid modes only): ``lexical_rank``, the row's rank on the
lexical side (1 = best; None when only the dense side returned it), and ``fused_score``, the RRF score the
rows are ordered by (lexical mode: the lexical side's term alone). ``dense_score`` stays the similarity of
the row's embedding to the query, whichever side found it. Only ranks leave the BM25 side: selecting the
``<@>`` value would score each row again outside the index (docs/BENCHMARKS.md, hybrid search).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
from psycopg import sql

from rag.errors import InvalidInput
from rag.store.filters import SearchFilter
from rag.store.indexes import candidates
from rag.store.lexical import LexicalIndex
from rag.store.search import (
    EXACT_ROWS_PER_K,
    MAX_EF_SEARCH,
    SearchHits,
    Step,
    Target,
    ann_scan_rows,
    ann_strategy,
    dense_select,
    hits_from_rows,
    index_scanned,
    plan_search,
    row_columns,
    settings_step,
    where,
)

__all__ = ["Fusion", "lexical_rows", "plan", "plan_hybrid", "plan_lexical"]

MAX_DEPTH = MAX_EF_SEARCH


@dataclass(frozen=True)
class Fusion:
    """Reciprocal rank fusion's settings (``Settings.fusion_*``)."""

    k: int = 60
    dense_weight: float = 1.0
    lexical_weight: float = 1.0
    depth_factor: float = 2.0
    depth_min: int = 50

    def depth(self, k: int) -> int:
        """Rows each side fetches for a hybrid search of ``k``."""
        return min(MAX_DEPTH, max(k, self.depth_min, math.ceil(k * self.depth_factor)))

    def term(self, weight: float, rank: sql.Composable) -> sql.Composable:
        """``weight / (k + rank)``, 0 where ``rank`` is NULL."""
        return sql.SQL("coalesce({} / ({} + {}), 0)").format(
            sql.Literal(float(weight)), sql.Literal(float(self.k)), rank
        )


def _or_query(lex: LexicalIndex) -> sql.Composable:
    """The query's lexemes joined by OR, where ``plainto_tsquery`` joins them by AND (``&``) and phrase
    operators (``<->``, ``<N>``); its text output quotes every lexeme, so only operators match. Parameter:
    the query text."""
    return sql.SQL(
        "(SELECT regexp_replace(plainto_tsquery({}::regconfig, %s)::text, ' (&|<->|<[0-9]+>) ', ' | ', 'g')"
        "::tsquery)"
    ).format(sql.Literal(lex.config))


def lexical_rows(
    t: Target,
    lex: LexicalIndex,
    filt: SearchFilter | None,
    vector: np.ndarray,
    text: str,
    limit: int,
    *,
    scored: bool = False,
) -> tuple[sql.Composable, list[Any]]:
    """The lexical side as a query of at most ``limit`` rows holding a query term, best first: the hit
    columns, ``distance`` and their rank ``r``; and its parameters.

    BM25 (a derived table, never a CTE: pg_textsearch takes the scores from its index scan only where it can
    see the ``ORDER BY`` in the plan): without ``scored`` the index orders the rows and no score is read
    (every row the index returns holds a term); ``scored`` selects the score and drops rows without a term,
    for a plan that scores rows found another way (a selective filter's index: rows without a term score 0).
    """
    col = sql.Identifier(lex.column)
    cols = row_columns(t)
    if lex.method == "bm25":
        cond, fparams = where(t, filt, dense=False)
        score = sql.SQL("{} <@> to_bm25query(%s, %s)").format(col)
        if not scored:
            inner = sql.SQL("SELECT {} FROM {}{} ORDER BY {} LIMIT %s").format(cols, t.table, cond, score)
            q = sql.SQL("SELECT *, row_number() OVER () AS r FROM ({}) AS lexical_rows").format(inner)
            return q, [vector, *fparams, text, lex.index, limit]
        inner = sql.SQL("SELECT {}, {} AS s FROM {}{} ORDER BY s, id LIMIT %s").format(
            cols, score, t.table, cond
        )
        q = sql.SQL(
            "SELECT *, row_number() OVER (ORDER BY s, id) AS r FROM ({}) AS lexical_rows WHERE s < 0"
        ).format(inner)
        return q, [vector, text, lex.index, *fparams, limit]
    orq = _or_query(lex)
    cond, fparams = where(t, filt, dense=False, extra=(sql.SQL("{} @@ {}").format(col, orq), [text]))
    inner = sql.SQL("SELECT {}, ts_rank({}, {}, 1) AS s FROM {}{} ORDER BY s DESC, id LIMIT %s").format(
        cols, col, orq, t.table, cond
    )
    q = sql.SQL("SELECT *, row_number() OVER (ORDER BY s DESC, id) AS r FROM ({}) AS lexical_rows").format(
        inner
    )
    return q, [vector, text, *fparams, limit]


_COLS = ("id", "doc_id", "source", "chunk_index", "content", "metadata", "distance")


def _fused(
    t: Target,
    lex: LexicalIndex,
    filt: SearchFilter | None,
    vector: np.ndarray,
    text: str,
    k: int,
    depth: int,
    fusion: Fusion,
    *,
    exact: bool,
    scored: bool,
    rerank_factor: float = 1.0,
) -> tuple[sql.Composable, list[Any]]:
    """The hybrid statement: both sides' top ``depth`` as derived tables, fused by RRF, cut to ``k``; the
    last column is how many rows the dense side returned."""
    dense, dparams = dense_select(t, filt, vector, depth, exact=exact, rerank_factor=rerank_factor)
    lexq, lparams = lexical_rows(t, lex, filt, vector, text, depth, scored=scored)
    cols = sql.SQL(", ").join(sql.SQL("coalesce(d.{c}, l.{c})").format(c=sql.Identifier(c)) for c in _COLS)
    q = sql.SQL(
        "SELECT {cols}, l.r, {fused} AS fused, max(d.n) OVER () AS n_dense FROM"
        " (SELECT *, row_number() OVER (ORDER BY distance, id) AS r, count(*) OVER () AS n"
        " FROM ({dense}) AS dense_rows) AS d"
        " FULL JOIN ({lex}) AS l ON d.id = l.id"
        " ORDER BY fused DESC, d.r NULLS LAST, l.r NULLS LAST LIMIT %s"
    ).format(
        dense=dense,
        lex=lexq,
        cols=cols,
        fused=fusion.term(fusion.dense_weight, sql.SQL("d.r"))
        + sql.SQL(" + ")
        + fusion.term(fusion.lexical_weight, sql.SQL("l.r")),
    )
    return q, [*dparams, *lparams, k]


def _bm25_index(lex: LexicalIndex) -> str | None:
    """The BM25 index's name as EXPLAIN shows it (unqualified), None for FTS."""
    if lex.method != "bm25" or not lex.index:
        return None
    return lex.index.rsplit(".", 1)[-1].strip('"')


def _label(lex: LexicalIndex, scored: bool) -> str:
    """The lexical side's strategy: ``bm25`` (the index orders the rows), ``bm25-scored`` (rows found by
    another path, scored one by one), ``fts``."""
    return f"{lex.method}-scored" if scored else lex.method


def _scored(lex: LexicalIndex, plan: Any) -> bool:
    """Whether the planner scores BM25 rows outside the index (then rows without a term must be dropped)."""
    name = _bm25_index(lex)
    return name is not None and not index_scanned(plan, name)


def plan_lexical(
    t: Target, vector: np.ndarray, text: str, k: int, filt: SearchFilter | None, fusion: Fusion
) -> Generator[Step, Any, SearchHits]:
    """The lexical side alone: at most ``k`` rows holding a query term, best first."""
    lex = _lexical(t)

    def query(scored: bool) -> tuple[sql.Composable, list[Any]]:
        rows, params = lexical_rows(t, lex, filt, vector, text, k, scored=scored)
        q = sql.SQL("SELECT {}, r, {} FROM ({}) AS l ORDER BY r").format(
            sql.SQL(", ").join(map(sql.Identifier, _COLS)),
            fusion.term(fusion.lexical_weight, sql.SQL("r")),
            rows,
        )
        return q, params

    yield Step("SELECT set_config('plan_cache_mode', 'force_custom_plan', true)")
    q, params = query(False)
    scored = False
    if lex.method == "bm25":
        plan = yield Step(sql.SQL("EXPLAIN (FORMAT JSON) ") + q, params)
        scored = _scored(lex, plan[0][0] if plan else None)
        if scored:
            q, params = query(True)
    rows = yield Step(q, params)
    return hits_from_rows(t, rows, _label(lex, scored))


def plan_hybrid(
    t: Target,
    vector: np.ndarray,
    text: str,
    k: int,
    filt: SearchFilter | None,
    fusion: Fusion,
    *,
    exact: bool,
    ef: Callable[[int], int],
    iterative: bool,
    exact_rows_per_k: float = EXACT_ROWS_PER_K,
    rerank_factor: float = 1.0,
) -> Generator[Step, Any, SearchHits]:
    """Dense and lexical top-N fused by RRF, in one statement (see the module docstring); ``ef``: the
    ef_search of a dense search of N rows."""
    lex = _lexical(t)
    depth = fusion.depth(k)

    def fused(exact_dense: bool, scored: bool) -> tuple[sql.Composable, list[Any]]:
        return _fused(
            t,
            lex,
            filt,
            vector,
            text,
            k,
            depth,
            fusion,
            exact=exact_dense,
            scored=scored,
            rerank_factor=rerank_factor,
        )

    n = candidates(t.index, depth, rerank_factor)
    yield settings_step(ef(n), filtered=filt is not None, iterative=iterative, index=t.index)
    q, params = fused(exact, False)
    plan = yield Step(sql.SQL("EXPLAIN (FORMAT JSON) ") + q, params)
    tree = plan[0][0] if plan else None
    scored = _scored(lex, tree)

    def done(rows: list[Any], dense: str) -> SearchHits:
        return hits_from_rows(t, [r[:-1] for r in rows], f"hybrid({dense}, {_label(lex, scored)})")

    if exact:
        return done((yield Step(*fused(True, scored))), "exact")
    estimate = ann_scan_rows(tree, skip_index=_bm25_index(lex))
    if estimate is None:
        return done((yield Step(*fused(False, scored))), "exact")
    if filt is not None and estimate <= exact_rows_per_k * depth:
        return done((yield Step(*fused(True, scored))), "exact")
    rows = yield Step(*fused(False, scored))
    dense = ann_strategy(t, filtered=filt is not None, iterative=iterative)
    if rows and (rows[0][-1] or 0) >= depth:
        return done(rows, dense)
    return done((yield Step(*fused(True, scored))), dense + "->exact")


def _lexical(t: Target) -> LexicalIndex:
    if t.lexical is None:
        raise InvalidInput(
            f"collection {t.name!r} has no lexical index ({t.label} has no BM25 index or tsvector "
            'column), so it cannot be searched with mode "lexical": use mode "dense" or "hybrid" (which is '
            f"dense here), or add one and attach the table again (`rag attach {t.name} --table {t.label} "
            "--lexical-column COL`)"
        )
    return t.lexical


def plan(
    mode: str,
    t: Target,
    vector: np.ndarray,
    k: int,
    filt: SearchFilter | None,
    *,
    text: str | None,
    fusion: Fusion,
    exact: bool,
    ef: Callable[[int], int],
    iterative: bool,
    rerank_factor: float = 1.0,
) -> Generator[Step, Any, SearchHits]:
    """The policy of ``mode`` for one search (``hybrid`` without a lexical index is ``dense``); ``ef``: the
    ef_search of a dense search of a given number of rows; ``rerank_factor``: candidates per row asked for,
    of a ``binary`` index (``rag.store.indexes.candidates``)."""
    if mode == "dense" or (mode == "hybrid" and t.lexical is None):
        n = candidates(t.index, k, rerank_factor)
        return plan_search(
            t, vector, k, filt, exact=exact, ef=ef(n), iterative=iterative, rerank_factor=rerank_factor
        )
    if text is None or not text.strip():
        raise InvalidInput(f'mode "{mode}" needs the query text: pass query=...')
    if mode == "lexical":
        return plan_lexical(t, vector, text, k, filt, fusion)
    return plan_hybrid(
        t,
        vector,
        text,
        k,
        filt,
        fusion,
        exact=exact,
        ef=ef,
        iterative=iterative,
        rerank_factor=rerank_factor,
    )
