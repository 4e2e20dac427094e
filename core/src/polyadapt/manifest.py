"""The lineage manifest (``polyadapt.json``) and the atomic JSON writes every run file goes through."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .data import sha256_file

MANIFEST_NAME = "polyadapt.json"
SCHEMA_VERSION = 1
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


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


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
