"""The image modality: LoRA adaptation of text-to-image diffusion pipelines (Stable Diffusion 1.x/2.x, SDXL)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from polyadapt.modality import DatasetSplits, EvalResult, Modality, ModalitySettings, ModelBundle, PreparedSplit

if TYPE_CHECKING:
    import click
    import torch

    from polyadapt.config import AdaptConfig
    from polyadapt.modality import RunContext

VALIDATION_DIR = "validation"


class ImageSettings(ModalitySettings):
    """The ``image:`` section of a config."""

    resolution: int = Field(512, ge=8, description="Training and generation size in pixels (square; multiple of 8).")
    center_crop: bool = Field(True, description="Crop the centre after resizing the shorter side (else a random crop).")
    random_flip: bool = Field(False, description="Flip training images horizontally at random.")
    trigger: str | None = Field(None, description="Phrase added to every caption (see trigger_position).")
    trigger_position: Literal["prefix", "suffix"] = Field(
        "suffix", description="'<caption>, <trigger>' (suffix) or '<trigger>, <caption>' (prefix); never added twice."
    )
    caption_column: str = Field("text", description="metadata.jsonl key holding the caption.")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Images with more pixels are bad samples (decompression-bomb guard)."
    )
    cache_latents: bool = Field(True, description="Encode every image with the VAE once, before training.")
    cache_text_embeddings: bool | None = Field(
        None, description="Encode every caption once before training; default: on unless train_text_encoder."
    )
    sample_latents: bool = Field(
        True, description="Train on samples of the VAE posterior (diffusers' default); false: on its mean."
    )
    train_text_encoder: bool = Field(False, description="Also put LoRA on the text encoder(s) attention projections.")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="Training target; auto = the pipeline scheduler's prediction_type."
    )
    snr_gamma: float | None = Field(
        None, gt=0, description="Min-SNR-gamma loss weighting (5.0 is the paper's choice); null = plain MSE."
    )
    noise_offset: float = Field(0.0, ge=0, description="Scale of per-channel offset noise (0.05-0.1 helps dark/light).")
    validation_prompts: list[str] = Field(
        default_factory=list, description="Prompts for validation images; default: the first held-out captions."
    )
    num_validation_prompts: int = Field(4, ge=1, description="How many held-out captions when validation_prompts is empty.")
    validation_seeds: list[int] = Field(default_factory=lambda: [0, 1], description="Seeds; one image per prompt and seed.")
    num_inference_steps: int = Field(25, ge=1, description="Sampler steps for validation and inference images.")
    guidance_scale: float = Field(5.0, ge=0, description="Classifier-free guidance scale (<= 1 disables it).")
    palette_size: int = Field(8, ge=1, le=64, description="Colours per palette in the brand-style distance.")
    clip_model: Path | None = Field(None, description="Local CLIP model directory for the CLIP score (none: skipped).")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} is not a multiple of 8")
        return value

    @field_validator("clip_model")
    @classmethod
    def _clip_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"{str(value)!r} is not a directory holding a CLIP model")
        return value

    @model_validator(mode="after")
    def _text_cache(self) -> ImageSettings:
        if self.train_text_encoder and self.cache_text_embeddings:
            raise ValueError("cache_text_embeddings cannot be true with train_text_encoder (the embeddings change)")
        return self

    @property
    def caches_text(self) -> bool:
        return not self.train_text_encoder if self.cache_text_embeddings is None else self.cache_text_embeddings


def item_seed(key: str) -> int:
    """A stable per-sample seed (the same on every machine and Python run)."""
    return zlib.crc32(key.encode("utf-8"))


def validation_pairs(settings: ImageSettings, samples: Sequence[Any]) -> tuple[list[str], list[int]]:
    """The (prompt, seed) pairs of validation images, prompt-major: ``validation_prompts`` (trigger rule applied)
    or the first held-out captions, each with every ``validation_seeds`` seed."""
    from .data import apply_trigger

    prompts = [apply_trigger(p, settings.trigger, settings.trigger_position) for p in settings.validation_prompts]
    if not prompts:
        prompts = [s.caption for s in list(samples)[: settings.num_validation_prompts]]
    pairs = [(p, s) for p in prompts for s in settings.validation_seeds]
    return [p for p, _ in pairs], [s for _, s in pairs]


class ImageModality(Modality):
    """LoRA on the denoiser of a diffusers text-to-image pipeline, evaluated by held-out denoising loss and a
    brand-style palette distance of images generated from fixed prompts and seeds."""

    name = "image"
    description = "text-to-image diffusion LoRA (Stable Diffusion 1.x/2.x, SDXL) for brand-style adaptation"
    settings_model = ImageSettings
    primary_metric = "eval_loss"
    metric_directions = {
        "eval_loss": False,
        "brand_style_distance": False,
        "brand_style_distance_vae": False,
        "clip_score": True,
    }

    # -- model -------------------------------------------------------------------------------------------------------
    def load_base(self, ctx: RunContext) -> ModelBundle:
        from .model import load_base

        return load_base(ctx)

    def default_target_modules(self, bundle: ModelBundle, ctx: RunContext) -> list[str]:
        from .model import default_targets, unet_of

        return default_targets(unet_of(bundle))

    def add_adapter(self, bundle: ModelBundle, ctx: RunContext) -> None:
        from .model import attach_lora

        settings: ImageSettings = ctx.settings
        attach_lora(bundle, ctx.config.peft, self.resolve_target_modules(bundle, ctx), settings.train_text_encoder)
        if settings.train_text_encoder:
            from .model import DenoiserWithTextEncoders

            bundle.model = DenoiserWithTextEncoders(bundle.model, bundle.components["text_encoders"])

    def save_adapter(self, bundle: ModelBundle, directory: Path) -> None:
        from .model import save_lora

        save_lora(bundle, Path(directory))

    def load_adapter(self, bundle: ModelBundle, directory: Path, ctx: RunContext) -> None:
        from .model import load_lora

        load_lora(bundle, Path(directory))

    # -- data --------------------------------------------------------------------------------------------------------
    def load_data(self, config: AdaptConfig, path: Path) -> DatasetSplits:
        from .data import load_dataset

        return load_dataset(config, path)

    def prepare(self, bundle: ModelBundle, samples: Sequence[Any], ctx: RunContext, training: bool) -> PreparedSplit:
        from .training import prepare_items

        if not training:  # the held-out captions also give the progress grids their prompts
            bundle.components["validation_samples"] = list(samples)
        return prepare_items(bundle, samples, ctx.settings, training, ctx.config.train.seed)

    def collate(self, bundle: ModelBundle, items: Sequence[Any], training: bool) -> dict[str, Any]:
        from .training import collate

        return collate(bundle, items, training)

    def compute_loss(self, bundle: ModelBundle, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        from .training import compute_loss

        return compute_loss(bundle, model, batch)

    # -- evaluation and serving --------------------------------------------------------------------------------------
    def evaluate(
        self, bundle: ModelBundle, samples: Sequence[Any], ctx: RunContext, eval_loss: float | None
    ) -> EvalResult:
        from .data import load_image
        from .metrics import brand_style_distance, clip_score, image_grid
        from .model import generate, has_adapter, vae_roundtrip

        settings: ImageSettings = ctx.settings
        prompts, seeds = validation_pairs(settings, samples)
        if not prompts:
            return EvalResult(metrics={})
        images = generate(
            bundle, prompts, seeds, settings.resolution, settings.num_inference_steps, settings.guidance_scale
        )
        pairs = list(zip(prompts, seeds, strict=True))
        seeds = list(settings.validation_seeds)
        metrics: dict[str, float] = {}
        if samples:
            reference = [load_image(s.path, settings.resolution, center_crop=True) for s in samples]
            metrics["brand_style_distance"] = brand_style_distance(images, reference, settings.palette_size)
            # the same distance to the references as the base VAE redraws them: what adaptation can reach at best
            # with this VAE, so the figure moves with the adapter and not with the VAE's fixed colour error
            redrawn = vae_roundtrip(bundle, reference)
            metrics["brand_style_distance_vae"] = brand_style_distance(images, redrawn, settings.palette_size)
        if settings.clip_model is not None:
            metrics["clip_score"] = clip_score(images, [p for p, _ in pairs], settings.clip_model)
        tag = "adapted" if has_adapter(bundle) else "base"
        artifacts: dict[str, Path] = {}
        examples = [{"prompt": p, "seed": s, "grid_index": i} for i, (p, s) in enumerate(pairs)]
        if ctx.run_dir is not None and ctx.is_main_process:
            directory = Path(ctx.run_dir) / VALIDATION_DIR
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"{tag}.png"
            upscale = max(1, 128 // settings.resolution)
            image_grid(images, columns=len(seeds), upscale=upscale).save(path)
            artifacts[f"{tag}_grid"] = path
        return EvalResult(metrics=metrics, examples=examples, artifacts=artifacts)

    def on_evaluate(self, bundle: ModelBundle, ctx: RunContext, step: int, metrics: dict[str, float]) -> None:
        """Validation images of the bundle being trained, saved as ``validation/step-NNNNNN.png``."""
        if ctx.run_dir is None:
            return
        from .metrics import image_grid
        from .model import generate

        settings: ImageSettings = ctx.settings
        prompts, seeds = validation_pairs(settings, bundle.components.get("validation_samples", []))
        if not prompts:
            return
        images = generate(bundle, prompts, seeds, settings.resolution, settings.num_inference_steps, settings.guidance_scale)
        path = Path(ctx.run_dir) / VALIDATION_DIR / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, columns=len(settings.validation_seeds), upscale=max(1, 128 // settings.resolution)).save(path)

    def report_sections(self, before: EvalResult | None, after: EvalResult, run_dir: Path) -> list[tuple[str, str]]:
        from .report import grid_section

        section = grid_section(before, after)
        return [section] if section else []

    def infer_params(self) -> list[click.Parameter]:
        from .inference import infer_params

        return infer_params()

    def infer(self, bundle: ModelBundle, ctx: RunContext, options: dict[str, Any]) -> list[str]:
        from .inference import infer

        return infer(bundle, ctx, options)
