"""Build, open and search a document index: BM25 (``bm25s``) beside dense embeddings in a vector store, fused by
reciprocal rank.

An index is a directory::

    index.json               the manifest: document fingerprints, chunking, embedding model and digest, store, counts
    chunks.json              every chunk: id, source, heading, character span, text
    embeddings.safetensors   one float32 row per chunk (the portable copy the registry stores)
    lancedb/ or qdrant/      the vector store, rebuilt from embeddings.safetensors when missing (after a pull)

The BM25 index is rebuilt from ``chunks.json`` when the index opens (deterministic, and quick next to loading the
embedding model). ``index.json`` is written last, into a directory that only then takes the output's name, so a
build that fails leaves nothing behind and a half-built index is never opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, RunDirectoryError
from ..manifest import now_iso, version_of
from .chunking import Chunk, chunk_document, citation
from .documents import MAX_DOCUMENT_BYTES, read_documents
from .embedding import Embedder, load_embedder
from .errors import EmbeddingMismatchError, RetrievalError
from .stores import STORES, VectorStore, create_store, open_store

INDEX_MANIFEST = "index.json"
CHUNKS = "chunks.json"
EMBEDDINGS = "embeddings.safetensors"
#: the files that make an index portable: what the registry stores and pulls back
PORTABLE_FILES = (INDEX_MANIFEST, CHUNKS, EMBEDDINGS)
FORMAT = "polyadapt-index"
FORMAT_VERSION = 1
MODES = ("hybrid", "bm25", "dense")
#: reciprocal rank fusion constant: score(d) = sum over rankings of 1 / (RRF_K + rank of d), ranks from 1
#: (Cormack, Clarke and Buettcher 2009); 60 keeps one list's top ranks from drowning the other list
RRF_K = 60
#: how deep each ranking is read before fusion
FUSION_DEPTH = 50
BM25_K1, BM25_B = 1.5, 0.75
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Hit:
    """One search result: ``rank`` from 1, ``score`` (fused RRF score, BM25 score or cosine similarity by mode), the
    chunk, its ``source`` (path relative to the document folder), ``heading`` and span ``[start, end)`` of the
    source's text."""

    rank: int
    score: float
    chunk_id: str
    text: str
    source: str
    heading: str | None
    start: int
    end: int

    @property
    def citation(self) -> str:
        """``fees.md#overdraft``: the source and its heading's anchor (the source alone without a heading)."""
        return citation(self.source, self.heading)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank, "score": self.score, "citation": self.citation, "chunk_id": self.chunk_id,
            "source": self.source, "heading": self.heading, "start": self.start, "end": self.end, "text": self.text,
        }  # fmt: skip


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of rankings (item ids, best first): each item scores ``sum(1 / (k + rank))`` over the
    rankings it appears in. Best first; ties go to the better best rank, then the smaller id."""
    scores: dict[int, float] = {}
    best: dict[int, int] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
            best[item] = min(best.get(item, rank), rank)
    return sorted(scores.items(), key=lambda pair: (-pair[1], best[pair[0]], pair[0]))


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased words without English stopwords, plurals reduced by :func:`s_stem`: the terms BM25 matches."""
    from bm25s.stopwords import STOPWORDS_EN

    stop = _stopwords(STOPWORDS_EN)
    return [s_stem(word) for word in _WORD.findall(text.lower()) if word not in stop]


def s_stem(word: str) -> str:
    """Harman's S-stemmer (1991): ``branches`` and ``branch``, ``fees`` and ``fee`` match; nothing else changes, so
    numbers and names stay exact."""
    if len(word) > 3 and word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("us", "ss")):
        return word[:-1]
    return word


_STOP: frozenset[str] | None = None


def _stopwords(words: Sequence[str]) -> frozenset[str]:
    global _STOP
    if _STOP is None:
        _STOP = frozenset(words)
    return _STOP


