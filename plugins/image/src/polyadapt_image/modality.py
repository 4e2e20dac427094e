"""The image modality: LoRA adaptation of text-to-image diffusion pipelines (Stable Diffusion 1.x/2.x, SDXL).

:class:`ImageModality` is the stateless factory (what the modality supports, reading data); :class:`ImageRun` is one
run: the diffusers pipeline and its parts (denoiser, VAE, text encoders, training noise scheduler, the family
strategy, the held-out samples the validation grids draw their prompts from, the base's own images of the general
prompts) are its attributes.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from polyadapt.defaults import TrainingRule
from polyadapt.errors import ConfigError
from polyadapt.modality import DataFound, EvalResult, Modality, ModalityRun, ModalitySettings, PreparedSplit
from polyadapt.peft_run import DEFAULT_ADAPTER

from .data import LAYOUT

if TYPE_CHECKING:
    import click
    import torch
    from PIL import Image

    from polyadapt.config import AdaptConfig
    from polyadapt.modality import DataContext, RunContext

    from .data import ImageSample
    from .denoisers import Denoiser

VALIDATION_DIR = "validation"


class ImageSettings(ModalitySettings):
    """The ``image:`` section of a config."""

    resolution: int | None = Field(
        None,
        ge=8,
        description="Training and generation size in pixels (square; multiple of 8); default: the base's native size "
        "(the denoiser's sample size times the VAE's scale factor, as diffusers pipelines do).",
    )
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
    num_validation_prompts: int = Field(
        4, ge=1, description="How many held-out captions when validation_prompts is empty."
    )
    validation_seeds: list[int] = Field(
        default_factory=lambda: [0, 1], description="Seeds; one image per prompt and seed."
    )
    num_inference_steps: int = Field(25, ge=1, description="Sampler steps for validation and inference images.")
    guidance_scale: float = Field(5.0, ge=0, description="Classifier-free guidance scale (<= 1 disables it).")
    palette_size: int = Field(8, ge=1, le=64, description="Colours per palette in the brand-style distance.")
    clip_model: Path | None = Field(None, description="Local CLIP model directory for the CLIP score (none: skipped).")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
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
    brand-style palette distance of images generated from fixed prompts and seeds; on general data
    (``eval.general_data``), by the distance of its images from the base's own (``base_output_distance``)."""

    name = "image"
    description = "text-to-image diffusion LoRA (Stable Diffusion 1.x/2.x, SDXL) for brand-style adaptation"
    settings_model = ImageSettings
    primary_metric = "eval_loss"
    headline_metrics = ("brand_style_distance", "eval_loss")
    metrics = {
        "brand_style_distance": False,
        "brand_style_distance_vae": False,
        "clip_score": True,
        # general data only (evaluate_general): not a held-out metric, so never an early-stopping one
        "base_output_distance": False,
    }
    # what diffusers' LoRA loaders read back
    peft_methods = ("lora", "dora")
    capabilities = frozenset({"inference", "report", "multi_adapter"})
    #: LoRA at 1e-4 for Stable Diffusion's 860M-parameter UNet (diffusers' LoRA recipe); style LoRAs take a few
    #: hundred steps whatever the set's size, so small sets get many passes; loss-driven (images cost more)
    training_rule = TrainingRule(reference_lr=1e-4, reference_params=860e6, min_steps=400, max_epochs=200)
    data_layout = LAYOUT

    def read_data(self, ctx: DataContext) -> DataFound:
        from .data import read_dataset

        return read_dataset(ctx)

    def reported_metrics(self, config: AdaptConfig) -> set[str]:
        reported = {"eval_loss", "brand_style_distance", "brand_style_distance_vae"}
        return reported | {"clip_score"} if config.settings.clip_model is not None else reported

    def infer_params(self) -> list[click.Parameter]:
        from .inference import infer_params

        return infer_params()

    def usage(self, run_dir: Path, base: str) -> str:
        return (
            "```python\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained({base!r})\n"
            f"pipe.load_lora_weights({str(run_dir)!r})\n"
            'image = pipe("a prompt with the trigger phrase").images[0]\n```\n\n'
            "The LoRA is one `pytorch_lora_weights.safetensors` in the pipeline's own diffusers layout; "
            "`polyadapt export RUN --format kohya` writes the A1111/ComfyUI layout."
        )


