"""Settings: env prefix, the Cohere key's aliases, validation that names the bad value."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rag.settings import Settings


def test_env_prefix_and_aliases(monkeypatch):
    monkeypatch.setenv("RAG_TOP_K", "5")
    monkeypatch.setenv("RAG_RERANKER", "none")
    monkeypatch.setenv("CO_API_KEY", "k-123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = Settings()
    assert s.top_k == 5 and s.reranker == "none" and s.offline is True
    assert s.cohere_api_key is not None and s.cohere_api_key.get_secret_value() == "k-123"
    assert "k-123" not in repr(s)  # secrets stay out of logs


def test_overrides_and_validation(monkeypatch):
    monkeypatch.delenv("RAG_DATABASE_URL", raising=False)
    s = Settings(database_url="")
    assert s.database_url is None  # empty means unset: use the embedded server
    assert s.with_overrides(collection="docs", top_k=None).collection == "docs"
    with pytest.raises(ValidationError, match="lower-case"):
        Settings(collection="Has Spaces")
    with pytest.raises(ValidationError):
        Settings(reranker="bm25")
    with pytest.raises(ValidationError):
        Settings(max_fetch_k=5000)
