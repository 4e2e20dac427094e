"""Reading and validating an image-caption dataset in the Hugging Face ``imagefolder`` layout.

::

    dataset/
      train/metadata.jsonl      {"file_name": "lighthouse-01.png", "text": "a lighthouse at dusk"}   one per line
      train/lighthouse-01.png
      validation/metadata.jsonl  held-out split (optional); ``test/`` is read too
      test/metadata.jsonl

Every split directory found is read; polyadapt picks the held-out one by its rule for every modality (``validation``,
else ``test``, else a ``data.holdout`` cut of ``train``). A directory holding ``metadata.jsonl`` directly is read as a
single ``train`` split. Any other subdirectory is not read: ``general/`` is the forgetting check's set
(``eval.general_data: auto``), read on its own as general data, whose captions get no trigger phrase.

Every sample is checked before any model loads, so ``polyadapt doctor`` lists every bad one with its file and reason:
bad JSON line, missing ``file_name`` or caption, a path escaping the dataset root, a missing or zero-size file, a file
that is not an image, a pixel count above ``image.max_image_pixels`` (decompression bombs), a truncated or corrupt
image. Files are only read, never changed or deleted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyadapt.data import Problem, read_jsonl, resolve_inside
from polyadapt.modality import DataFound

if TYPE_CHECKING:
    from PIL import Image

    from polyadapt.modality import DataContext

METADATA = "metadata.jsonl"
#: the split directories read, each holding its own metadata.jsonl
SPLIT_DIRS = ("train", "validation", "test")
#: the layout, for the message when a directory holds no dataset
LAYOUT = f"train/{METADATA} (imagefolder layout), optionally validation/{METADATA} or test/{METADATA}"


@dataclass(frozen=True)
class ImageSample:
    """One valid image with its caption (trigger already applied). ``key`` is its path relative to the dataset;
    ``metadata`` and ``line`` say where the caption was read."""

    path: Path
    caption: str
    key: str
    metadata: str | None = None
    line: int | None = None

    # -- polyadapt.pii.TextFields: the caption is what ``data.pii`` scans and redacts (the pixels are not read) -----
    def text_fields(self) -> dict[str, str]:
        return {"caption": self.caption}

    def with_text_fields(self, fields: dict[str, str]) -> ImageSample:
        return replace(self, caption=fields.get("caption", self.caption))

    def text_location(self) -> tuple[str, int | None]:
        return self.metadata or self.key, self.line


def apply_trigger(caption: str, trigger: str | None, position: str = "suffix") -> str:
    """The caption the model trains on: ``"<caption>, <trigger>"`` (or ``"<trigger>, <caption>"`` with position
    ``prefix``), unless the caption already contains the trigger (case-insensitive), in which case it is unchanged."""
    caption = caption.strip()
    if not trigger or trigger.lower() in caption.lower():
        return caption
    return f"{trigger}, {caption}" if position == "prefix" else f"{caption}, {trigger}"


def check_image(path: Path, max_pixels: int) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it decodes completely."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot read file: {exc.strerror}"
    if not path.is_file():
        return "not a regular file"
    if size == 0:
        return "zero-size file"
    with warnings.catch_warnings():
        # Pillow warns (and past 2x its limit refuses) on huge images; our own limit below is the one that counts.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return (
                        f"image is {width}x{height} = {width * height} pixels, above image.max_image_pixels "
                        f"({max_pixels}); refusing to decode (decompression-bomb guard)"
                    )
                if width == 0 or height == 0:
                    return f"image has zero width or height ({width}x{height})"
                image.load()
        except Image.DecompressionBombError as exc:
            return f"refusing to decode (decompression-bomb guard): {exc}"
        except UnidentifiedImageError:
            return "not an image (Pillow cannot identify the format)"
        except (OSError, SyntaxError, ValueError) as exc:
            return f"truncated or corrupt image: {exc}"
    return None


def read_split(
    root: Path, directory: Path, split: str, settings: Any, trigger: str | None = None
) -> tuple[list[ImageSample], list[Problem], list[Path]]:
    """Samples, problems and files of one split directory (which holds ``metadata.jsonl``); ``trigger`` is added to
    every caption by ``settings.trigger_position``."""
    metadata = directory / METADATA
    shown = _shown(root, metadata)
    samples: list[ImageSample] = []
    files = [metadata]
    records, problems = read_jsonl(metadata, shown, split, "a JSON object with file_name and text")
    seen: set[str] = set()
    for number, record in records:
        name = record.get("file_name")
        if not isinstance(name, str) or not name.strip():
            problems.append(Problem(shown, "missing 'file_name'", line=number, split=split))
            continue
        target = resolve_inside(directory, name)
        where = _shown(root, directory / name)
        if target is None:
            problems.append(
                Problem(where, f"file_name {name!r} escapes the dataset directory", line=number, split=split)
            )
            continue
        caption = record.get(settings.caption_column)
        if not isinstance(caption, str) or not caption.strip():
            problems.append(
                Problem(
                    where, f"missing caption (key {settings.caption_column!r} in {shown})", line=number, split=split
                )
            )
            continue
        reason = check_image(target, settings.max_image_pixels)
        if reason is not None:
            problems.append(Problem(where, reason, line=number, split=split))
            continue
        key = _shown(root, target)
        if key in seen:
            problems.append(Problem(where, f"listed twice in {shown}", line=number, split=split))
            continue
        seen.add(key)
        files.append(target)
        caption = apply_trigger(caption, trigger, settings.trigger_position)
        samples.append(ImageSample(target, caption, key, metadata=shown, line=number))
    return samples, problems, files


def read_dataset(ctx: DataContext) -> DataFound:
    """Every split directory at ``ctx.path`` as :class:`ImageSample` lists (see the module docstring). General data
    (``ctx.general``) keeps its captions as written: the forgetting check asks what the adapted model draws without
    the trigger."""
    settings = ctx.settings
    trigger = None if ctx.general else settings.trigger
    root = Path(ctx.path)
    found = {name: root / name for name in SPLIT_DIRS if (root / name / METADATA).is_file()}
    if not found and (root / METADATA).is_file():
        found = {"train": root}
    splits: dict[str, list[ImageSample]] = {}
    problems: list[Problem] = []
    files: list[Path] = []
    for name, directory in found.items():
        splits[name], bad, used = read_split(root, directory, name, settings, trigger)
        problems += bad
        files += used
    rule = "captions used as written (general data)" if ctx.general else _rule(settings)
    details: dict[str, Any] = {"layout": "imagefolder", "trigger": trigger, "trigger_rule": rule}
    return DataFound(splits=splits, files=files, problems=problems, details=details)


def load_image(path: Path, resolution: int, center_crop: bool, rng: Any = None, flip: bool = False) -> Image.Image:
    """RGB, shorter side resized to ``resolution``, then a center crop (or a random one drawn from ``rng``)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("P", "LA", "RGBA", "PA") or "transparency" in image.info:
            # flatten transparency onto white rather than letting it turn black
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(canvas, rgba)
        image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    extra_x, extra_y = size[0] - resolution, size[1] - resolution
    if center_crop or rng is None:
        left, top = extra_x // 2, extra_y // 2
    else:
        left, top = rng.randint(0, extra_x), rng.randint(0, extra_y)
    image = image.crop((left, top, left + resolution, top + resolution))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def _rule(settings: Any) -> str:
    if not settings.trigger:
        return "captions used as written (no image.trigger)"
    order = "'<trigger>, <caption>'" if settings.trigger_position == "prefix" else "'<caption>, <trigger>'"
    return f"{order} unless the caption already contains the trigger"


def _shown(root: Path, path: Path) -> str:
    """``path`` as the user knows it: under the dataset path exactly as the config spelled it."""
    for base in (root, root.resolve()):
        try:
            return str(root / path.relative_to(base))
        except ValueError:
            continue
    return str(path)
