"""Loaders (folders, JSONL, BEIR, the stdlib demo corpus), token-aware chunking, and batched ingest.

Ingest is idempotent and crash-safe: documents are written in batches, each batch in one transaction
(COPY); a document whose id is already stored with the same content hash is skipped before it is embedded;
a document whose content changed is replaced. An interrupted run leaves only whole documents behind.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag.errors import IngestError
from rag.store import ChunkRow, DocumentRow
from rag.validation import text_problem

_Documented = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef  # what has a docstring

if TYPE_CHECKING:
    from rag.embed import Embedder
    from rag.store import Store

__all__ = [
    "TEXT_SUFFIXES",
    "Document",
    "IngestReport",
    "chunk_text",
    "content_hash",
    "ingest",
    "iter_demo",
    "iter_path",
    "iter_paths",
]

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".rst"}


@dataclass(frozen=True)
class Document:
    doc_id: str
    content: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class IngestReport:
    collection: str
    documents_seen: int = 0
    documents_added: int = 0
    documents_replaced: int = 0
    documents_unchanged: int = 0
    documents_empty: int = 0
    chunks_added: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: reason"
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        s = (
            f"collection {self.collection!r}: {self.documents_seen} documents read, "
            f"{self.documents_added} added, {self.documents_replaced} replaced, "
            f"{self.documents_unchanged} unchanged, {self.chunks_added} chunks written "
            f"in {self.seconds:.1f} s"
        )
        if self.documents_empty:
            s += f"; {self.documents_empty} empty (nothing to index)"
        if self.skipped:
            s += f"; {len(self.skipped)} skipped (see the warnings above)"
        return s


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------
def printable(text: str) -> str:
    """``text`` safe to print and log: an undecodable file name shows its raw bytes as ``\\xff`` escapes."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _warn_skip(skipped: list[str] | None, path: Path | str, reason: str) -> None:
    msg = f"{printable(str(path))}: {reason}"
    log.warning("skipped %s", msg)
    if skipped is not None:
        skipped.append(msg)


def _read_text(path: Path, skipped: list[str] | None) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        _warn_skip(skipped, path, "not valid UTF-8 text (convert it to UTF-8 to ingest it)")
    except OSError as e:
        _warn_skip(skipped, path, f"unreadable ({e.strerror or e})")
    return None


def _iter_jsonl(path: Path, skipped: list[str] | None) -> Iterator[Document]:
    """``{"id"?, "source"?, "content" | "text", "title"?, "metadata"?}`` per line (BEIR's ``_id`` too)."""
    text = _read_text(path, skipped)
    if text is None:
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            _warn_skip(skipped, f"{path}:{n}", f"invalid JSON ({e.msg})")
            continue
        if not isinstance(rec, dict):
            _warn_skip(skipped, f"{path}:{n}", "a line must be a JSON object")
            continue
        body = rec.get("content", rec.get("text"))
        if not isinstance(body, str):
            _warn_skip(skipped, f"{path}:{n}", 'needs a "content" or "text" string')
            continue
        title = rec.get("title")
        content = f"{title} {body}".strip() if isinstance(title, str) and title else body
        doc_id = str(rec.get("id", rec.get("_id", ""))) or content_hash(content)[:16]
        meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        yield Document(doc_id, content, str(rec.get("source") or f"{path.name}#{doc_id}"), meta)


def _iter_folder(root: Path, skipped: list[str] | None) -> Iterator[Document]:
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.suffix.lower() in TEXT_SUFFIXES:
            text = _read_text(p, skipped)
            if text is not None:
                yield Document(str(p.resolve()), text, str(p), {"path": str(p.resolve())})
        elif p.suffix.lower() == ".jsonl":
            yield from _iter_jsonl(p, skipped)


def iter_path(path: str | Path, skipped: list[str] | None = None) -> Iterator[Document]:
    """Documents from a file (.txt/.md/.rst/.jsonl), a folder of them, or a BEIR folder (corpus.jsonl)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise IngestError(f"path not found: {p} (give a file, a folder, or a BEIR folder with corpus.jsonl)")
    if p.is_dir():
        if (p / "corpus.jsonl").is_file():  # BEIR layout: only the corpus, not queries/qrels
            yield from _iter_jsonl(p / "corpus.jsonl", skipped)
        else:
            yield from _iter_folder(p, skipped)
        return
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(p, skipped)
    elif suffix in TEXT_SUFFIXES:
        text = _read_text(p, skipped)
        if text is not None:
            yield Document(str(p.resolve()), text, str(p), {"path": str(p.resolve())})
    else:
        raise IngestError(
            f"unsupported file type {p.suffix or '(none)'} for {p}: use .txt, .md, .rst or .jsonl"
        )


def iter_paths(paths: Iterable[str | Path], skipped: list[str] | None = None) -> Iterator[Document]:
    paths = list(paths)
    for p in paths:  # fail fast on a missing path, before anything is written
        if not Path(p).expanduser().exists():
            raise IngestError(
                f"path not found: {p} (give a file, a folder, or a BEIR folder with corpus.jsonl)"
            )
    for p in paths:
        yield from iter_path(p, skipped)


# --- demo corpus: the standard library's docstrings, read with ast (never imported) -----------------
_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "ensurepip",
    "turtledemo",
    "__phello__",
}


def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith(("_", ".")) for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_") and rel.name != "__init__.py":
            continue
        mod = ".".join(rel.with_suffix("").parts)
        mod = mod.removesuffix(".__init__")
        out.append((mod, p))
    return out


def iter_demo(limit: int | None = None, min_chars: int = 40) -> Iterator[Document]:
    """Docstrings of the stdlib's public modules, classes and functions (thousands, no download)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    n = 0
    for mod, path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue

        def emit(
            qualname: str, node: _Documented, kind: str, mod: str = mod, path: Path = path
        ) -> Document | None:
            doc = ast.get_docstring(node)
            if not doc or len(doc) < min_chars:
                return None
            line = getattr(node, "lineno", 1)
            return Document(
                doc_id=qualname,
                content=f"{qualname}\n\n{doc}",
                source=f"python{version}/{path.name}:{line}",
                metadata={"module": mod, "kind": kind, "name": qualname, "line": line},
            )

        found = [emit(mod, tree, "module")]
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
                found.append(emit(f"{mod}.{node.name}", node, "function"))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                found.append(emit(f"{mod}.{node.name}", node, "class"))
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef) and not sub.name.startswith(
                        "_"
                    ):
                        found.append(emit(f"{mod}.{node.name}.{sub.name}", sub, "method"))
        for d in found:
            if d is not None:
                yield d
                n += 1
                if limit is not None and n >= limit:
                    return


