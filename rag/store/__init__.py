"""pgvector: the only place with SQL. Owned collections, attached tables, dense search with filters.

=================== ============================================================================
``collections.py``  owned collections: schema, ingest writes (COPY), idempotence
``tables.py``       attached tables: column mapping, validation, never written
``attached.py``     ``AttachedTables``: attach, detach, re-validate (writes the registry only)
``search.py``       dense search with filters: exactly k rows (ef_search, iterative scans, exact)
``lexical.py``      lexical indexes: BM25 (pg_textsearch) or built-in full-text search; detection
``hybrid.py``       lexical and hybrid (RRF-fused) search plans; ``plan`` picks one per mode
``filters.py``      the filter grammar: ``parse_filter`` -> ``SearchFilter`` -> SQL parameters
``schema.py``       the ``rag_collections`` registry, migrations, server versions
``core.py``         ``StoreCore``: what both stores share; every read as a program of statements
``store.py``        ``Store`` (sync, pool, writes); ``async_store.py``: ``AsyncStore`` (search only)
``replicas.py``     ``ReplicaSet``: searches spread over hot standbys, each behind a breaker
=================== ============================================================================

The embedded server's lifecycle is ``rag.db``.
"""

from __future__ import annotations

from rag.store.async_store import AsyncStore
from rag.store.collections import ChunkRow, DocumentRow, WriteStats
from rag.store.filters import FILTER_KEYS, SearchFilter, parse_filter
from rag.store.hybrid import Fusion
from rag.store.lexical import LexicalIndex
from rag.store.replicas import ReplicaSet, ReplicaStatus
from rag.store.schema import SCHEMA_VERSION, migrate
from rag.store.search import DISTANCES, MAX_EF_SEARCH, SearchHits, Target
from rag.store.store import Store
from rag.store.tables import AttachReport

__all__ = [
    "DISTANCES",
    "FILTER_KEYS",
    "MAX_EF_SEARCH",
    "SCHEMA_VERSION",
    "AsyncStore",
    "AttachReport",
    "ChunkRow",
    "DocumentRow",
    "Fusion",
    "LexicalIndex",
    "ReplicaSet",
    "ReplicaStatus",
    "SearchFilter",
    "SearchHits",
    "Store",
    "Target",
    "WriteStats",
    "migrate",
    "parse_filter",
]
