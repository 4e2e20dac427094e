"""The image section of report.html: base and adapted validation grids side by side, embedded as PNG data."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from polyadapt.modality import EvalResult


def grid_section(before: EvalResult | None, after: EvalResult) -> tuple[str, str] | None:
    """``(title, html)`` with the base and adapted grids (same prompts and seeds), or None without grids."""
    from .metrics import png_data_uri

    columns = []
    for label, result, key in (("base", before, "base_grid"), ("adapted", after, "adapted_grid")):
        path = result.artifacts.get(key) if result is not None else None
        if path is not None and path.exists():
            columns.append(
                f'<figure style="display:inline-block;margin:0 1em"><img src="{png_data_uri(path)}" '
                f'style="image-rendering:pixelated;width:256px" alt="{label} grid"><figcaption>{label}</figcaption></figure>'
            )
    if not columns:
        return None
    rows = {}
    for example in after.examples:
        rows.setdefault(example["prompt"], []).append(str(example["seed"]))
    legend = "".join(
        f"<li>row {i + 1}: {html.escape(prompt)} (seeds {', '.join(seeds)})</li>"
        for i, (prompt, seeds) in enumerate(rows.items())
    )
    body = (
        "<p>Images generated from the same prompts and seeds before and after adaptation; one row per prompt, "
        f'one column per seed.</p>{"".join(columns)}<ol style="list-style:none;padding:0">{legend}</ol>'
    )
    return "Validation images: base vs adapted", body
