"""The retrieval layer's typed errors (the CLI turns them into one line and exit code 2, like every PolyadaptError)."""

from __future__ import annotations

from ..errors import PolyadaptError


class RetrievalError(PolyadaptError):
    """An index cannot be built, opened or queried: a missing or unreadable index, an unknown embedding model, a
    store that cannot be reached."""


class EmbeddingMismatchError(RetrievalError):
    """A query embedder differs from the model the index was built with (``built`` and ``given`` name both)."""

    def __init__(self, index: str, built: str, built_dim: int, given: str, given_dim: int) -> None:
        self.built, self.built_dim, self.given, self.given_dim = built, built_dim, given, given_dim
        super().__init__(
            f"{index} was built with embedding model {built} (dimension {built_dim}); it refuses queries embedded "
            f"by {given} (dimension {given_dim}): rebuild the index with that model or query with the one it was "
            "built with"
        )
