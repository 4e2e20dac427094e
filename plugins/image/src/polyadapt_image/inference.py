"""``polyadapt infer RUN --prompt ... --n 4 --seed 0 --out DIR [--scale S] [--adapter OTHER_RUN:WEIGHT ...]``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyadapt.errors import ConfigError
from polyadapt.peft_run import DEFAULT_ADAPTER

if TYPE_CHECKING:
    import click

    from .modality import ImageRun


def infer_params() -> list[click.Parameter]:
    import click

    return [
        click.Option(["--prompt"], required=True, help="Text prompt (include the run's trigger phrase for its style)."),
        click.Option(["--n"], type=click.IntRange(min=1), default=4, show_default=True, help="Images to generate."),
        click.Option(
            ["--seed"], type=int, default=0, show_default=True, help="Seed of the first image (then +1 each)."
        ),
        click.Option(
            ["--out"], type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for PNGs."
        ),
        click.Option(["--scale"], type=float, default=1.0, show_default=True, help="Strength of this run's LoRA."),
        click.Option(
            ["--adapter"],
            multiple=True,
            metavar="RUN:WEIGHT",
            help="Also apply another image run's LoRA with this weight (repeatable).",
        ),  # fmt: skip
        click.Option(["--steps"], type=click.IntRange(min=1), default=None, help="Sampler steps (default: the run's)."),
        click.Option(["--guidance"], type=float, default=None, help="Guidance scale (default: the run's)."),
    ]


def parse_adapter(value: str) -> tuple[Path, float]:
    """``RUN:WEIGHT`` (weight optional, default 1.0) -> (run directory, weight)."""
    path, sep, weight = value.rpartition(":")
    if not sep:
        return Path(value), 1.0
    try:
        return Path(path), float(weight)
    except ValueError:
        return Path(value), 1.0


def infer(run: ImageRun, options: dict[str, Any]) -> list[str]:
    """Generate ``--n`` images for ``--prompt`` with seeds ``--seed``, ``--seed + 1``...; write them as PNGs.

    The run's own LoRA (``default``) is weighted by ``--scale``; each ``--adapter`` is loaded next to it as
    ``adapter_1``, ``adapter_2``... and all are combined (:meth:`ImageRun.combine_adapters`).
    """
    from .model import LORA_FILE, generate

    settings = run.settings
    weights = {DEFAULT_ADAPTER: options.get("scale", 1.0)}
    for i, value in enumerate(options.get("adapter") or ()):
        other, weight = parse_adapter(value)
        if not (other / LORA_FILE).is_file():
            raise ConfigError(f"--adapter {other}: no {LORA_FILE} there (is it an image run?)")
        name = f"adapter_{i + 1}"
        run.load_adapter(other, name)
        weights[name] = weight
    run.combine_adapters(weights)
    n, seed = options["n"], options["seed"]
    images = generate(
        run, [options["prompt"]] * n, list(range(seed, seed + n)), settings.resolution,
        options.get("steps") or settings.num_inference_steps,
        settings.guidance_scale if options.get("guidance") is None else options["guidance"],
    )  # fmt: skip
    out = Path(options["out"])
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"adapters: {', '.join(f'{n}={w:g}' for n, w in weights.items())}"]
    if run.strategy.truncated([options["prompt"]]):
        window = run.tokenizer.model_max_length
        lines.append(f"warning: the prompt is longer than the text encoder's {window} tokens; its end was ignored")
    for i, image in enumerate(images):
        path = out / f"{seed + i:04d}.png"
        image.save(path)
        lines.append(str(path))
    return lines
