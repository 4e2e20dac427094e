"""Draw the Harbor Bank brand-style image set (64x64 PNGs with captions, train/ and test/ splits).

    python sample_data/image/make_brand.py     # deterministic; rewrites sample_data/image/{train,test}/

Harbor Bank (the fictional bank of every polyadapt sample set) has a flat, nautical visual identity: a navy, teal,
sand and gold palette with foam-white accents, and four motifs: waves, an anchor, a lighthouse and a sailboat, drawn
as simple flat shapes over a plain or horizon background. Captions describe the motif and colours in plain words;
the trigger phrase ("in harbor style") is added by the image plugin's caption rule, not written here.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = {
    "navy": (22, 38, 84),
    "teal": (0, 128, 128),
    "sand": (226, 204, 160),
    "gold": (214, 168, 48),
    "foam": (240, 238, 228),
}
MOTIFS = ("waves", "anchor", "lighthouse", "sailboat")
SIZE, SCALE = 64, 4
HERE = Path(__file__).resolve().parent


def waves(draw: ImageDraw.ImageDraw, colour: tuple, top: float, rng: random.Random, big: int) -> None:
    amplitude, length = rng.uniform(0.03, 0.05) * big, rng.uniform(0.3, 0.5) * big
    phase = rng.uniform(0, 2 * math.pi)
    points = [(x, top + amplitude * math.sin(2 * math.pi * x / length + phase)) for x in range(0, big + 1, 4)]
    draw.polygon(points + [(big, big), (0, big)], fill=colour)


def anchor(draw: ImageDraw.ImageDraw, colour: tuple, cx: float, cy: float, r: float) -> None:
    w = r * 0.16
    draw.ellipse((cx - r * 0.25, cy - r, cx + r * 0.25, cy - r * 0.5), outline=colour, width=int(w))
    draw.rectangle((cx - w / 2, cy - r * 0.55, cx + w / 2, cy + r * 0.8), fill=colour)
    draw.rectangle((cx - r * 0.5, cy - r * 0.35, cx + r * 0.5, cy - r * 0.35 + w), fill=colour)
    draw.arc((cx - r * 0.8, cy - r * 0.2, cx + r * 0.8, cy + r * 0.95), 20, 160, fill=colour, width=int(w))


def lighthouse(draw: ImageDraw.ImageDraw, body: tuple, stripe: tuple, light: tuple, cx: float, base: float, r: float) -> None:
    top = base - 2.2 * r
    draw.polygon([(cx - r * 0.45, base), (cx + r * 0.45, base), (cx + r * 0.28, top), (cx - r * 0.28, top)], fill=body)
    for k in range(1, 4):
        y = base - k * 0.55 * r
        draw.rectangle((cx - r * 0.45, y - r * 0.12, cx + r * 0.45, y + r * 0.12), fill=stripe)
    draw.rectangle((cx - r * 0.3, top - r * 0.35, cx + r * 0.3, top), fill=light)
    draw.polygon([(cx - r * 0.38, top - r * 0.35), (cx + r * 0.38, top - r * 0.35), (cx, top - r * 0.7)], fill=body)


def sailboat(draw: ImageDraw.ImageDraw, hull: tuple, sail: tuple, cx: float, base: float, r: float) -> None:
    draw.polygon([(cx - r, base - r * 0.3), (cx + r, base - r * 0.3), (cx + r * 0.7, base), (cx - r * 0.7, base)], fill=hull)
    draw.polygon([(cx, base - r * 0.35), (cx, base - r * 1.9), (cx + r * 0.9, base - r * 0.35)], fill=sail)
    draw.polygon([(cx - r * 0.1, base - r * 0.35), (cx - r * 0.1, base - r * 1.5), (cx - r * 0.8, base - r * 0.35)], fill=sail)


def picture(motif: str, rng: random.Random) -> tuple[Image.Image, str]:
    big = SIZE * SCALE
    background = rng.choice(("navy", "sand", "teal"))
    accents = [c for c in ("navy", "teal", "gold", "foam", "sand") if c != background]
    image = Image.new("RGB", (big, big), PALETTE[background])
    draw = ImageDraw.Draw(image)
    if motif == "waves":
        bands = rng.choice((2, 3))
        colours = rng.sample(accents, bands)
        for k, colour in enumerate(colours):
            waves(draw, PALETTE[colour], big * (0.35 + 0.2 * k), rng, big)
        return image, f"{' and '.join(colours)} waves on a {background} background"
    sea = rng.choice([c for c in accents if c != "gold"])
    waves(draw, PALETTE[sea], big * rng.uniform(0.72, 0.8), rng, big)
    colour = rng.choice([c for c in accents if c != sea])
    cx = big * rng.uniform(0.38, 0.62)
    r = big * rng.uniform(0.26, 0.32)
    if motif == "anchor":
        anchor(draw, PALETTE[colour], cx, big * 0.45, r)
        return image, f"a {colour} anchor above {sea} waves on a {background} background"
    if motif == "lighthouse":
        stripe = rng.choice([c for c in accents if c not in (colour, sea)] or ["foam"])
        lighthouse(draw, PALETTE[colour], PALETTE[stripe], PALETTE["gold"], cx, big * 0.78, r)
        return image, f"a {colour} and {stripe} lighthouse by the sea on a {background} background"
    sail = rng.choice([c for c in ("foam", "sand", "gold") if c not in (background, colour)])
    sailboat(draw, PALETTE[colour], PALETTE[sail], cx, big * 0.76, r * 0.8)
    return image, f"a sailboat with {sail} sails on {sea} waves, {background} background"


def main() -> None:
    rng = random.Random(7)
    records = {"train": [], "test": []}
    for index in range(40):
        motif = MOTIFS[index % len(MOTIFS)]
        image, caption = picture(motif, rng)
        split = "test" if index >= 32 else "train"
        name = f"{motif}-{index:02d}.png"
        directory = HERE / split
        directory.mkdir(parents=True, exist_ok=True)
        image.resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(directory / name, optimize=True)
        records[split].append({"file_name": name, "text": caption})
    for split, rows in records.items():
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        (HERE / split / "metadata.jsonl").write_text(lines, encoding="utf-8")
    print(f"wrote {len(records['train'])} train and {len(records['test'])} test images under {HERE}")


if __name__ == "__main__":
    main()
