"""The seam between the shared training code and one family of diffusion models.

Everything that differs between model families lives in a :class:`Denoiser`: how prompts become conditioning
tensors, how the denoiser is called, how noise is added and what the loss target is, which LoRA key layout the
pipeline class saves and loads. ``load_base`` picks the strategy from the pipeline class; adding SD3 or Flux (flow
matching, transformer denoisers) means adding one subclass here and one entry in :data:`DENOISERS`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch


class Denoiser:
    """Strategy for one family of text-to-image pipelines (SD 1.x/2.x here: UNet, one CLIP text encoder)."""

    #: the diffusers pipeline class names this strategy serves
    pipelines: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)
    #: the pipeline attribute holding the denoiser network (also its key prefix in diffusers LoRA files)
    component: ClassVar[str] = "unet"
    #: names of the pipeline's text encoders and tokenizers, in the order the model consumes them
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)

    def __init__(self, pipeline: Any, prediction_type: str):
        self.pipeline = pipeline
        self.prediction_type = prediction_type

    # -- prompts -----------------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids per tokenizer (``input_ids``, ``input_ids_2``...), padded to each tokenizer's maximum length."""
        out = {}
        for i, name in enumerate(self.tokenizers):
            tokenizer = getattr(self.pipeline, name)
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out["input_ids" if i == 0 else f"input_ids_{i + 1}"] = ids
        return out

    def truncated(self, prompts: list[str]) -> int:
        """How many ``prompts`` are longer than the text encoder's window (the first tokenizer's), so lose their end."""
        tokenizer = getattr(self.pipeline, self.tokenizers[0])
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
        return sum(length > tokenizer.model_max_length for length in lengths)

    def encode_tokens(
        self, tokens: dict[str, torch.Tensor], encoders: list[torch.nn.Module]
    ) -> dict[str, torch.Tensor]:
        """Conditioning tensors (``encoder_hidden_states`` and friends) from :meth:`tokenize`'s ids."""
        (encoder,) = encoders
        ids = tokens["input_ids"].to(next(encoder.parameters()).device)
        return {"encoder_hidden_states": encoder(ids)[0]}

    def extra_conditioning(self, batch_size: int, resolution: int) -> dict[str, torch.Tensor]:
        """Conditioning that does not depend on the prompt (SDXL's size and crop ids); none for SD."""
        return {}

    def predict(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """Call the denoiser (possibly wrapped for distributed training) on noisy latents."""
        return model(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]

    # -- the diffusion objective ---------------------------------------------------------------------------------------
    def noisy_and_target(
        self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model input at ``timesteps`` and what the model should predict there (epsilon or v)."""
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            return noisy, noise
        if self.prediction_type == "v_prediction":
            return noisy, scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    def loss_weights(self, scheduler: Any, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
        """Per-sample min-SNR-gamma weights (Hang et al. 2023), or None for the plain mean.

        With epsilon targets the weight is ``min(snr, gamma) / snr``; with v targets ``min(snr, gamma) / (snr + 1)``,
        which gives the same weighting in terms of the clean-image error.
        """
        if snr_gamma is None:
            return None
        snr = signal_to_noise(scheduler, timesteps)
        clipped = torch.clamp(snr, max=snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr

    # -- LoRA files --------------------------------------------------------------------------------------------------
    def save_lora(self, directory: str, layers: dict[str, dict[str, torch.Tensor]], metadata: dict[str, dict]) -> None:
        """Write LoRA state dicts (by component name) in the pipeline class's own diffusers layout."""
        kwargs: dict[str, Any] = {}
        for component, state in layers.items():
            kwargs[f"{component}_lora_layers"] = state
            kwargs[f"{component}_lora_adapter_metadata"] = metadata.get(component)
        type(self.pipeline).save_lora_weights(directory, safe_serialization=True, **kwargs)


class SDXLDenoiser(Denoiser):
    """SDXL: two CLIP text encoders (hidden states concatenated, pooled output of the second) and added time ids."""

    pipelines = ("StableDiffusionXLPipeline",)
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")

    def encode_tokens(
        self, tokens: dict[str, torch.Tensor], encoders: list[torch.nn.Module]
    ) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for i, encoder in enumerate(encoders):
            ids = tokens["input_ids" if i == 0 else f"input_ids_{i + 1}"].to(next(encoder.parameters()).device)
            out = encoder(ids, output_hidden_states=True)
            # SDXL conditions on the penultimate layer, like its pipeline's encode_prompt
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def extra_conditioning(self, batch_size: int, resolution: int) -> dict[str, torch.Tensor]:
        # original size, crop top-left, target size: our images are resized and cropped to the target exactly
        ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
        return {"time_ids": ids.expand(batch_size, 6).clone()}

    def predict(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return model(
            noisy,
            timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


DENOISERS: tuple[type[Denoiser], ...] = (Denoiser, SDXLDenoiser)


def denoiser_for(pipeline: Any, prediction_type: str) -> Denoiser | None:
    """The strategy serving ``pipeline``'s class, or None if no strategy does."""
    name = type(pipeline).__name__
    for strategy in DENOISERS:
        if name in strategy.pipelines:
            return strategy(pipeline, prediction_type)
    return None


def supported_pipelines() -> list[str]:
    return [name for strategy in DENOISERS for name in strategy.pipelines]


def signal_to_noise(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar / (1 - alpha_bar) of a DDPM-style scheduler at ``timesteps``."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas / (1.0 - alphas)
