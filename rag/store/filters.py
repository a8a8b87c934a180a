"""Search filters: parse a user's JSON filter into a ``SearchFilter``; turn one into SQL (parameters only).

Grammar (a JSON object; its keys combine with AND; ``None`` or ``{}`` means no filter)::

    {"source":   "a.txt"}                      source equals
    {"source":   {"in": ["a.txt", "b.txt"]}}   source is one of (1..1000 strings)
    {"source":   {"prefix": "docs/"}}          source starts with ("%" and "_" are literal)
    {"doc_id":   "doc-1"}                      doc_id equals
    {"doc_id":   {"in": ["doc-1", "doc-2"]}}   doc_id is one of (1..1000 strings)
    {"metadata": {"lang": "en"}}               metadata contains this JSON (jsonb ``@>``)

One operator per key. Anything else (an unknown key or operator, a value of the wrong type, an empty ``in``
list) raises ``InvalidInput`` naming the key and what is allowed. Values never reach SQL text: ``to_sql``
returns ``%s`` placeholders with their parameters, so ``'; DROP TABLE chunks; --`` is just a source that
matches nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from rag.errors import InvalidInput

__all__ = ["FILTER_KEYS", "MAX_IN_VALUES", "SearchFilter", "parse_filter"]

FILTER_KEYS = ("doc_id", "metadata", "source")
MAX_IN_VALUES = 1000
MAX_VALUE_CHARS = 4096
_ALLOWED = (
    'allowed keys: "source" (a string, {"in": [strings]} or {"prefix": string}), '
    '"doc_id" (a string or {"in": [strings]}), "metadata" (a JSON object, matched with @>); '
    "keys combine with AND"
)


@dataclass(frozen=True)
class SearchFilter:
    """A validated filter. Frozen and picklable (it crosses Ray process boundaries); build it with
    ``parse_filter``. At most one of ``source`` / ``source_in`` / ``source_prefix`` is set, and at most one
    of ``doc_id`` / ``doc_id_in``. ``metadata_json`` is the containment object as canonical JSON."""

    source: str | None = None
    source_in: tuple[str, ...] | None = None
    source_prefix: str | None = None
    doc_id: str | None = None
    doc_id_in: tuple[str, ...] | None = None
    metadata_json: str | None = None

    @property
    def metadata(self) -> dict[str, Any] | None:
        return None if self.metadata_json is None else json.loads(self.metadata_json)

    def as_dict(self) -> dict[str, Any]:
        """The filter in the request grammar (what ``parse_filter`` accepts), for echoing back."""
        out: dict[str, Any] = {}
        if self.source is not None:
            out["source"] = self.source
        elif self.source_in is not None:
            out["source"] = {"in": list(self.source_in)}
        elif self.source_prefix is not None:
            out["source"] = {"prefix": self.source_prefix}
        if self.doc_id is not None:
            out["doc_id"] = self.doc_id
        elif self.doc_id_in is not None:
            out["doc_id"] = {"in": list(self.doc_id_in)}
        if self.metadata_json is not None:
            out["metadata"] = self.metadata
        return out

    def keys(self) -> set[str]:
        """The top-level keys this filter uses."""
        return set(self.as_dict())

    def to_sql(self, columns: Mapping[str, sql.Composable]) -> tuple[sql.Composable, list[Any]]:
        """``(condition, params)`` for a WHERE clause. ``columns`` maps ``source``, ``doc_id`` and (when the
        table has one) ``metadata`` to SQL expressions; a metadata filter on a table without a metadata
        column raises ``InvalidInput``."""
        parts: list[sql.Composable] = []
        params: list[Any] = []
        if self.source is not None:
            parts.append(sql.SQL("{} = %s").format(columns["source"]))
            params.append(self.source)
        elif self.source_in is not None:
            parts.append(sql.SQL("{} = ANY(%s)").format(columns["source"]))
            params.append(list(self.source_in))
        elif self.source_prefix is not None:
            parts.append(sql.SQL("{} LIKE %s").format(columns["source"]))
            params.append(_like_prefix(self.source_prefix))
        if self.doc_id is not None:
            parts.append(sql.SQL("{} = %s").format(columns["doc_id"]))
            params.append(self.doc_id)
        elif self.doc_id_in is not None:
            parts.append(sql.SQL("{} = ANY(%s)").format(columns["doc_id"]))
            params.append(list(self.doc_id_in))
        if self.metadata_json is not None:
            if "metadata" not in columns:
                raise InvalidInput(
                    'this collection has no metadata column, so it cannot be filtered on "metadata": '
                    'filter on "source" or "doc_id", or attach the table with --metadata-column'
                )
            parts.append(sql.SQL("{} @> %s").format(columns["metadata"]))
            params.append(Jsonb(self.metadata))
        if not parts:
            return sql.SQL("TRUE"), []
        return sql.SQL(" AND ").join(parts), params


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def _string(key: str, value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"filter {key}: {what} must be a string, got {_show(value)}; {_ALLOWED}")
    if len(value) > MAX_VALUE_CHARS:
        raise InvalidInput(f"filter {key}: {what} is longer than {MAX_VALUE_CHARS} characters")
    if "\x00" in value:
        raise InvalidInput(f"filter {key}: {what} contains a NUL character")
    return value


def _show(value: Any) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def _in_list(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidInput(f'filter {key}: "in" takes a list of strings, got {_show(value)}')
    if not value:
        raise InvalidInput(
            f'filter {key}: "in" needs at least one value (an empty list would match nothing); '
            f"leave {key!r} out to match every {key}"
        )
    if len(value) > MAX_IN_VALUES:
        raise InvalidInput(f'filter {key}: "in" takes at most {MAX_IN_VALUES} values, got {len(value)}')
    return tuple(_string(key, v, '"in" values') for v in value)


def _operator(key: str, value: Mapping[str, Any], allowed: tuple[str, ...]) -> tuple[str, Any]:
    if len(value) != 1 or next(iter(value)) not in allowed:
        ops = " or ".join(f'{{"{op}": ...}}' for op in allowed)
        raise InvalidInput(
            f"filter {key}: expected a string or one operator ({ops}), got {_show(value)}; {_ALLOWED}"
        )
    op, arg = next(iter(value.items()))
    return op, arg


def parse_filter(obj: Mapping[str, Any] | SearchFilter | None) -> SearchFilter | None:
    """Validate a user filter (decoded JSON) into a ``SearchFilter``; ``None`` / ``{}`` -> ``None``.

    See the module docstring for the grammar. Raises ``InvalidInput`` with a message that names the bad
    key or value and lists the allowed keys.
    """
    if obj is None or isinstance(obj, SearchFilter):
        return obj
    if not isinstance(obj, Mapping):
        raise InvalidInput(f"filter must be a JSON object, got {_show(obj)}; {_ALLOWED}")
    unknown = sorted(str(k) for k in obj if k not in FILTER_KEYS)
    if unknown:
        raise InvalidInput(f"unknown filter key(s) {', '.join(map(repr, unknown))}: {_ALLOWED}")
    fields: dict[str, Any] = {}
    if "source" in obj:
        v = obj["source"]
        if isinstance(v, Mapping):
            op, arg = _operator("source", v, ("in", "prefix"))
            if op == "in":
                fields["source_in"] = _in_list("source", arg)
            else:
                fields["source_prefix"] = _string("source", arg, '"prefix"')
        else:
            fields["source"] = _string("source", v, "the value")
    if "doc_id" in obj:
        v = obj["doc_id"]
        if isinstance(v, Mapping):
            _, arg = _operator("doc_id", v, ("in",))
            fields["doc_id_in"] = _in_list("doc_id", arg)
        else:
            fields["doc_id"] = _string("doc_id", v, "the value")
    if "metadata" in obj:
        v = obj["metadata"]
        if not isinstance(v, Mapping):
            raise InvalidInput(
                f'filter metadata: expected a JSON object such as {{"lang": "en"}} (matched with @>), '
                f"got {_show(v)}"
            )
        try:
            text = json.dumps(v, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"filter metadata: not plain JSON ({e})") from e
        if len(text) > MAX_VALUE_CHARS:
            raise InvalidInput(f"filter metadata: longer than {MAX_VALUE_CHARS} characters as JSON")
        if "\\u0000" in text:
            raise InvalidInput("filter metadata: contains a NUL character")
        if v:
            fields["metadata_json"] = text
    return SearchFilter(**fields) if fields else None
