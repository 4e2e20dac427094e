"""Export formats of image runs: ``kohya`` (one LoRA file for A1111/ComfyUI) and ``merged`` (a fused pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from polyadapt.errors import ExportError

if TYPE_CHECKING:
    from polyadapt.lifecycle import LoadedRun

KOHYA_FILE = "lora.safetensors"
#: diffusers component prefix -> kohya prefix, per pipeline (SD 1.x/2.x has one text encoder, "te"; SDXL "te1"/"te2")
KOHYA_PREFIXES = {
    "StableDiffusionPipeline": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "StableDiffusionXLPipeline": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}


#: LoRA weight suffixes of diffusers files (both the saved ``lora.down`` and peft's ``lora_A`` spellings) -> kohya
SUFFIXES = (
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
)  # fmt: skip


def read_lora(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The run's diffusers LoRA tensors and its per-component peft config (from the safetensors metadata)."""
    from .model import LORA_FILE, read_lora_file

    path = Path(run_dir) / LORA_FILE
    if not path.is_file():
        raise ExportError(f"{run_dir} holds no {LORA_FILE}")
    tensors, flat = read_lora_file(path)
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return tensors, configs


def to_kohya(tensors: dict[str, torch.Tensor], configs: dict[str, Any], pipeline: str) -> dict[str, torch.Tensor]:
    """Diffusers LoRA keys (``unet.down_blocks.0....to_q.lora.down.weight``) -> kohya keys
    (``lora_unet_down_blocks_0_..._to_q.lora_down.weight``, ``.lora_up.weight``, ``.alpha``).

    The module path keeps diffusers' names with dots turned into underscores, the layout kohya's sd-scripts writes
    for these architectures; ``alpha`` is the trained ``lora_alpha`` so that ``alpha / rank`` scales the same.
    """
    prefixes = KOHYA_PREFIXES.get(pipeline)
    if prefixes is None:
        raise ExportError(f"kohya export supports {', '.join(KOHYA_PREFIXES)}, not {pipeline}")
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        if component not in prefixes:
            raise ExportError(f"kohya export: unexpected LoRA key {key!r}")
        if "lora_magnitude_vector" in rest or "dora_scale" in rest:
            raise ExportError("kohya export: DoRA adapters have no kohya layout; export 'merged' instead")
        found = next(((rest[: -len(suffix)], kind) for suffix, kind in SUFFIXES if rest.endswith(suffix)), None)
        if found is None:
            raise ExportError(f"kohya export: unexpected LoRA key {key!r}")
        module, kind = found
        # kohya names text-encoder modules from CLIPTextModel's root (``text_model.encoder...``), which recent
        # transformers versions flatten away
        path = f"text_model.{module}" if component != "unet" and not module.startswith("text_model.") else module
        name = f"{prefixes[component]}_{path.replace('.', '_')}"
        out[f"{name}.lora_{kind}.weight"] = value.contiguous()
        if kind == "down":
            config = configs.get(component, {})
            alpha = config.get("alpha_pattern", {}).get(module, config.get("lora_alpha", value.shape[0]))
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def export_kohya(run: LoadedRun, output_dir: Path) -> dict[str, Any]:
    """Write ``lora.safetensors`` in the kohya key layout; A1111, ComfyUI and diffusers load it."""
    from safetensors.torch import save_file

    tensors, configs = read_lora(run.run_dir)
    pipeline = type(run.run.pipeline).__name__
    kohya = to_kohya(tensors, configs, pipeline)
    save_file(kohya, str(output_dir / KOHYA_FILE), metadata={"ss_network_module": "networks.lora", "format": "pt"})
    return {"file": KOHYA_FILE, "tensors": len(kohya), "pipeline": pipeline}


@torch.no_grad()
def probe(run: LoadedRun) -> torch.Tensor:
    """The denoiser's output on one fixed noisy latent and the empty prompt (for the parity check of a merge)."""
    image = run.run
    strategy, unet = image.strategy, image.denoiser
    settings = image.settings
    size = settings.resolution // image.info["vae_scale_factor"]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=generator)
    device = next(unet.parameters()).device
    cond = strategy.encode_tokens(strategy.tokenize([""]), image.text_encoders)
    cond.update({k: v.to(device) for k, v in strategy.extra_conditioning(1, settings.resolution).items()})
    dtype = next(unet.parameters()).dtype
    cond = {k: v.to(device, dtype) for k, v in cond.items()}
    timesteps = torch.tensor([500], device=device)
    return strategy.predict(unet, latents.to(device, dtype), timesteps, cond).float().cpu()


def export_merged(run: LoadedRun, output_dir: Path) -> dict[str, Any]:
    """Fuse the LoRA into the denoiser (and text encoders) and save the whole pipeline; records the parity gap."""
    pipe = run.run.pipeline
    with_lora = probe(run)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    merged = probe(run)
    gap = float((merged - with_lora).abs().max())
    scale = float(with_lora.abs().max())
    if gap > 1e-3 * max(1.0, scale):
        raise ExportError(
            f"merged export: fused denoiser differs from denoiser + LoRA by {gap:.3g} (max |output| {scale:.3g})"
        )
    pipe.save_pretrained(str(output_dir), safe_serialization=True)
    return {"parity_max_abs_diff": gap, "pipeline": type(pipe).__name__}
