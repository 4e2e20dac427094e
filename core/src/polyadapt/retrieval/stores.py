"""Where the dense vectors live, behind one narrow interface: LanceDB (the embedded default, a directory in the
index) or Qdrant (local mode in a directory, or a server shared by several processes: ``qdrant_url``).

Both search exactly by cosine similarity (no approximate index is built), so the two give the same ranking over the
same vectors. Rows are identified by their position in ``chunks.json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import RetrievalError

STORES = ("lancedb", "qdrant")
TABLE = "chunks"


class VectorStore(Protocol):
    """Vectors by row number; ``search`` gives (row, cosine similarity), best first."""

    def search(self, vector: np.ndarray, limit: int) -> list[tuple[int, float]]: ...

    def close(self) -> None: ...


class LanceStore:
    def __init__(self, path: Path) -> None:
        import lancedb

        self.path = path
        self.db = lancedb.connect(str(path))
        self.table = self.db.open_table(TABLE)

    @classmethod
    def create(cls, path: Path, vectors: np.ndarray) -> LanceStore:
        import lancedb
        import pyarrow as pa

        if path.exists():
            shutil.rmtree(path)
        dim = int(vectors.shape[1])
        rows = pa.array(np.arange(len(vectors), dtype=np.int64))
        flat = pa.array(vectors.astype(np.float32).reshape(-1))
        column = pa.FixedSizeListArray.from_arrays(flat, dim)
        lancedb.connect(str(path)).create_table(TABLE, pa.table({"row": rows, "vector": column}))
        return cls(path)

    def search(self, vector: np.ndarray, limit: int) -> list[tuple[int, float]]:
        found = (
            self.table.search(vector.astype(np.float32).tolist(), vector_column_name="vector")
            .distance_type("cosine")
            .limit(limit)
            .select(["row", "_distance"])
            .to_arrow()
        )
        rows = found.column("row").to_pylist()
        distances = found.column("_distance").to_pylist()
        return [(int(r), 1.0 - float(d)) for r, d in zip(rows, distances, strict=True)]

    def close(self) -> None:
        pass


class QdrantStore:
    def __init__(self, client: Any, collection: str, *, server: bool = False) -> None:
        self.client = client
        self.collection = collection
        self.server = server

    @staticmethod
    def client_for(path: Path | None, url: str | None) -> Any:
        from qdrant_client import QdrantClient

        try:
            return QdrantClient(url=url) if url else QdrantClient(path=str(path))
        except Exception as exc:  # noqa: BLE001 - connection and lock errors come in many kinds
            where = url or path
            raise RetrievalError(f"qdrant store at {where}: {exc}") from None

    @classmethod
    def create(cls, path: Path | None, vectors: np.ndarray, *, url: str | None, collection: str) -> QdrantStore:
        from qdrant_client import models

        if url is None and path is not None and path.exists():
            shutil.rmtree(path)
        client = cls.client_for(path, url)
        if client.collection_exists(collection):
            client.delete_collection(collection)
        client.create_collection(
            collection, vectors_config=models.VectorParams(size=int(vectors.shape[1]), distance=models.Distance.COSINE)
        )
        batch = 256
        for start in range(0, len(vectors), batch):
            block = vectors[start : start + batch]
            client.upsert(
                collection,
                points=models.Batch(
                    ids=list(range(start, start + len(block))), vectors=block.astype(np.float32).tolist()
                ),
            )
        return cls(client, collection, server=url is not None)

    def search(self, vector: np.ndarray, limit: int) -> list[tuple[int, float]]:
        from qdrant_client import models

        # local mode always searches exhaustively; a server is told to, so that it matches LanceDB
        exact = models.SearchParams(exact=True) if self.server else None
        found = self.client.query_points(
            self.collection, query=vector.astype(np.float32).tolist(), limit=limit, search_params=exact
        ).points
        return [(int(p.id), float(p.score)) for p in found]

    def close(self) -> None:
        self.client.close()


def create_store(kind: str, root: Path, vectors: np.ndarray, settings: dict[str, Any]) -> VectorStore:
    """Write ``vectors`` into a new store of ``kind`` under the index directory ``root``."""
    if kind == "lancedb":
        return LanceStore.create(root / "lancedb", vectors)
    if kind == "qdrant":
        url = settings.get("url")
        return QdrantStore.create(None if url else root / "qdrant", vectors, url=url, collection=settings["collection"])
    raise RetrievalError(f"unknown store {kind!r} (known: {', '.join(STORES)})")


def open_store(kind: str, root: Path, settings: dict[str, Any]) -> VectorStore | None:
    """The existing store of an index, or None when it is not there (a pulled index rebuilds it)."""
    if kind == "lancedb":
        return LanceStore(root / "lancedb") if (root / "lancedb").is_dir() else None
    if kind == "qdrant":
        url = settings.get("url")
        if not url and not (root / "qdrant").is_dir():
            return None
        client = QdrantStore.client_for(None if url else root / "qdrant", url)
        if not client.collection_exists(settings["collection"]):
            client.close()
            return None
        return QdrantStore(client, settings["collection"], server=bool(url))
    raise RetrievalError(f"unknown store {kind!r} (known: {', '.join(STORES)})")