# -- the index -------------------------------------------------------------------------------------------------------
class Index:
    """An opened index (:func:`open_index`). ``manifest`` is ``index.json``; the embedding model loads on the first
    dense or hybrid query."""

    def __init__(self, path: Path, manifest: dict[str, Any], chunks: list[Chunk], embedder: Embedder | None) -> None:
        self.path = path
        self.manifest = manifest
        self.chunks = chunks
        self._embedder = embedder
        self._store: VectorStore | None = None
        self._bm25: Any = None
        # a server searches from several threads: the lazy parts are made once
        self._lock = threading.Lock()
        #: where it came from: the registry version (``policies@v3``) or the directory given
        self.label = str(path)

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, chunks={len(self.chunks)})"

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def fingerprint(self) -> str:
        """The sha256 over every document's digest: which snapshot of the documents answers."""
        return self.manifest["documents"]["fingerprint"]

    @property
    def embedder(self) -> Embedder:
        """The index's own embedding model, loaded (and checked against the recorded digest) on first use."""
        with self._lock:
            if self._embedder is None:
                embedder = load_embedder(self.manifest["embedding"]["reference"])
                _check_same_model(self, embedder)
                self._embedder = embedder
        return self._embedder

    @property
    def embeddings(self) -> np.ndarray:
        """Every chunk's vector, one row per chunk in ``chunks`` order."""
        from safetensors.numpy import load_file

        return load_file(str(self.path / EMBEDDINGS))["embeddings"]

    @property
    def store(self) -> VectorStore:
        """The vector store, opened (or rebuilt from ``embeddings.safetensors``) on first use."""
        with self._lock:
            return self._open_store()

    def _open_store(self) -> VectorStore:
        if self._store is None:
            kind = self.manifest["store"]["kind"]
            store = open_store(kind, self.path, self.manifest["store"])
            if store is None:  # a pulled index carries its vectors, not its store
                try:
                    store = create_store(kind, self.path, self.embeddings, self.manifest["store"])
                except OSError as exc:
                    raise RetrievalError(f"{self.path}: cannot rebuild its {kind} store ({exc})") from None
            self._store = store
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def search(self, query: str, top_k: int = 4, mode: str = "hybrid") -> list[Hit]:
        """The ``top_k`` best chunks for ``query``, best first. ``mode``: ``hybrid`` (BM25 and dense rankings, each
        read :data:`FUSION_DEPTH` deep, fused by :func:`rrf`), ``bm25`` (only chunks sharing a term) or ``dense``
        (cosine similarity)."""
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}")
        if mode == "bm25":
            ranked = self.bm25_ranking(query, top_k)
        elif mode == "dense":
            ranked = self.dense_ranking(query, top_k)
        else:
            depth = max(top_k, FUSION_DEPTH)
            lists = [
                [row for row, _ in self.bm25_ranking(query, depth)],
                [row for row, _ in self.dense_ranking(query, depth)],
            ]
            ranked = rrf(lists)[:top_k]
        return [self._hit(rank, row, score) for rank, (row, score) in enumerate(ranked, start=1)]

    def _hit(self, rank: int, row: int, score: float) -> Hit:
        chunk = self.chunks[row]
        return Hit(
            rank=rank, score=float(score), chunk_id=chunk.chunk_id, text=chunk.text, source=chunk.source,
            heading=chunk.heading, start=chunk.start, end=chunk.end,
        )  # fmt: skip

    def bm25_ranking(self, query: str, limit: int) -> list[tuple[int, float]]:
        """(row, BM25 score) of the chunks that share a term with ``query``, best first."""
        retriever = self._retriever()
        terms = [t for t in bm25_tokens(query) if t in retriever.vocab_dict]
        if not terms:
            return []
        scores = retriever.get_scores(terms)
        order = np.lexsort((np.arange(len(scores)), -scores))
        return [(int(row), float(scores[row])) for row in order[:limit] if scores[row] > 0]

    def dense_ranking(self, query: str, limit: int) -> list[tuple[int, float]]:
        """(row, cosine similarity) of the nearest chunks to ``query``'s embedding, best first."""
        vector = self.embedder.encode([query])[0]
        return self.store.search(vector, min(limit, len(self.chunks)))

    def _retriever(self) -> Any:
        with self._lock:
            if self._bm25 is None:
                import bm25s

                retriever = bm25s.BM25(k1=BM25_K1, b=BM25_B)
                retriever.index([bm25_tokens(c.search_text) for c in self.chunks], show_progress=False)
                self._bm25 = retriever
        return self._bm25