class ImageRun(ModalityRun):
    """One image run. ``model`` is the module trained: the denoiser, or the denoiser and the text encoders together
    (:class:`polyadapt_image.model.DenoiserWithTextEncoders`) when ``image.train_text_encoder`` is on.

    LoRAs are diffusers adapters of the one pipeline, by name: the trained one (or a run's, loaded) is ``default``;
    ``load_adapter`` attaches more, ``set_adapter`` / :meth:`combine_adapters` switch between them without reloading.
    """

    settings: ImageSettings

    def __init__(self, modality: Modality, ctx: RunContext) -> None:
        super().__init__(modality, ctx)
        #: the whole diffusers pipeline; generation goes through it, and its denoiser is :attr:`denoiser`
        self.pipeline: Any = None
        #: the family strategy: prompt encoding, the denoiser call, noise and target, LoRA file layout
        self.strategy: Denoiser | None = None
        self.vae: Any = None
        self.text_encoders: list[torch.nn.Module] = []
        #: the first tokenizer: its window is the prompt length that counts
        self.tokenizer: Any = None
        #: DDPM with the pipeline's schedule: the training objective, whatever sampler the pipeline generates with
        self.noise_scheduler: Any = None
        #: the held-out samples whose captions give the validation grids their prompts
        self.validation_samples: list[ImageSample] = []
        #: the base pipeline's image of each general (prompt, seed) pair: the base is frozen and generation seeded,
        #: so the "before" images serve the "after" comparison too
        self.base_images: dict[tuple[str, int], Image.Image] = {}

    @property
    def denoiser(self) -> Any:
        """The pipeline's denoiser network (its UNet), with any LoRA attached to it."""
        return getattr(self.pipeline, self.strategy.component)

    # -- model -------------------------------------------------------------------------------------------------------
    def load_base(self) -> None:
        """The pipeline, split into the trained denoiser and frozen parts; the VAE stays in fp32 (SD-family VAEs
        overflow in fp16, and it runs once per image when latents are cached)."""
        import torch
        from diffusers import DDPMScheduler

        from .denoisers import denoiser_for, supported_pipelines
        from .model import load_pipeline

        ctx, settings = self.ctx, self.settings
        pipe = load_pipeline(ctx)
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        if settings.prediction_type != "auto":
            prediction = settings.prediction_type
        strategy = denoiser_for(pipe, prediction)
        if strategy is None:
            raise ConfigError(
                f"base: {ctx.base.location} is a {type(pipe).__name__}; the image modality supports "
                f"{', '.join(supported_pipelines())}"
            )
        self.pipeline, self.strategy = pipe, strategy
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction)
        if prediction != pipe.scheduler.config.get("prediction_type"):
            pipe.scheduler.register_to_config(prediction_type=prediction)
        self.text_encoders = [getattr(pipe, name) for name in strategy.text_encoders]
        self.tokenizer = getattr(pipe, strategy.tokenizers[0])
        frozen_dtype = ctx.dtype if ctx.device.type == "cuda" else torch.float32
        for encoder in self.text_encoders:
            encoder.requires_grad_(False).eval().to(ctx.device)
            if frozen_dtype != torch.float32:
                encoder.to(frozen_dtype)
        self.vae = pipe.vae.requires_grad_(False).eval().to(ctx.device)
        self.model = self.denoiser.requires_grad_(False)
        sample_size = self.denoiser.config.sample_size
        self.info = {
            "pipeline": type(pipe).__name__,
            "denoiser": type(self.denoiser).__name__,
            "prediction_type": prediction,
            "vae_scale_factor": int(2 ** (len(self.vae.config.block_out_channels) - 1)),
            "sample_size": int(sample_size) if isinstance(sample_size, int) else None,
        }
        if settings.resolution is None:
            self.settings = settings.model_copy(update={"resolution": self.native_resolution()})

    def native_resolution(self) -> int:
        """The base's own image size: the denoiser's sample size times the VAE's scale factor (diffusers' default
        height and width); 512 when the denoiser does not say. Recorded in ``auto``."""
        size, factor = self.info["sample_size"], self.info["vae_scale_factor"]
        if isinstance(size, int):
            value, why = size * factor, f"the denoiser's sample size {size} x the VAE's scale factor {factor}"
        else:
            value, why = 512, "the denoiser gives no square sample size; 512"
        self.auto["image.resolution"] = {"value": value, "rule": why}
        return value

    def add_adapter(self) -> None:
        """LoRA on the denoiser's attention projections (``peft.target_modules`` overrides them), and on the text
        encoders' with ``image.train_text_encoder``; ``train.grad_checkpointing`` recomputes their activations."""
        from polyadapt.peft_run import enable_gradient_checkpointing

        from .model import DenoiserWithTextEncoders, attach_lora, default_targets

        chosen = self.ctx.config.peft.target_modules
        targets = default_targets(self.denoiser) if chosen == "auto" else list(chosen)
        if self.ctx.config.train.grad_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            if self.settings.train_text_encoder:
                for encoder in self.text_encoders:
                    enable_gradient_checkpointing(encoder)
        attach_lora(self, targets)
        if self.settings.train_text_encoder:
            self.model = DenoiserWithTextEncoders(self.denoiser, self.text_encoders)

    def trainable_modules(self) -> list[torch.nn.Module]:
        """The denoiser, and the text encoders when they train too."""
        return [self.denoiser, *(self.text_encoders if self.settings.train_text_encoder else [])]

    def save_adapter(self, directory: Path) -> None:
        """The active LoRA as ``pytorch_lora_weights.safetensors``, in the pipeline class's diffusers layout."""
        from .model import save_lora

        active = self.active_adapters()
        if len(active) != 1:
            raise ConfigError(f"save_adapter needs exactly one active adapter, not {active or 'none'}")
        save_lora(self, Path(directory), active[0])

    def load_adapter(self, directory: Path, name: str = DEFAULT_ADAPTER) -> None:
        """Load a run's LoRA (or any diffusers LoRA file in ``directory``) under ``name``, frozen, and make it active."""
        from .model import load_lora, lora_parts

        if name in self.adapter_names():
            raise ConfigError(f"an adapter named {name!r} is already attached; delete it first")
        with self._grad_flags_kept():
            load_lora(self, Path(directory), name)
        for _, module in lora_parts(self):
            module.train(module.training)  # the new LoRA layers take their model's mode
            for parameter_name, parameter in module.named_parameters():
                if f".{name}." in parameter_name:
                    parameter.requires_grad_(False)
        self.set_adapter(name)

    # -- several adapters --------------------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        from .model import lora_parts

        if self.pipeline is None:
            return []
        names: list[str] = []
        for _, module in lora_parts(self):
            names += [n for n in getattr(module, "peft_config", {}) if n not in names]
        return names

    def active_adapters(self) -> list[str]:
        """The adapters the pipeline runs with now (none when LoRA is off or none is attached)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        from .model import lora_parts

        for _, module in lora_parts(self):
            for layer in module.modules():
                if isinstance(layer, BaseTunerLayer):
                    return [] if layer.disable_adapters else list(layer.active_adapters)
        return []

    def set_adapter(self, name: str | None) -> None:
        if name is None:
            with self._grad_flags_kept():
                self.pipeline.disable_lora()
            return
        self.combine_adapters({name: 1.0})

    def combine_adapters(self, weights: dict[str, float]) -> None:
        """Run with every adapter of ``weights`` at once, each at its weight (diffusers' ``set_adapters``: their LoRA
        deltas add up, a weight of 1.0 being the adapter's trained strength)."""
        attached = self.adapter_names()
        unknown = [n for n in weights if n not in attached]
        if unknown:
            raise ConfigError(f"no adapter named {', '.join(unknown)} (attached: {', '.join(attached) or 'none'})")
        with self._grad_flags_kept():
            self.pipeline.enable_lora()
            self.pipeline.set_adapters(list(weights), adapter_weights=list(weights.values()))

    def delete_adapter(self, name: str) -> None:
        from .model import lora_parts, quiet_adapter_warnings

        attached = self.adapter_names()
        if name not in attached:
            raise ConfigError(f"no adapter named {name!r} (attached: {', '.join(attached) or 'none'})")
        remaining = [n for n in attached if n != name]
        if not remaining:
            self.pipeline.unload_lora_weights()  # no LoRA layers left at all
            return
        was_active = name in self.active_adapters()
        with self._grad_flags_kept(), quiet_adapter_warnings():
            self.pipeline.delete_adapters([name])
        for _, module in lora_parts(self):
            # diffusers forgets the config of the adapters it injected itself; peft-injected text-encoder ones too
            getattr(module, "peft_config", {}).pop(name, None)
        if was_active:
            self.set_adapter(remaining[0])

    @contextmanager
    def _lora_off(self) -> Iterator[None]:
        """The base pipeline for the block; the adapters that were active (at their weights) are active again after."""
        if not self.active_adapters():
            yield
            return
        with self._grad_flags_kept():
            self.pipeline.disable_lora()
        try:
            yield
        finally:
            with self._grad_flags_kept():
                self.pipeline.enable_lora()

    @contextmanager
    def _grad_flags_kept(self) -> Iterator[None]:
        """peft makes every adapter it activates trainable; switching adapters must not change what trains."""
        from .model import lora_parts

        flags = [(p, p.requires_grad) for _, module in lora_parts(self) for p in module.parameters()]
        try:
            yield
        finally:
            for parameter, flag in flags:
                parameter.requires_grad_(flag)

    # -- data --------------------------------------------------------------------------------------------------------
    def prepare(self, samples: Sequence[Any], training: bool) -> PreparedSplit:
        from .batching import prepare_items

        if not training and not self.validation_samples:
            # the first held-out split prepared is the run's own (a general-data split comes after it)
            self.validation_samples = list(samples)
        return prepare_items(self, samples, training)

    def collate(self, items: Sequence[Any], training: bool) -> dict[str, Any]:
        from .batching import collate

        return collate(self, items, training)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        from .batching import diffusion_loss

        return diffusion_loss(self, model, batch)

    # -- evaluation and serving --------------------------------------------------------------------------------------
    def evaluate(self, samples: Sequence[Any], eval_loss: float | None) -> EvalResult:
        from .data import load_image
        from .metrics import brand_style_distance, clip_score

        settings = self.settings
        prompts, seeds = validation_pairs(settings, samples)
        if not prompts:
            return EvalResult(metrics={})
        images = self.generate(prompts, seeds)
        metrics: dict[str, float] = {}
        if samples:
            from .model import vae_roundtrip

            reference = [load_image(s.path, settings.resolution, center_crop=True) for s in samples]
            metrics["brand_style_distance"] = brand_style_distance(images, reference, settings.palette_size)
            # the same distance to the references as the base VAE redraws them: what adaptation can reach at best
            # with this VAE, so the figure moves with the adapter and not with the VAE's fixed colour error
            redrawn = vae_roundtrip(self.vae, reference)
            metrics["brand_style_distance_vae"] = brand_style_distance(images, redrawn, settings.palette_size)
        if settings.clip_model is not None:
            metrics["clip_score"] = clip_score(images, prompts, settings.clip_model)
        examples = [
            {"prompt": p, "seed": s, "grid_index": i} for i, (p, s) in enumerate(zip(prompts, seeds, strict=True))
        ]
        artifacts: dict[str, Path] = {}
        if self.ctx.run_dir is not None and self.ctx.is_main_process:
            tag = "adapted" if self.active_adapters() else "base"
            artifacts[f"{tag}_grid"] = self.save_grid(images, f"{tag}.png")
        return EvalResult(metrics=metrics, examples=examples, artifacts=artifacts)

    def evaluate_general(self, samples: Sequence[Any], eval_loss: float | None) -> EvalResult:
        """The general prompts (the general set's captions, no trigger), each with every validation seed, scored
        against the base pipeline's own images of the same prompt and seed: ``base_output_distance`` (0 for the base
        itself; lower is less forgetting), and the CLIP score when ``image.clip_model`` is set."""
        from .metrics import base_output_distance, clip_score

        settings = self.settings
        pairs = [(s.caption, seed) for s in samples for seed in settings.validation_seeds]
        if not pairs:
            return EvalResult(metrics={})
        prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
        adapted = bool(self.active_adapters())
        images = self.generate(prompts, seeds)
        if not adapted:
            self.base_images.update(zip(pairs, images, strict=True))
        metrics = {"base_output_distance": base_output_distance(images, self.base_outputs(pairs))}
        if settings.clip_model is not None:
            metrics["clip_score"] = clip_score(images, prompts, settings.clip_model)
        examples = [{"prompt": p, "seed": s, "grid_index": i} for i, (p, s) in enumerate(pairs)]
        artifacts: dict[str, Path] = {}
        if self.ctx.run_dir is not None and self.ctx.is_main_process:
            tag = "adapted" if adapted else "base"
            artifacts[f"general_{tag}_grid"] = self.save_grid(images, f"general-{tag}.png")
        return EvalResult(metrics=metrics, examples=examples, artifacts=artifacts)

    def base_outputs(self, pairs: list[tuple[str, int]]) -> list[Image.Image]:
        """The base pipeline's image of each (prompt, seed) pair: from :attr:`base_images`, the missing ones
        generated with every LoRA off (a resumed run, or ``eval.before: false``)."""
        missing = [pair for pair in dict.fromkeys(pairs) if pair not in self.base_images]
        if missing:
            with self._lora_off():
                images = self.generate([p for p, _ in missing], [s for _, s in missing])
            self.base_images.update(zip(missing, images, strict=True))
        return [self.base_images[pair] for pair in pairs]

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """Validation images of the adapter being trained, saved as ``validation/step-NNNNNN.png``."""
        if self.ctx.run_dir is None:
            return
        prompts, seeds = validation_pairs(self.settings, self.validation_samples)
        if prompts:
            self.save_grid(self.generate(prompts, seeds), f"step-{step:06d}.png")

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Any]:
        """One image per (prompt, seed) pair with the run's sampler settings and active LoRA(s)."""
        from .model import generate

        settings = self.settings
        return generate(
            self, prompts, seeds, settings.resolution, settings.num_inference_steps, settings.guidance_scale
        )

    def save_grid(self, images: list[Any], name: str) -> Path:
        """``images`` (prompt-major) as a grid under ``validation/``, one column per seed, enlarged to be seen."""
        from .metrics import image_grid

        settings = self.settings
        path = Path(self.ctx.run_dir) / VALIDATION_DIR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        upscale = max(1, 128 // settings.resolution)
        image_grid(images, columns=len(settings.validation_seeds), upscale=upscale).save(path)
        return path

    def report_sections(self, before: EvalResult | None, after: EvalResult, run_dir: Path) -> list[tuple[str, str]]:
        from .report import grid_section

        section = grid_section(before, after)
        return [section] if section else []

    def infer(self, options: dict[str, Any]) -> list[str]:
        from .inference import infer

        return infer(self, options)


ImageModality.run_class = ImageRun