# --------------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------------
def chunk_text(text: str, tokenizer: Any, chunk_tokens: int, overlap: int) -> list[str]:
    """Split ``text`` into windows of at most ``chunk_tokens`` tokenizer tokens sharing ``overlap`` tokens.

    Windows are cut on token boundaries and sliced from the original text (offsets), so no text is
    altered. A text that fits in one window is returned whole.
    """
    text = text.strip()
    if not text:
        return []
    if overlap >= chunk_tokens:
        raise IngestError(f"chunk overlap ({overlap}) must be smaller than the chunk size ({chunk_tokens})")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    offsets = enc["offset_mapping"]
    if len(offsets) <= chunk_tokens:
        return [text]
    chunks = []
    step = chunk_tokens - overlap
    for start in range(0, len(offsets), step):
        end = min(start + chunk_tokens, len(offsets))
        chunks.append(text[offsets[start][0] : offsets[end - 1][1]])
        if end == len(offsets):
            break
    return chunks


# --------------------------------------------------------------------------------------------------
# Ingest
# --------------------------------------------------------------------------------------------------
def storable(d: Document) -> str | None:
    """Why ``d`` cannot be stored (PostgreSQL text holds neither NUL nor lone surrogates), or None."""
    for what, value in (("its name", d.doc_id), ("its source", d.source), ("its text", d.content)):
        if what != "its text" and any("\udc80" <= ch <= "\udcff" for ch in value):
            return "its file name is not valid UTF-8: rename the file"
        problem = text_problem(value)
        if problem:
            return f"{what} {problem}"
    try:
        json.dumps(d.metadata, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        return f"its metadata cannot be stored as JSON ({e})"
    if "\\u0000" in json.dumps(d.metadata):
        return "its metadata holds a NUL character: remove it"
    return None


def _batched(it: Iterable[Document], n: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for d in it:
        batch.append(d)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def ingest(
    docs: Iterable[Document],
    *,
    embedder: Embedder,
    store: Store,
    collection: str,
    chunk_tokens: int = 256,
    chunk_overlap: int = 32,
    batch_docs: int = 64,
    progress: bool = False,
    total: int | None = None,
    report: IngestReport | None = None,
) -> IngestReport:
    """Chunk, embed and store ``docs`` in ``collection`` (created on first use)."""
    t0 = time.perf_counter()
    rep = report or IngestReport(collection)
    # Windows must fit the embedder's input, special tokens included.
    size = max(8, min(chunk_tokens, embedder.max_seq_length - 2))
    overlap = min(chunk_overlap, size // 2)
    store.ensure_collection(collection, dim=embedder.dim, embedding_model=embedder.name)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="doc", desc=f"ingest -> {collection}", file=sys.stderr)
    try:
        for batch in _batched(docs, batch_docs):
            uniq: dict[str, Document] = {}
            for d in batch:  # the last copy of an id within a batch wins
                problem = storable(d)
                if problem:  # skipped and reported; the rest of the batch is written
                    _warn_skip(rep.skipped, d.source, f"not ingested: {problem}")
                    continue
                uniq[d.doc_id] = d
            rep.documents_seen += len(batch)
            hashes = {d.doc_id: content_hash(d.content) for d in uniq.values()}
            stored = store.existing_hashes(collection, list(uniq))
            todo = [d for d in uniq.values() if stored.get(d.doc_id) != hashes[d.doc_id]]
            rep.documents_unchanged += len(uniq) - len(todo)
            doc_rows, chunk_rows = [], []
            for d in todo:
                pieces = chunk_text(d.content, embedder.tokenizer, size, overlap)
                if not pieces:
                    rep.documents_empty += 1
                    continue
                doc_rows.append(DocumentRow(d.doc_id, d.source, hashes[d.doc_id], d.metadata))
                for i, piece in enumerate(pieces):
                    cid = d.doc_id if len(pieces) == 1 else f"{d.doc_id}#{i}"
                    chunk_rows.append(
                        ChunkRow(cid, d.doc_id, d.source, i, piece, content_hash(piece), d.metadata)
                    )
            if doc_rows:
                vecs = embedder.embed_documents([c.content for c in chunk_rows])
                st = store.write_batch(collection, doc_rows, chunk_rows, vecs)
                rep.documents_added += st.documents_added
                rep.documents_replaced += st.documents_replaced
                rep.documents_unchanged += st.documents_unchanged
                rep.chunks_added += st.chunks_added
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        rep.seconds = time.perf_counter() - t0
    return rep
