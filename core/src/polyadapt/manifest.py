"""The lineage manifest (``polyadapt.json``): a typed, versioned record, validated when read, and the atomic JSON
writes every run file goes through.

The manifest is what the registry, the server and ``evaluate``/``export`` read back, so it is a schema, not a free
dict: :class:`Manifest` names every section; a file that does not match it is refused naming the key and the reason.
Sections that modalities fill (``base`` info, ``data.details``, prepared statistics) are open mappings inside it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .data import sha256_file
from .errors import RunDirectoryError

MANIFEST_NAME = "polyadapt.json"
#: 2: typed sections, ``data.heldout``; version 1 files (before the schema) are read and upgraded
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt")
TRACKED_LIBRARIES = (
    "torch", "torchaudio", "transformers", "peft", "accelerate", "diffusers", "tokenizers", "safetensors",
    "pluggy", "pydantic", "numpy", "jiwer", "librosa", "soundfile", "gguf",
)  # fmt: skip


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Record(BaseModel):
    """A manifest section: known keys typed, unknown keys refused."""

    model_config = ConfigDict(extra="forbid")


class OpenRecord(BaseModel):
    """A manifest section whose extra keys come from the modality (architecture, tokenizer facts...)."""

    model_config = ConfigDict(extra="allow")


class PluginRecord(Record):
    distribution: str | None = None
    version: str | None = None
    status: str


class BaseRecord(OpenRecord):
    reference: str
    path: str | None = None
    hub_id: str | None = None
    weights_sha256: dict[str, str] = Field(default_factory=dict)


class DataRecord(Record):
    path: str
    fingerprint: dict[str, Any]
    counts: dict[str, int]
    heldout: dict[str, Any] = Field(default_factory=dict)
    dropped: dict[str, int] = Field(default_factory=dict)
    bad_samples_skipped: list[dict[str, Any]] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)
    prepared: dict[str, Any] = Field(default_factory=dict)


class MetricsRecord(Record):
    #: the metric that decides whether the adapted model is better (``Modality.headline_metric``)
    headline: str | None = None
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    general_before: dict[str, float] | None = None
    general_after: dict[str, float] | None = None


class AdapterRecord(Record):
    method: str
    parameters: dict[str, int]
    files: dict[str, str] = Field(default_factory=dict)


class TrainingRecord(Record):
    steps: int
    total_steps: int
    #: full passes over the training items; ``epochs`` is the fraction (optimizer steps x global batch / items)
    epochs_completed: int
    epochs: float | None = None
    samples_seen: int
    seconds: float
    stopped_early: bool
    best_step: int | None = None
    best_metric: float | None = None
    resumed_from: str | None = None


class Manifest(Record):
    """``polyadapt.json``: the lineage of one run, from dataset snapshot and base weights to adapter files."""

    schema_version: int = Field(SCHEMA_VERSION, alias="schema")
    status: Literal["running", "failed", "complete"]
    polyadapt_version: str
    plugins: dict[str, PluginRecord] = Field(default_factory=dict)
    modality: str
    base: BaseRecord
    config: dict[str, Any]
    data: DataRecord
    seed: int
    hardware: dict[str, Any] = Field(default_factory=dict)
    libraries: dict[str, str] = Field(default_factory=dict)
    started: str
    finished: str | None = None
    resumed: list[str] = Field(default_factory=list)
    #: ``{"train.lr": {"value": 0.001, "rule": "..."}}``: every value polyadapt chose, and why
    auto: dict[str, dict[str, Any]] = Field(default_factory=dict)
    metrics: MetricsRecord = Field(default_factory=MetricsRecord)
    #: whether the adapted model beats the base on ``metrics.headline`` (None: no "before" to compare with)
    improved: bool | None = None
    adapter: AdapterRecord | None = None
    training: TrainingRecord | None = None
    evaluations: list[dict[str, Any]] = Field(default_factory=list)
    #: the adapters a composed adapter was made from: each one's reference, digests and lineage
    parents: list[dict[str, Any]] = Field(default_factory=list)
    #: how a composed adapter was made: method, weights, rank, density, truncation error
    composition: dict[str, Any] | None = None
    #: how a federated adapter was made: sites (data fingerprints, sample counts), rounds, aggregator, DP budget, bytes
    federation: dict[str, Any] | None = None
    error: str | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        """The JSON-able content, with ``schema`` as the first key."""
        return self.model_dump(mode="json", by_alias=True)


def parse_manifest(data: Any, source: str) -> Manifest:
    """Validate manifest content; a mismatch is a :class:`RunDirectoryError` naming ``source``, the key and why."""
    if not isinstance(data, dict):
        raise RunDirectoryError(f"{source}: expected a JSON object, got {type(data).__name__}")
    schema = data.get("schema")
    if schema not in READABLE_SCHEMAS:
        raise RunDirectoryError(
            f"{source}: manifest schema {schema!r} is not one this polyadapt reads ({', '.join(map(str, READABLE_SCHEMAS))})"
        )
    if schema == 1:
        data = _upgrade_v1(data)
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise RunDirectoryError(f"{source}: invalid manifest: {key}: {first['msg']}{more}") from None


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))
    data["schema"] = SCHEMA_VERSION
    record = data.get("data", {})
    details = record.get("details", {})
    record.setdefault("heldout", {"source": "validation"} if "holdout" not in details else {"source": "holdout"})
    return data


def read_manifest(run_dir: Path) -> Manifest | None:
    """The validated manifest of ``run_dir``, or None when it has none. Unreadable or invalid content is a
    :class:`RunDirectoryError` naming the file."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunDirectoryError(f"{path} is not valid JSON ({exc})") from None
    return parse_manifest(data, str(path))


def version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str]:
    return {name: v for name in TRACKED_LIBRARIES if (v := version_of(name))}


def hardware_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_version"] = torch.version.cuda
    return info


def base_weights_digest(path: Path | None) -> dict[str, str]:
    """sha256 of the base model's weight files (a single file, or the weight files of a directory)."""
    if path is None:
        return {}
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {
        str(p.relative_to(path)): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    }


def plugin_versions(pm: Any) -> dict[str, Any]:
    return {
        name: {"distribution": info.distribution, "version": info.version, "status": info.status}
        for name, info in pm.infos.items()
    }