def _check_same_model(index: Index, embedder: Embedder) -> None:
    built = index.manifest["embedding"]
    if embedder.digest != built["sha256"] or embedder.dimension != int(built["dimension"]):
        raise EmbeddingMismatchError(
            str(index.path), f"{built['reference']} (sha256 {built['sha256'][:12]})", int(built["dimension"]),
            f"{embedder.reference} (sha256 {embedder.digest[:12]})", embedder.dimension,
        )  # fmt: skip


# -- opening ---------------------------------------------------------------------------------------------------------
def open_index(path: str | Path, *, embedding_model: str | Path | None = None, registry: str | None = None) -> Index:
    """Open the index at ``path`` (a directory, or ``NAME@REF`` resolved through the registry and cached like a
    run). ``embedding_model``, when given, is the query embedder: one other than the model the index was built with
    is refused (:class:`EmbeddingMismatchError`, naming both models and dimensions)."""
    root, label = _resolve(path, registry)
    manifest_path = root / INDEX_MANIFEST
    if not manifest_path.is_file():
        what = "does not exist" if not root.exists() else f"is not an index (no {INDEX_MANIFEST})"
        raise RetrievalError(f"{root} {what}; build one with: polyadapt index build DOCS_DIR --output {root}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RetrievalError(f"{manifest_path}: not readable JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RetrievalError(f"{manifest_path}: not a polyadapt index manifest")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise RetrievalError(
            f"{manifest_path}: index format {manifest.get('format_version')} is newer than this polyadapt reads "
            f"({FORMAT_VERSION}); upgrade polyadapt"
        )
    for name, digest in manifest.get("files", {}).items():
        file = root / name
        if not file.is_file():
            raise RetrievalError(f"{root}: {name} is missing")
        actual = _sha256(file)
        if actual != digest:
            raise RetrievalError(f"{root}: {name} is altered (sha256 {actual}, the manifest says {digest})")
    chunks = [Chunk.from_dict(c) for c in json.loads((root / CHUNKS).read_text(encoding="utf-8"))]
    index = Index(root, manifest, chunks, None)
    index.label = label
    if embedding_model is not None:
        embedder = load_embedder(embedding_model)
        _check_same_model(index, embedder)
        index._embedder = embedder
    return index


def resolve_index(path: str | Path, registry: str | None = None) -> Path:
    """``path`` itself, or for ``NAME@REF`` a verified copy of that registry version, pulled once into the cache
    (``$POLYADAPT_CACHE``, default ``~/.cache/polyadapt``) and reused."""
    return _resolve(path, registry)[0]


def _resolve(path: str | Path, registry: str | None) -> tuple[Path, str]:
    from ..registry.refs import looks_like_ref

    if not looks_like_ref(path):
        return Path(path), str(path)
    from ..registry import open as open_registry
    from ..registry.refs import Ref

    reg = open_registry(registry, create=False)
    try:
        version = reg.get(str(path))
        if version.modality != INDEX_KIND:
            raise RetrievalError(f"{version.label} is a {version.modality} adapter, not an index")
        root = Path(os.environ.get("POLYADAPT_CACHE") or Path.home() / ".cache" / "polyadapt") / "indexes"
        target = root / version.name / f"v{version.version}-{version.content_sha256[:16]}"
        if not (target / INDEX_MANIFEST).exists():
            if target.exists():
                shutil.rmtree(target)
            reg.pull(Ref(version.name, f"v{version.version}"), target)
        return target, version.label
    finally:
        reg.close()


# -- building --------------------------------------------------------------------------------------------------------
def build_index(
    docs_dir: str | Path,
    output: str | Path,
    *,
    chunk_tokens: int = 256,
    overlap: int = 32,
    embedding_model: str | Path | None = None,
    store: str = "lancedb",
    qdrant_url: str | None = None,
    overwrite: bool = False,
    max_document_bytes: int = MAX_DOCUMENT_BYTES,
    batch_size: int = 32,
) -> Index:
    """Read, check, chunk and embed every document under ``docs_dir`` into a new index at ``output``; return it
    opened. Every bad document is named at once (:class:`DataError`) before anything is written; a non-empty
    ``output`` is refused unless ``overwrite`` (and then only when it is an index)."""
    docs_dir, output = Path(docs_dir), Path(output)
    problems = []
    if not isinstance(chunk_tokens, int) or chunk_tokens < 8:
        problems.append(f"chunk_tokens: expected an integer >= 8, got {chunk_tokens!r}")
    if not isinstance(overlap, int) or overlap < 0 or (isinstance(chunk_tokens, int) and overlap >= chunk_tokens):
        problems.append(f"overlap: expected an integer >= 0 and below chunk_tokens ({chunk_tokens}), got {overlap!r}")
    if store not in STORES:
        problems.append(f"store: {store!r} is not one of {', '.join(STORES)}")
    if qdrant_url and store != "qdrant":
        problems.append("qdrant_url is only for store 'qdrant'")
    if problems:
        raise ConfigError(problems, source="index build")
    _check_output(docs_dir, output, overwrite)
    corpus = read_documents(docs_dir, max_bytes=max_document_bytes)
    embedder = load_embedder(embedding_model)
    chunks: list[Chunk] = []
    for document in corpus.documents:
        chunks.extend(chunk_document(document, embedder.tokenizer, chunk_tokens=chunk_tokens, overlap=overlap))
    if not chunks:
        raise DataError(f"{docs_dir}: the documents hold no text to index")
    vectors = embedder.encode([c.search_text for c in chunks], batch_size=batch_size)

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        from safetensors.numpy import save_file

        (partial / CHUNKS).write_text(json.dumps([c.as_dict() for c in chunks], ensure_ascii=False), encoding="utf-8")
        save_file({"embeddings": np.ascontiguousarray(vectors, dtype=np.float32)}, str(partial / EMBEDDINGS))
        store_settings: dict[str, Any] = {"kind": store}
        if store == "qdrant":
            store_settings["url"] = qdrant_url
            store_settings["collection"] = f"polyadapt-{uuid.uuid4().hex[:12]}" if qdrant_url else "chunks"
        create_store(store, partial, vectors, store_settings).close()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": now_iso(),
            "polyadapt_version": version_of("polyadapt"),
            "documents": {
                "path": str(docs_dir.resolve()),
                "fingerprint": corpus.fingerprint,
                "files": corpus.fingerprints,
                "skipped": corpus.skipped,
                "max_bytes": max_document_bytes,
            },  # fmt: skip
            "chunking": {
                "chunk_tokens": chunk_tokens,
                "overlap": overlap,
                "tokenizer": embedder.reference,
                "sections": "chunks never cross a heading",
            },  # fmt: skip
            "embedding": embedder.identity,
            "store": store_settings,
            "retrieval": {
                "bm25": {
                    "library": "bm25s",
                    "k1": BM25_K1,
                    "b": BM25_B,
                    "terms": "lower-cased words, English stopwords removed, S-stemmer",
                },
                "fusion": {"method": "reciprocal rank", "k": RRF_K, "depth": FUSION_DEPTH},
            },
            "counts": {"documents": len(corpus.fingerprints), "records": len(corpus.documents), "chunks": len(chunks)},
            "files": {name: _sha256(partial / name) for name in (CHUNKS, EMBEDDINGS)},
        }
        (partial / INDEX_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    index = open_index(output)
    index._embedder = embedder
    return index


def _check_output(docs_dir: Path, output: Path, overwrite: bool) -> None:
    docs, out = docs_dir.resolve(), output.resolve()
    if out == docs or docs in out.parents or out in docs.parents:
        raise RunDirectoryError(f"--output {output} overlaps the documents folder {docs_dir}; put the index elsewhere")
    if not output.exists():
        return
    if output.is_dir() and not any(output.iterdir()):
        return
    if not overwrite:
        raise RunDirectoryError(f"--output {output} exists and is not empty (--overwrite replaces an index)")
    if not (output / INDEX_MANIFEST).is_file():
        raise RunDirectoryError(f"--output {output} is not an index (no {INDEX_MANIFEST}); refusing to replace it")


def _sha256(path: Path) -> str:
    from ..data import sha256_file

    return sha256_file(path)


# -- the registry's view of an index ---------------------------------------------------------------------------------
INDEX_KIND = "index"


def is_index(path: str | Path) -> bool:
    return (Path(path) / INDEX_MANIFEST).is_file()


def registry_record(path: str | Path) -> dict[str, Any]:
    """What the registry stores for the index at ``path``: ``files`` (name -> sha256, the portable files),
    ``local`` (name -> path), a ``content`` digest (same documents, chunks, vectors and model -> same digest, whatever
    the build time), the ``row`` fields and a ``summary`` for ``show`` and ``diff``."""
    index = open_index(path)
    root = index.path
    manifest = index.manifest
    files = {name: _sha256(root / name) for name in PORTABLE_FILES}
    embedding = manifest["embedding"]
    content = hashlib.sha256(
        json.dumps(
            {"chunks": files[CHUNKS], "embeddings": files[EMBEDDINGS], "model": embedding["sha256"],
             "documents": manifest["documents"]["fingerprint"], "store": manifest["store"]["kind"]},
            sort_keys=True,
        ).encode()
    ).hexdigest()  # fmt: skip
    summary = {
        "base": {
            "reference": embedding["reference"],
            "hub_id": None,
            "weights_sha256": {"model.safetensors": embedding["sha256"]},
        },
        "data": {
            "path": manifest["documents"]["path"],
            "counts": dict(manifest["counts"]),
            "heldout": {},
            "files": {k: v["sha256"] for k, v in manifest["documents"]["files"].items()},
        },  # fmt: skip
        "config": {"chunking": manifest["chunking"], "store": manifest["store"], "retrieval": manifest["retrieval"]},
        "code": {"polyadapt": manifest.get("polyadapt_version"), "plugins": {}, "libraries": {}},
        "metrics": {"before": {}, "after": {}, "general_before": None, "general_after": None},
        "directions": {},
        "improved": None,
        "training": None,
        "index": {
            "embedding": embedding,
            "counts": dict(manifest["counts"]),
            "created": manifest["created"],
            "fingerprint": manifest["documents"]["fingerprint"],
            "path": manifest["documents"]["path"],
        },  # fmt: skip
        "parents": [],
    }
    row = {
        "manifest_sha256": files[INDEX_MANIFEST], "modality": INDEX_KIND, "base_reference": embedding["reference"],
        "base_sha256": embedding["sha256"], "data_fingerprint": manifest["documents"]["fingerprint"], "headline": None,
        "source": str(root.resolve()),
    }  # fmt: skip
    index.close()
    return {
        "files": files,
        "local": {n: root / n for n in PORTABLE_FILES},
        "content": content,
        "row": row,
        "summary": summary,
    }


def index_card(label: str, summary: dict[str, Any]) -> str:
    """The README.md a pulled index carries."""
    info = summary.get("index", {})
    embedding = info.get("embedding", {})
    counts = info.get("counts", {})
    return "\n".join([
        f"# {label}",
        "",
        "A polyadapt document index (open it with `polyadapt.retrieval.open_index`, or search it with",
        f"`polyadapt index search {label} \"QUERY\"`).",
        "",
        f"- documents: {counts.get('documents')} file(s) from {info.get('path')}, {counts.get('chunks')} chunk(s); "
        f"fingerprint `{info.get('fingerprint')}`",
        f"- embedding model: {embedding.get('reference')} (dimension {embedding.get('dimension')}, sha256 "
        f"`{embedding.get('sha256')}`)",
        f"- chunking: {summary.get('config', {}).get('chunking')}",
        f"- built: {info.get('created')}",
        "",
    ])  # fmt: skip
