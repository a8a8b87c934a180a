"""The LLM yes/no reranker (rag.rerank.llm) over its offline stand-in: no Ray, no database.

The prompt is the Qwen3-Reranker model card's, character by character; the score is P("yes") from a direct
forward pass; left-padded batches score as one-by-one; truncation keeps the prompt's suffix; an instruction
changes scores and score-cache keys; the rerank engine ranks and windows with it; the stand-in is labelled
untrained and is deterministic for a seed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from rag.errors import InvalidInput, ModelError
from rag.models import StandInWarning, build_standin_llm, parse_standin
from rag.rerank import QWEN3_RERANKER, LLMReranker, make_reranker
from rag.rerank_engine import RerankEngine, RerankOptions, _Windows
from rag.settings import Settings

QUERY = "What is the capital of China?"
DOC = "The capital of China is Beijing."
DOCS = [DOC, "Gravity is a force that attracts two bodies towards each other.", "Sort a list in place."]
OTHER = "Given a question about physics, find passages that explain it"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    base = tmp_path_factory.mktemp("llmrerank")
    return Settings(
        data_dir=base,
        offline=True,
        reranker="llm",
        rerank_model="standin:llm",
        rerank_device="cpu",
        rerank_dtype="float32",
    )


@pytest.fixture(scope="module")
def llm(cfg: Settings) -> LLMReranker:
    backend = make_reranker(cfg)
    assert isinstance(backend, LLMReranker)
    return backend


def test_the_prompt_is_the_model_cards_template():
    expected = (
        "<|im_start|>system\n"
        'Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
        "<|im_start|>user\n"
        "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
        "<Query>: What is the capital of China?\n"
        "<Document>: The capital of China is Beijing.<|im_end|>\n"
        "<|im_start|>assistant\n"
        "<think>\n\n</think>\n\n"
    )
    assert QWEN3_RERANKER.render(QUERY, DOC) == expected
    custom = QWEN3_RERANKER.render("q {x}", "d {y}", "Find {braces}")
    assert "<Instruct>: Find {braces}\n<Query>: q {x}\n<Document>: d {y}<|im_end|>" in custom


def test_the_tokens_are_the_template_and_the_markers_are_single_tokens(llm):
    tok = llm.tokenizer
    for marker in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "yes", "no"):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1, marker
    ids = llm.encode([(QUERY, DOC)])[0]
    assert tok.decode(ids) == QWEN3_RERANKER.render(QUERY, DOC)  # byte-level: decoding is exact
    assert ids[: len(llm.prefix_ids)] == llm.prefix_ids and ids[-len(llm.suffix_ids) :] == llm.suffix_ids
    assert tok.padding_side == "left"


def test_the_score_is_p_yes_from_a_direct_forward_pass(llm):
    import torch

    scores = llm.score([(QUERY, d) for d in DOCS])
    for d, s in zip(DOCS, scores, strict=True):
        ids = torch.tensor([llm.encode([(QUERY, d)])[0]])
        with torch.no_grad():
            last = llm.model(input_ids=ids).logits[0, -1]
        yes, no = llm.tokenizer.convert_tokens_to_ids(["yes", "no"])
        p = torch.softmax(torch.stack([last[no], last[yes]]).double(), dim=0)[1].item()
        assert s == pytest.approx(p, abs=1e-5)
    assert max(scores) - min(scores) > 1e-3  # the calibrated stand-in spreads its scores


def test_a_left_padded_batch_scores_as_one_by_one(llm):
    pairs = [(QUERY, d) for d in DOCS] + [("gravity", DOCS[1] * 4)]
    batch = llm.score(pairs)
    assert batch.timings.padded_tokens > batch.timings.tokens  # rows of different lengths shared a pass
    alone = [llm.score([p])[0] for p in pairs]
    assert batch == pytest.approx(alone, abs=1e-5)


def test_truncation_keeps_the_prefix_and_the_suffix_and_cuts_the_document(llm):
    long_doc = "Beijing is the capital. " * 400
    ids = llm.encode([(QUERY, long_doc)])[0]
    assert len(ids) == llm.max_length
    assert ids[: len(llm.prefix_ids)] == llm.prefix_ids and ids[-len(llm.suffix_ids) :] == llm.suffix_ids
    text = llm.tokenizer.decode(ids)
    assert f"<Query>: {QUERY}\n<Document>: Beijing is the capital." in text
    assert text.endswith(QWEN3_RERANKER.suffix)
    assert 0.0 <= llm.score([(QUERY, long_doc)])[0] <= 1.0


def test_an_instruction_changes_scores_and_cache_keys(cfg, llm):
    pairs = [(QUERY, d) for d in DOCS]
    default, other = llm.score(pairs), llm.score(pairs, [OTHER] * 3)
    assert max(abs(a - b) for a, b in zip(default, other, strict=True)) > 1e-4
    assert llm.score(pairs, [None, OTHER, None]) == pytest.approx(
        [default[0], other[1], default[2]], abs=1e-5
    )
    engine = RerankEngine(llm, cfg.slice("reranker"))
    first = engine.rerank_sync(QUERY, DOCS)
    told = engine.rerank_sync(QUERY, DOCS, instruction=OTHER)
    assert told.cache_hits == 0 and told.scores == pytest.approx(list(other), abs=1e-5)
    assert engine.rerank_sync(QUERY, DOCS, RerankOptions(instruction=OTHER)).cache_hits == 3
    same = engine.rerank_sync(QUERY, DOCS, instruction=QWEN3_RERANKER.default_instruction)
    assert same.cache_hits == 3 and same.scores == first.scores  # the default named is the default
    key = engine.cache.key
    assert key(QUERY, DOC) != key(QUERY, DOC, OTHER) != key(QUERY, DOC, OTHER + "!")


def test_bad_instructions_are_refused_before_any_work(cfg, llm):
    engine = RerankEngine(llm, cfg.slice("reranker"))
    with pytest.raises(InvalidInput, match="instruction is empty"):
        engine.rerank_sync(QUERY, DOCS, instruction="  ")
    with pytest.raises(InvalidInput, match="shorten the instruction"):
        engine.rerank_sync(QUERY, DOCS, instruction="relevance " * 600)
    assert engine.stats.as_dict()["batches"] == 0


def test_the_engine_ranks_and_windows_long_documents(cfg, llm):
    from rag.ingest import iter_demo

    engine = RerankEngine(llm, cfg.with_overrides(rerank_cache=False).slice("reranker"))
    res = engine.rerank_sync(QUERY, DOCS, RerankOptions(kind="candidates"))
    assert res.scores == pytest.approx(list(llm.score([(QUERY, d) for d in DOCS])), abs=1e-6)
    words = " ".join(d.content for d in iter_demo(limit=40)).split()[:1200]
    long = " ".join(words) + " Beijing is the capital of China."
    for instruction in (None, OTHER):
        res = engine.rerank_sync(QUERY, [long, DOC], instruction=instruction)
        assert res.windows[0] > 1 and res.spans[0] is not None and res.windows[1] == 1
        plan = engine._plan(_Windows(QUERY, [long], RerankOptions(instruction=instruction)))
        for window in plan.texts:  # every window fits the prompt whole: nothing is cut off by truncation
            ids = llm.encode([(QUERY, window)], [instruction])[0]
            assert len(ids) <= llm.max_length
            assert llm.tokenizer.decode(ids).endswith(window + QWEN3_RERANKER.suffix)
        windows = plan.docs[0].texts
        scores = llm.score([(QUERY, w) for w in windows], [instruction] * len(windows))
        assert res.scores[0] == pytest.approx(max(scores), abs=1e-5)  # rerank_long_documents=max


def test_the_stand_in_is_labelled_untrained_and_deterministic(tmp_path: Path, llm):
    info = llm.info()
    assert info["trained"] is False and info["source"] == "stand-in" and info["backend"] == "llm"
    assert (
        info["template"] == "qwen3-reranker"
        and info["default_instruction"] == QWEN3_RERANKER.default_instruction
    )
    a, b = build_standin_llm(tmp_path / "a"), build_standin_llm(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    seeded = build_standin_llm(tmp_path / "a", seed=1)
    assert (
        seeded != a and (seeded / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
    )


def test_the_default_model_falls_back_to_the_stand_in_loudly(cfg):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        backend = make_reranker(cfg.with_overrides(rerank_model=Settings().rerank_model))
    assert any(issubclass(w.category, StandInWarning) for w in seen)
    assert backend.info()["model"] == "Qwen/Qwen3-Reranker-0.6B" and backend.info()["trained"] is False


def test_stand_in_pseudo_ids():
    assert parse_standin("Qwen/Qwen3-Reranker-0.6B", "llm") is None
    assert parse_standin("standin:llm:seed=7", "llm") == 7
    assert parse_standin("standin:cross-encoder:seed=2", "cross-encoder") == 2
    for bad in ("standin:llm:seed=x", "standin:cross-encoder", "standin:llm:seed=1:more"):
        with pytest.raises(ModelError, match="standin:llm"):
            parse_standin(bad, "llm")


def test_a_cross_encoder_refuses_an_instruction(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        ce = make_reranker(cfg.with_overrides(reranker="cross-encoder", rerank_model="standin:cross-encoder"))
    engine = RerankEngine(ce, cfg.with_overrides(reranker="cross-encoder").slice("reranker"))
    with pytest.raises(InvalidInput, match="takes none"):
        engine.rerank_sync(QUERY, DOCS, instruction=OTHER)
    with pytest.raises(InvalidInput, match="takes no instruction"):
        ce.score([(QUERY, DOC)], [OTHER])
    assert len(engine.rerank_sync(QUERY, DOCS).scores) == 3


def test_a_batch_mixing_requests_scores_each_under_its_own_instruction(cfg, llm):
    from rag.rerank_schedule import Item

    engine = RerankEngine(llm, cfg.slice("reranker"))
    docs = tuple(DOCS)
    plain, told = (Item(QUERY, docs, 16, 1600, 0.0, None, t, i) for t, i in ((1, None), (2, OTHER)))
    a, b = engine.score_items([plain, told])
    assert not isinstance(a, BaseException) and not isinstance(b, BaseException) and a.batch == b.batch
    assert a.scores == pytest.approx(list(llm.score([(QUERY, d) for d in DOCS])), abs=1e-5)
    assert b.scores == pytest.approx(list(llm.score([(QUERY, d) for d in DOCS], [OTHER] * 3)), abs=1e-5)


def test_seeded_cross_encoder_stand_ins_score_differently(cfg):
    fast = {"reranker": "cross-encoder", "rerank_runtime": "torch", "rerank_screen": "fp32"}
    one, two = (
        make_reranker(cfg.with_overrides(rerank_model=m, **fast))
        for m in ("standin:cross-encoder", "standin:cross-encoder:seed=2")
    )
    assert one.info()["trained"] is False and two.info()["trained"] is False
    assert one.resolved.path != two.resolved.path
    pairs = [(QUERY, d) for d in DOCS]
    assert max(abs(x - y) for x, y in zip(one.score(pairs), two.score(pairs), strict=True)) > 1e-3
