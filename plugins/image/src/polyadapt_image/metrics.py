"""Image metrics: the brand-style (palette) distance, an optional CLIP score, and validation grids.

Brand-style distance (lower is better), in CIELAB ΔE76 units:

1. Every pixel of a set of images is converted from sRGB (D65) to CIELAB.
2. The set's palette is ``k`` colours found by k-means in Lab (deterministic initialisation), each weighted by the
   share of pixels nearest to it.
3. The distance between the palette ``G`` of the generated images and the palette ``B`` of the held-out brand images
   is the symmetric weighted chamfer distance::

       d(G, B) = 1/2 * ( sum_i w_i(G) * min_j |g_i - b_j|  +  sum_j w_j(B) * min_i |b_j - g_i| )

   The first term is large when the generated images use colours the brand does not; the second when they miss
   colours the brand uses. 0 means the same palette; a ΔE of about 2 is a just-noticeable colour difference.

Base-output distance (lower is better; the forgetting check on general prompts), also in ΔE76: for each (prompt,
seed) pair, the mean over pixels of the CIELAB distance between the adapted pipeline's image and the base pipeline's
image, averaged over the pairs. 0 means the adapter draws exactly what the base drew; it is 0 for the base itself.
Unlike the palette distance it sees layout as well as colour: a shape moved or redrawn counts.
"""

from __future__ import annotations

import base64
import io
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in [0, 255], any leading shape, last axis of 3."""
    c = rgb.astype(np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    matrix = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
    )
    xyz = linear @ matrix.T / np.array([0.95047, 1.0, 1.08883])
    delta = 6 / 29
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4 / 29)
    lab = np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)
    return lab


def palette(images: list[Image.Image], k: int = 8, iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """``k`` Lab colours summarising ``images`` and their pixel shares (k-means, deterministic farthest-point init)."""
    pixels = np.concatenate([srgb_to_lab(np.asarray(im.convert("RGB"))).reshape(-1, 3) for im in images])
    k = min(k, len(np.unique(pixels.round(3), axis=0)))
    # farthest-point initialisation from the mean colour: deterministic and spreads over distinct colours
    centres = [pixels[np.argmin(np.linalg.norm(pixels - pixels.mean(0), axis=1))]]
    for _ in range(1, k):
        distance = np.min(np.linalg.norm(pixels[:, None] - np.array(centres)[None], axis=2), axis=1)
        centres.append(pixels[np.argmax(distance)])
    centres = np.array(centres)
    for _ in range(iterations):
        nearest = np.argmin(np.linalg.norm(pixels[:, None] - centres[None], axis=2), axis=1)
        updated = np.array([pixels[nearest == j].mean(0) if np.any(nearest == j) else centres[j] for j in range(k)])
        if np.allclose(updated, centres):
            break
        centres = updated
    nearest = np.argmin(np.linalg.norm(pixels[:, None] - centres[None], axis=2), axis=1)
    weights = np.bincount(nearest, minlength=k) / len(pixels)
    return centres, weights


def palette_distance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """Symmetric weighted chamfer distance between two palettes (see the module docstring)."""
    (ca, wa), (cb, wb) = a, b
    pairwise = np.linalg.norm(ca[:, None] - cb[None], axis=2)
    return float(0.5 * (np.sum(wa * pairwise.min(axis=1)) + np.sum(wb * pairwise.min(axis=0))))


def brand_style_distance(generated: list[Image.Image], reference: list[Image.Image], k: int = 8) -> float:
    """Palette distance (ΔE76) between generated images and the held-out brand images; lower is more on-brand."""
    return palette_distance(palette(generated, k), palette(reference, k))


def base_output_distance(generated: list[Image.Image], base: list[Image.Image]) -> float:
    """Mean per-pixel CIELAB distance (ΔE76) between each generated image and the base's image of the same prompt and
    seed (same order, same size), averaged over the pairs; see the module docstring."""
    if len(generated) != len(base) or not generated:
        raise ValueError(f"need pairs of images: {len(generated)} generated, {len(base)} from the base")
    distances = []
    for a, b in zip(generated, base, strict=True):
        lab_a, lab_b = (srgb_to_lab(np.asarray(image.convert("RGB"))) for image in (a, b))
        distances.append(np.linalg.norm(lab_a - lab_b, axis=-1).mean())
    return float(np.mean(distances))


@lru_cache(maxsize=2)
def _clip(path: str) -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path, use_safetensors=True).eval()
    return model, CLIPProcessor.from_pretrained(path)


def clip_score(images: list[Image.Image], prompts: list[str], model_path: Path) -> float:
    """Mean CLIP score, 100 * max(cos(image, text), 0), of each image with its prompt (a local CLIP model only)."""
    import torch

    model, processor = _clip(str(model_path))
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        out = model(**inputs)
    image = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    text = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    return float((100 * (image * text).sum(-1).clamp(min=0)).mean())


def image_grid(images: list[Image.Image], columns: int, upscale: int = 1) -> Image.Image:
    """Images tiled row by row (all the size of the first), optionally enlarged without smoothing."""
    from PIL import Image

    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((width, height)), ((i % columns) * width, (i // columns) * height))
    if upscale > 1:
        grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.Resampling.NEAREST)
    return grid


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
