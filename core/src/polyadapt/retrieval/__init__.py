"""Retrieval beside the adapter: versioned document indexes with hybrid (BM25 + dense) search.

``build_index(docs_dir, output)`` reads, checks, chunks and embeds a document folder; ``open_index(path_or_ref)``
opens one (a directory, or ``NAME@REF`` from the registry); ``Index.search(query, top_k, mode)`` gives
:class:`Hit` objects, best first, each with its ``citation`` (``fees.md#overdraft``). Everything heavy (torch,
transformers, bm25s, lancedb, qdrant) loads on first use, not on import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import EmbeddingMismatchError, RetrievalError

if TYPE_CHECKING:
    from .chunking import Chunk, citation, slug
    from .embedding import Embedder, load_embedder
    from .index import Hit, Index, build_index, open_index, rrf

_LAZY = {
    "Chunk": "chunking", "citation": "chunking", "slug": "chunking", "Embedder": "embedding",
    "load_embedder": "embedding", "Hit": "index", "Index": "index", "build_index": "index", "open_index": "index",
    "rrf": "index",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = [
    "Chunk", "Embedder", "EmbeddingMismatchError", "Hit", "Index", "RetrievalError", "build_index", "citation",
    "load_embedder", "open_index", "rrf", "slug",
]  # fmt: skip
