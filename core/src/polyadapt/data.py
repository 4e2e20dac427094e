"""Data helpers shared by every modality: bad-sample records, safe paths, held-out splits and fingerprints."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import DataError

if TYPE_CHECKING:
    from .config import AdaptConfig
    from .modality import DataFound, DatasetSplits

T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    """One bad sample: where it is (file, optional line) and why it is bad."""

    file: str
    reason: str
    line: int | None = None
    split: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def read_jsonl(
    path: Path, shown: str, split: str | None = None, expected: str = "a JSON object"
) -> tuple[list[tuple[int, dict[str, Any]]], list[Problem]]:
    """The records of a JSON Lines file with their line numbers, and a Problem for each line that is not a JSON object.

    Blank lines are skipped. ``shown`` is the file name used in messages; ``expected`` completes "expected ...".
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return [], [Problem(shown, f"not UTF-8 text: {exc.reason} at byte {exc.start}", split=split)]
    records: list[tuple[int, dict[str, Any]]] = []
    problems: list[Problem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(shown, f"invalid JSON: {exc.msg} (column {exc.colno})", line=number, split=split))
            continue
        if not isinstance(record, dict):
            problems.append(
                Problem(shown, f"expected {expected}, got {type(record).__name__}", line=number, split=split)
            )
            continue
        records.append((number, record))
    return records, problems


def resolve_inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` if it stays inside ``root`` (after resolving ``..`` and links), else None."""
    root = root.resolve()
    candidate = (root / relative).resolve()
    return candidate if candidate.is_relative_to(root) else None


def deterministic_holdout(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T], list[int]]:
    """Cut a held-out split: the same items, seed and fraction always give the same split.

    :return: ``(train, holdout, holdout_indices)``; at least one item is held out when there are two or more.
    """
    n = len(items)
    if n < 2:
        return list(items), [], []
    count = min(n - 1, max(1, round(n * fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:count])
    held_set = set(held)
    return [x for i, x in enumerate(items) if i not in held_set], [items[i] for i in held], held


HELDOUT_SPLITS = ("validation", "test")


def choose_heldout(found: DataFound, config: AdaptConfig, path: Path, layout: str) -> DatasetSplits:
    """The one held-out rule of every modality: the ``validation`` split, else ``test``, else a deterministic
    ``data.holdout`` cut of ``train`` (seeded by ``train.seed``), recorded in ``DatasetSplits.heldout``.

    A directory in which the modality found no split at all (and no bad sample either) is a :class:`DataError`
    naming the expected ``layout``; a directory with only a held-out split gives an empty ``train``.
    """
    from .modality import DatasetSplits

    splits = dict(found.splits)
    if not splits and not found.problems:
        raise DataError(f"data.path: {path} holds no dataset (expected {layout})")
    train = list(splits.get("train", []))
    source = next((name for name in HELDOUT_SPLITS if name in splits), None)
    if source is not None:
        validation = list(splits[source])
        heldout: dict[str, Any] = {"source": source}
    else:
        fraction, seed = config.data.holdout, config.train.seed
        train, validation, indices = deterministic_holdout(train, fraction, seed)
        heldout = {"source": "holdout", "fraction": fraction, "seed": seed, "indices": indices}
    return DatasetSplits(
        train=train,
        validation=validation,
        heldout=heldout,
        files=list(found.files),
        problems=list(found.problems),
        dropped=dict(found.dropped),
        warnings=list(found.warnings),
        details=dict(found.details),
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(files: Iterable[Path], root: Path | None = None) -> dict[str, Any]:
    """sha256 of every file and a combined digest over (relative name, digest) pairs, order-independent."""
    entries: dict[str, str] = {}
    for path in files:
        path = Path(path)
        name = (
            str(path.resolve().relative_to(root.resolve()))
            if root and path.resolve().is_relative_to(root.resolve())
            else str(path)
        )
        entries[name] = sha256_file(path)
    combined = hashlib.sha256()
    for name in sorted(entries):
        combined.update(f"{name}\0{entries[name]}\n".encode())
    return {"files": dict(sorted(entries.items())), "sha256": combined.hexdigest()}


def enforce_bad_sample_policy(problems: list[Problem], policy: str, where: str) -> list[dict[str, Any]]:
    """Apply ``data.on_bad_sample``: raise listing every problem (``fail``) or return them for the manifest."""
    if problems and policy == "fail":
        raise DataError(
            f"{len(problems)} bad sample(s) in {where} (set data.on_bad_sample: skip to train without them)", problems
        )
    return [p.as_dict() for p in problems]
