"""Loading diffusers pipelines, attaching LoRA to the denoiser, saving and loading LoRA files, generating images.

The functions take the run (:class:`polyadapt_image.modality.ImageRun`), which holds the ``pipeline``, its
``denoiser`` network (the pipeline's own UNet module), the frozen ``vae`` and ``text_encoders`` and the family
``strategy`` (:mod:`polyadapt_image.denoisers`). LoRAs live in the pipeline's modules as diffusers adapters, by name:
the trained one is ``default``, others are loaded next to it and switched with diffusers' ``set_adapters``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from polyadapt.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from polyadapt.modality import RunContext

    from .modality import ImageRun

#: the attention projections of diffusers' ``Attention`` blocks, the usual LoRA targets for style
DEFAULT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: the CLIP text encoder's attention projections, for the optional text-encoder LoRA
DEFAULT_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
#: the file a run's LoRA is saved in, at the root of the run directory (what ``pipe.load_lora_weights(dir)`` reads)
LORA_FILE = "pytorch_lora_weights.safetensors"


@contextmanager
def quiet_adapter_warnings() -> Iterator[None]:
    """Hide peft's warnings about a second adapter on one model and about a deleted active adapter: attaching several
    by name is the point here, and the run chooses the active one itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*Already found a `peft_config` attribute.*")
        warnings.filterwarnings("ignore", message=r".*was active which is now deleted.*")
        yield


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


def default_targets(unet: torch.nn.Module) -> list[str]:
    """The attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) that exist in ``unet``."""
    names = {name for name, _ in unet.named_modules()}
    found = [t for t in DEFAULT_UNET_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
    if not found:
        raise ConfigError("peft.target_modules: the denoiser has no attention projections (to_q/to_k/to_v/to_out.0)")
    return found


def attach_lora(run: ImageRun, targets: list[str]) -> None:
    """Inject a fresh LoRA in place (diffusers' ``add_adapter``; the text encoders' with peft when they train too);
    only LoRA parameters stay trainable."""
    from peft import inject_adapter_in_model

    from polyadapt.adapters import build_peft_config
    from polyadapt.peft_run import DEFAULT_ADAPTER

    section = run.ctx.config.peft
    run.denoiser.add_adapter(build_peft_config(section, targets), adapter_name=DEFAULT_ADAPTER)
    if run.settings.train_text_encoder:
        for encoder in run.text_encoders:
            inject_adapter_in_model(
                build_peft_config(section, DEFAULT_TEXT_TARGETS), encoder, adapter_name=DEFAULT_ADAPTER
            )
            for name, param in encoder.named_parameters():
                param.requires_grad_("lora_" in name)


class DenoiserWithTextEncoders(torch.nn.Module):
    """The denoiser and the text encoders as one trainable module (text-encoder LoRA), called like the denoiser, so
    that distributed training, gradient clipping and checkpoints see every trained weight."""

    def __init__(self, denoiser: Any, text_encoders: list[Any]):
        super().__init__()
        self.denoiser = denoiser
        self.text_encoders = torch.nn.ModuleList(text_encoders)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.denoiser(*args, **kwargs)


def lora_parts(run: ImageRun) -> list[tuple[str, torch.nn.Module]]:
    """``(component, module)`` of every pipeline part that can carry LoRA: the denoiser, then the text encoders."""
    return [(run.strategy.component, run.denoiser), *zip(run.strategy.text_encoders, run.text_encoders, strict=True)]


def _adapter_state(module: torch.nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    config = getattr(module, "peft_config", {}).get(name)
    if config is None:
        return None
    state = get_peft_model_state_dict(module, adapter_name=name)
    state = {k: v.detach().to("cpu").float().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}
    metadata = json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    return state, metadata


def save_lora(run: ImageRun, directory: Path, name: str) -> list[Path]:
    """Write the LoRA ``name`` in the pipeline class's diffusers layout, loadable by ``pipe.load_lora_weights(dir)``."""
    layers, metadata = {}, {}
    for component, module in lora_parts(run):
        found = _adapter_state(module, name)
        if found is not None:
            layers[component], metadata[component] = found
    directory.mkdir(parents=True, exist_ok=True)
    run.strategy.save_lora(str(directory), layers, metadata)
    return sorted(directory.glob("pytorch_lora_weights*.safetensors"))


def load_lora(run: ImageRun, directory: Path, name: str) -> None:
    """Load a LoRA saved by :func:`save_lora` (or any diffusers LoRA file) into the run's pipeline under ``name``.

    Diffusers loads text-encoder LoRA through transformers' PEFT integration, which has a minimum peft version; where
    the installed peft is older, the text-encoder part is injected with peft directly (the same layers and weights).
    """
    directory = Path(directory)
    weights = directory / LORA_FILE
    if not weights.is_file():
        raise ConfigError(f"{directory} holds no {LORA_FILE}")
    pipe = run.pipeline
    with quiet_adapter_warnings():
        if transformers_peft_usable():
            pipe.load_lora_weights(str(directory), weight_name=weights.name, adapter_name=name)
            return
        tensors, metadata = read_lora_file(weights)
        type(pipe).load_lora_into_unet(
            tensors, network_alphas=None, unet=run.denoiser, adapter_name=name, metadata=metadata or None,
            _pipeline=pipe,
        )  # fmt: skip
        for component, encoder in zip(run.strategy.text_encoders, run.text_encoders, strict=True):
            _load_text_encoder_lora(encoder, tensors, metadata, component, name)


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
    run: ImageRun, prompts: list[str], seeds: list[int], resolution: int, steps: int, guidance: float
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, in that order, with the pipeline's active LoRA(s)."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    images = []
    # diffusers warns at every call about a prompt longer than the text encoder's window; polyadapt counts such
    # captions once (prepared stats ``captions_truncated``) and says so in ``infer``
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        for prompt, seed in zip(prompts, seeds, strict=True):
            generator = torch.Generator(device="cpu").manual_seed(seed)
            out = run.pipeline(
                prompt,
                height=resolution,
                width=resolution,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generator,
            )
            images.append(out.images[0])
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return images


@torch.no_grad()
def vae_roundtrip(vae: Any, images: list[Image.Image]) -> list[Image.Image]:
    """``images`` encoded (posterior mean) and decoded by ``vae``: the closest the pipeline can draw them."""
    import numpy as np
    from PIL import Image

    from .batching import pixels_of

    device = next(vae.parameters()).device
    decoded = vae.decode(vae.encode(pixels_of(images).to(device)).latent_dist.mean).sample
    array = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]
