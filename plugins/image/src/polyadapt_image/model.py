"""Loading diffusers pipelines, attaching LoRA to the denoiser, saving and loading LoRA files, generating images.

``bundle.model`` is the denoiser (the UNet). ``bundle.components`` holds the whole ``pipeline`` (whose ``unet`` is
that same module), the frozen ``vae`` and ``text_encoders``, the training ``noise_scheduler`` and the ``denoiser``
strategy (:mod:`polyadapt_image.denoisers`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from polyadapt.errors import ConfigError
from polyadapt.modality import ModelBundle

if TYPE_CHECKING:
    from PIL import Image

    from polyadapt.config import PeftSection
    from polyadapt.modality import RunContext

#: the attention projections of diffusers' ``Attention`` blocks, the usual LoRA targets for style
DEFAULT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: the CLIP text encoder's attention projections, for the optional text-encoder LoRA
DEFAULT_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
#: the adapter name polyadapt trains under (and loads a run's LoRA under)
ADAPTER_NAME = "default"


def load_pipeline(ctx: RunContext) -> Any:
    """The diffusers pipeline at ``ctx.base`` (local directory or hub id), safetensors weights only."""
    import torch
    from diffusers import DiffusionPipeline

    location = str(ctx.base.path) if ctx.base.path is not None else ctx.base.hub_id
    if ctx.base.path is not None and not (ctx.base.path / "model_index.json").is_file():
        raise ConfigError(f"base: {location} is not a diffusers pipeline directory (no model_index.json)")
    try:
        pipe = DiffusionPipeline.from_pretrained(
            location,
            revision=ctx.config.base_revision,
            trust_remote_code=ctx.config.trust_remote_code,
            use_safetensors=True,
            dtype=torch.float32,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base: cannot load a diffusers pipeline from {location!r}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_base(ctx: RunContext) -> ModelBundle:
    """Load the pipeline and split it into the trained denoiser and frozen components (see the module docstring)."""
    import torch
    from diffusers import DDPMScheduler

    from .denoisers import denoiser_for, supported_pipelines

    settings = ctx.settings
    pipe = load_pipeline(ctx)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if settings is not None and settings.prediction_type != "auto":
        prediction = settings.prediction_type
    strategy = denoiser_for(pipe, prediction)
    if strategy is None:
        raise ConfigError(
            f"base: {ctx.base.location} is a {type(pipe).__name__}; the image modality supports "
            f"{', '.join(supported_pipelines())}"
        )
    # the training objective is DDPM's whatever sampler the pipeline ships with; the sampler stays for generation
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction)
    if prediction != pipe.scheduler.config.get("prediction_type"):
        pipe.scheduler.register_to_config(prediction_type=prediction)
    encoders = [getattr(pipe, name) for name in strategy.text_encoders]
    frozen_dtype = ctx.dtype if ctx.device.type == "cuda" else torch.float32
    for encoder in encoders:
        encoder.requires_grad_(False).eval().to(ctx.device)
        if frozen_dtype != torch.float32:
            encoder.to(frozen_dtype)
    # the VAE stays in fp32 (loaded so): SD-family VAEs overflow in fp16, and it runs once per image when cached
    pipe.vae.requires_grad_(False).eval().to(ctx.device)
    pipe.unet.requires_grad_(False)
    info = {
        "pipeline": type(pipe).__name__,
        "denoiser": type(pipe.unet).__name__,
        "prediction_type": prediction,
        "vae_scale_factor": int(2 ** (len(pipe.vae.config.block_out_channels) - 1)),
        "sample_size": int(pipe.unet.config.sample_size) if isinstance(pipe.unet.config.sample_size, int) else None,
    }
    tokenizers = [getattr(pipe, name) for name in strategy.tokenizers]
    return ModelBundle(
        model=pipe.unet,
        processor=tokenizers[0],
        components={
            "pipeline": pipe,
            "vae": pipe.vae,
            "text_encoders": encoders,
            "noise_scheduler": noise_scheduler,
            "denoiser": strategy,
            "settings": settings,
        },
        info=info,
    )


def default_targets(unet: torch.nn.Module) -> list[str]:
    """The attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) that exist in ``unet``."""
    names = {name for name, _ in unet.named_modules()}
    found = [t for t in DEFAULT_UNET_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
    if not found:
        raise ConfigError("peft.target_modules: the denoiser has no attention projections (to_q/to_k/to_v/to_out.0)")
    return found


def lora_config(section: PeftSection, targets: list[str]) -> Any:
    """peft ``LoraConfig`` for the denoiser or a text encoder (LoRA and DoRA are what diffusers can load back)."""
    from peft import LoraConfig

    if section.method not in ("lora", "dora"):
        raise ConfigError(f"peft.method: {section.method!r} is not supported by the image modality (use lora or dora)")
    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
        init_lora_weights=section.init_weights,
        use_dora=section.method == "dora",
    )


def attach_lora(bundle: ModelBundle, section: PeftSection, targets: list[str], train_text_encoder: bool) -> None:
    """Inject LoRA layers in place (diffusers' ``add_adapter``); only LoRA parameters stay trainable."""
    unet_of(bundle).add_adapter(lora_config(section, targets), adapter_name=ADAPTER_NAME)
    if train_text_encoder:
        from peft import inject_adapter_in_model

        for encoder in bundle.components["text_encoders"]:
            inject_adapter_in_model(lora_config(section, DEFAULT_TEXT_TARGETS), encoder, adapter_name=ADAPTER_NAME)
            for name, param in encoder.named_parameters():
                param.requires_grad_("lora_" in name)


class DenoiserWithTextEncoders(torch.nn.Module):
    """The denoiser and the text encoders as one trainable module (text-encoder LoRA), called like the denoiser."""

    def __init__(self, denoiser: Any, text_encoders: list[Any]):
        super().__init__()
        self.denoiser = denoiser
        self.text_encoders = torch.nn.ModuleList(text_encoders)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.denoiser(*args, **kwargs)


def has_adapter(bundle: ModelBundle) -> bool:
    """Whether the bundle's denoiser carries a LoRA adapter (trained or loaded)."""
    return bool(getattr(unet_of(bundle), "peft_config", None))


def unet_of(bundle: ModelBundle) -> Any:
    """The denoiser module, also when text-encoder LoRA wraps it together with the text encoders."""
    return getattr(bundle.model, "denoiser", bundle.model)


def _adapter_state(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    config = getattr(module, "peft_config", {}).get(ADAPTER_NAME)
    if config is None:
        return None
    state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
    state = {k: v.detach().to("cpu").float().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}
    metadata = json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    return state, metadata


def save_lora(bundle: ModelBundle, directory: Path) -> list[Path]:
    """Write the trained LoRA in the pipeline class's diffusers layout, loadable by ``pipe.load_lora_weights(dir)``."""
    strategy = bundle.components["denoiser"]
    layers, metadata = {}, {}
    parts = [("unet", unet_of(bundle))] + [
        (name, encoder) for name, encoder in zip(strategy.text_encoders, bundle.components["text_encoders"], strict=True)
    ]
    for component, module in parts:
        found = _adapter_state(module)
        if found is not None:
            layers[component], metadata[component] = found
    directory.mkdir(parents=True, exist_ok=True)
    strategy.save_lora(str(directory), layers, metadata)
    return sorted(directory.glob("pytorch_lora_weights*.safetensors"))


def load_lora(bundle: ModelBundle, directory: Path, adapter_name: str = ADAPTER_NAME) -> None:
    """Load a LoRA saved by :func:`save_lora` (or any diffusers/kohya LoRA file) into the bundle's pipeline.

    Diffusers loads text-encoder LoRA through transformers' PEFT integration, which has a minimum peft version; where
    the installed peft is older, the text-encoder part is injected with peft directly (the same layers and weights).
    """
    directory = Path(directory)
    weights = directory / "pytorch_lora_weights.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{directory} holds no pytorch_lora_weights.safetensors")
    pipe = bundle.components["pipeline"]
    if transformers_peft_usable():
        pipe.load_lora_weights(str(directory), weight_name=weights.name, adapter_name=adapter_name)
    else:
        tensors, metadata = read_lora_file(weights)
        type(pipe).load_lora_into_unet(
            tensors, network_alphas=None, unet=pipe.unet, adapter_name=adapter_name, metadata=metadata or None,
            _pipeline=pipe,
        )  # fmt: skip
        encoders = bundle.components["denoiser"].text_encoders
        for name, encoder in zip(encoders, bundle.components["text_encoders"], strict=True):
            _load_text_encoder_lora(encoder, tensors, metadata, name, adapter_name)
    # the pipeline owns the module bundle.model points at, so the adapter is already attached to bundle.model
    bundle.model = pipe.unet


@lru_cache(maxsize=1)
def transformers_peft_usable() -> bool:
    """Whether transformers' PEFT integration accepts the installed peft (diffusers needs it for text encoders)."""
    from transformers.utils.peft_utils import check_peft_version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:
        return True
    try:
        check_peft_version(min_version=MIN_PEFT_VERSION)
    except ValueError:
        return False
    return True


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a diffusers LoRA file and its flat LoRA metadata (``"unet.r"``, ``"text_encoder.lora_alpha"``...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
        raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    return tensors, json.loads(raw) if raw else {}


def _load_text_encoder_lora(
    encoder: torch.nn.Module, state: dict[str, torch.Tensor], metadata: dict[str, Any], name: str, adapter_name: str
) -> None:
    """Inject the ``name.``-prefixed LoRA of ``state`` into ``encoder`` with peft (what diffusers does through
    transformers), with the LoRA config saved in the file's metadata."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    prefix = f"{name}."
    own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        return
    own = convert_state_dict_to_peft(convert_state_dict_to_diffusers(own))
    if not hasattr(encoder, "text_model"):
        own = {k.removeprefix("text_model."): v for k, v in own.items()}
    saved = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    if not saved:
        raise ConfigError(f"the LoRA file has {name} weights but no LoRA config for them in its metadata")
    fields = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in saved.items() if k in fields})
    was_training = encoder.training
    inject_adapter_in_model(config, encoder, adapter_name=adapter_name)
    encoder.train(was_training)  # new LoRA layers (their dropout) start in training mode
    result = set_peft_model_state_dict(encoder, own, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ConfigError(f"the LoRA file's {name} weights do not fit the text encoder: {unexpected[:3]}")


def generate(
    bundle: ModelBundle,
    prompts: list[str],
    seeds: list[int],
    resolution: int,
    steps: int,
    guidance: float,
    lora_scale: float | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, in that order, with the bundle's current denoiser (LoRA included)."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    pipe = bundle.components["pipeline"]
    unet = unet_of(bundle)
    pipe.unet = unet
    was_training = bundle.model.training
    bundle.model.eval()
    images = []
    extra = {"cross_attention_kwargs": {"scale": lora_scale}} if lora_scale is not None else {}
    # diffusers warns at every call about a prompt longer than the text encoder's window; polyadapt counts such
    # captions once (prepared stats ``captions_truncated``) and says so in ``infer``
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with torch.no_grad():
            for prompt, seed in zip(prompts, seeds, strict=True):
                generator = torch.Generator(device="cpu").manual_seed(seed)
                out = pipe(
                    prompt,
                    height=resolution,
                    width=resolution,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=generator,
                    **extra,
                )
                images.append(out.images[0])
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if was_training:
            bundle.model.train()
    return images


@torch.no_grad()
def vae_roundtrip(bundle: ModelBundle, images: list[Image.Image]) -> list[Image.Image]:
    """``images`` encoded (posterior mean) and decoded by the bundle's VAE: the closest the pipeline can draw them."""
    import numpy as np
    from PIL import Image

    from .training import pixels_of

    vae = bundle.components["vae"]
    device = next(vae.parameters()).device
    decoded = vae.decode(vae.encode(pixels_of(images).to(device)).latent_dist.mean).sample
    array = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]
