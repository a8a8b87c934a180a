"""The request validators, written once: the library, the CLI and every Serve route call these.

One rule for text on every route (and in ingest, via ``check_text``): a value must be a ``str`` that encodes
as UTF-8 (JSON allows lone UTF-16 surrogates such as ``"\\ud800"``, which no tokenizer or database accepts)
and holds no NUL character; otherwise ``InvalidInput`` names the field. Validation happens before a
request joins a batch, so one bad request never fails another.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, get_args

from rag.errors import CollectionError, InvalidInput

__all__ = [
    "COLLECTION_RE",
    "SEARCH_MODES",
    "Pair",
    "SearchMode",
    "ValidPairs",
    "check_mode",
    "check_text",
    "text_problem",
    "validate_collection_name",
    "validate_documents",
    "validate_pairs",
    "validate_query",
    "validate_search",
    "validate_texts",
]

# Collections become table names, so they are plain lower-case identifiers.
COLLECTION_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

SearchMode = Literal["dense", "lexical", "hybrid"]  # stage 1 (rag.store.hybrid); RAG_SEARCH_MODE
SEARCH_MODES: tuple[str, ...] = get_args(SearchMode)


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be processed as text, or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"holds a lone UTF-16 surrogate at character {e.start} ({value[e.start]!a}), which is not valid "
            "Unicode: send valid UTF-8 text"
        )
    if "\x00" in value:
        return f"holds a NUL character at character {value.index(chr(0))}: remove it"
    return None


def check_text(value: object, field: str) -> str:
    """``value`` as text (any length, may be blank), or InvalidInput naming ``field``."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string, got {type(value).__name__}")
    problem = text_problem(value)
    if problem:
        raise InvalidInput(f"{field} {problem}")
    return value


def validate_query(query: object, field: str = "query", *, max_chars: int | None = None) -> str:
    """A non-blank, valid text of at most ``max_chars`` characters."""
    if not isinstance(query, str) or not query.strip():
        got = f"an empty or whitespace-only {field}" if isinstance(query, str) else type(query).__name__
        raise InvalidInput(f"{field} must be a non-empty string (got {got})")
    if max_chars is not None and len(query) > max_chars:
        raise InvalidInput(
            f"{field} is {len(query)} characters long; the limit is {max_chars} "
            "(RAG_MAX_QUERY_CHARS): shorten it"
        )
    return check_text(query, field)


def check_mode(mode: object) -> str:
    """A stage-1 mode: ``dense``, ``lexical`` or ``hybrid``."""
    if mode not in SEARCH_MODES:
        raise InvalidInput(f"mode must be one of {', '.join(SEARCH_MODES)}, got {mode!r}")
    return str(mode)


def _positive_int(value: object, name: str, words: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInput(f"{name} must be {words}, got {value!r}")
    return value


def validate_search(
    query: object, fetch_k: object, top_k: object, *, max_fetch_k: int, max_chars: int | None = None
) -> None:
    """Check a search request; raises InvalidInput naming the value and the allowed range."""
    validate_query(query, max_chars=max_chars)
    fetch_k = _positive_int(fetch_k, "fetch_k", "a positive integer")
    if fetch_k > max_fetch_k:
        raise InvalidInput(f"fetch_k={fetch_k} is above the maximum {max_fetch_k} (RAG_MAX_FETCH_K)")
    top_k = _positive_int(top_k, "top_k", "an integer >= 1")
    if top_k > fetch_k:
        raise InvalidInput(f"top_k={top_k} is larger than fetch_k={fetch_k}: ask for top_k <= fetch_k")


def validate_documents(documents: object, *, limit: int | None = None, field: str = "documents") -> list[str]:
    """A non-empty list of at most ``limit`` texts (each may be blank: it is scored like any other)."""
    if not isinstance(documents, list | tuple):
        raise InvalidInput(f"{field} must be a list of strings, got {type(documents).__name__}")
    if not documents:
        raise InvalidInput(f"{field} must contain at least one document")
    if limit is not None and len(documents) > limit:
        raise InvalidInput(
            f"{len(documents)} {field}; at most {limit} per request (RAG_MAX_DOCUMENTS): send fewer, "
            "or split them over several requests"
        )
    return [check_text(d, f"{field}[{i}]") for i, d in enumerate(documents)]


def validate_texts(
    texts: Sequence[object], *, limit: int, max_chars: int | None, field: str = "inputs"
) -> list[str]:
    """Texts to embed: 1..limit non-blank valid texts."""
    if not texts:
        raise InvalidInput(f"{field} must contain at least one text")
    if len(texts) > limit:
        raise InvalidInput(f"{len(texts)} {field}; at most {limit} per request (RAG_MAX_EMBED_INPUTS)")
    return [validate_query(t, f"{field}[{i}]", max_chars=max_chars) for i, t in enumerate(texts)]


def validate_collection_name(name: str) -> str:
    """Collections become table names, so they are plain lower-case identifiers."""
    if not isinstance(name, str) or not COLLECTION_RE.match(name):
        raise CollectionError(
            f"invalid collection name {name!r}: use 1-40 characters of lower-case letters, digits and "
            "underscores, starting with a letter (e.g. 'default', 'cranfield')"
        )
    return name


Pair = tuple[str, str]


class ValidPairs(tuple[Pair, ...]):
    """(query, document) pairs known to be valid text: what ``validate_pairs`` returns, and what the rerank
    engine builds from a request validated at the edge. A backend scores these without checking again."""

    __slots__ = ()


def validate_pairs(pairs: Sequence[object]) -> ValidPairs:
    """``pairs`` as ``ValidPairs``: each a (query, document) pair of valid text (``check_text``)."""
    if isinstance(pairs, ValidPairs):
        return pairs
    out: list[Pair] = []
    for i, p in enumerate(pairs):
        if not (isinstance(p, tuple | list) and len(p) == 2):
            raise InvalidInput(
                f"pair {i} must be a (query, document) pair of strings, got {type(p).__name__}"
            )
        out.append((check_text(p[0], f"pair {i} query"), check_text(p[1], f"pair {i} document")))
    return ValidPairs(out)
