"""Stage 2's backends. A backend scores a flat list of (query, document) pairs; ranking is core logic.

- ``CrossEncoderReranker`` (``rag.rerank.cross_encoder``): a sentence-transformers ``CrossEncoder``. In
  ``float32`` with ``sort=False`` it is exactly ``CrossEncoder.predict``; by default it sorts pairs by
  length, packs them by a padded-token budget, screens them (``rag.rerank.screen``) and rescores each
  query's head in fp32, on OpenVINO when installed (docs/BENCHMARKS.md).
- ``LLMReranker`` (``rag.rerank.llm``, ``RAG_RERANKER=llm``): a causal LM of the Qwen3-Reranker family
  scored by P("yes") under the model card's prompt, with an instruction. ``rerank_model`` left at the
  cross-encoder's default means ``Qwen/Qwen3-Reranker-0.6B`` for it.
- ``CohereReranker`` (``rag.rerank.cohere``): Cohere's hosted Rerank v2 API via ``cohere.ClientV2``.
- ``NoReranker``: stage 2 disabled; the pipeline keeps the dense order.

``make_reranker(config)`` is the one factory (library, CLI, the rerank engine in the Reranker deployment).
The rerank engine (``rag.rerank_engine``) holds one backend and does windows, the score cache, chunks and
admission around it.
"""

from __future__ import annotations

from rag.rerank.base import NoReranker, Pair, RerankBackend, Scores, ScoreTimings
from rag.rerank.cohere import CohereReranker
from rag.rerank.cross_encoder import CrossEncoderReranker, model_revision
from rag.rerank.llm import DEFAULT_LLM_RERANK_MODEL, QWEN3_RERANKER, LLMReranker, PromptTemplate
from rag.settings import DEFAULT_RERANK_MODEL, Settings
from rag.stages import RerankerConfig
from rag.validation import validate_pairs

__all__ = [
    "DEFAULT_LLM_RERANK_MODEL",
    "QWEN3_RERANKER",
    "CohereReranker",
    "CrossEncoderReranker",
    "LLMReranker",
    "NoReranker",
    "Pair",
    "PromptTemplate",
    "RerankBackend",
    "ScoreTimings",
    "Scores",
    "make_reranker",
    "model_revision",
    "validate_pairs",
]


def make_reranker(config: RerankerConfig | Settings) -> RerankBackend:
    """The backend the configuration asks for. A backend's parameter ``x`` takes the setting ``rerank_x``
    (``cohere_x`` for Cohere), so a new setting reaches it by its name alone."""
    cfg = config.slice("reranker") if isinstance(config, Settings) else config
    if cfg.reranker == "none":
        return NoReranker()
    if cfg.reranker == "cohere":
        return CohereReranker(**cfg.kwargs_for(CohereReranker.__init__, "cohere_"))
    if cfg.reranker == "llm":
        kw = cfg.kwargs_for(LLMReranker.__init__, "rerank_")
        if kw["model"] == DEFAULT_RERANK_MODEL:  # the cross-encoder's default is no LLM: the LLM default
            kw["model"] = DEFAULT_LLM_RERANK_MODEL
        return LLMReranker(cache_dir=cfg.model_cache, offline=cfg.offline, **kw)
    kw = cfg.kwargs_for(CrossEncoderReranker.__init__, "rerank_")
    return CrossEncoderReranker(cache_dir=cfg.model_cache, offline=cfg.offline, **kw)
