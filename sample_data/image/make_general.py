"""Draw the general image set: generic prompts from the base's own pretraining distribution (the forgetting check).

    python sample_data/image/make_general.py     # deterministic; rewrites sample_data/image/general/test/

Four pictures of one generic shape in one generic colour on a plain background of another, drawn exactly as
``make_base.py`` draws the base's pretraining pictures (32x32, same shapes, same colours, same caption form), with no
brand colour (navy, teal, sand, gold), motif or trigger phrase. ``eval.general_data: auto`` takes ``general/`` as
the general set: the image plugin measures the held-out denoising loss on these pictures, and generates their
captions with the validation seeds to compare the adapted pipeline's images with the base pipeline's own
(``base_output_distance``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from make_base import COLOURS, draw_shape

HERE = Path(__file__).resolve().parent
# (shape, colour, background): shapes the base draws well (see base_preview.png), colours of its pretraining
PICTURES = [
    ("circle", "red", "white"),
    ("square", "blue", "yellow"),
    ("stripes", "yellow", "purple"),
    ("circle", "black", "cyan"),
]


def main() -> None:
    rng = random.Random(11)
    directory = HERE / "general" / "test"
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (shape, colour, background) in enumerate(PICTURES):
        image = draw_shape(shape, COLOURS[colour], COLOURS[background], rng)
        name = f"{shape}-{index:02d}.png"
        image.save(directory / name, optimize=True)
        rows.append({"file_name": name, "text": f"a {colour} {shape} on a {background} background"})
    (directory / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} general images under {directory}")


if __name__ == "__main__":
    main()
