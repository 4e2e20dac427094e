"""Composing two real image runs: the composed diffusers LoRA still loads with ``pipe.load_lora_weights``, and
``cat`` with weights (1, 1) gives the denoiser with both LoRAs fused."""

from __future__ import annotations

import torch

import polyadapt
from polyadapt.compose import compose


def denoise(pipe, generator_seed: int = 0) -> torch.Tensor:
    unet = pipe.unet
    generator = torch.Generator().manual_seed(generator_seed)
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=generator)
    context = torch.randn(2, 4, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), encoder_hidden_states=context).sample


def test_cat_loads_in_diffusers_and_equals_both_loras_fused(make_config, tiny_base, tmp_path):
    from diffusers import DiffusionPipeline

    runs = [
        polyadapt.adapt(make_config(output=tmp_path / f"run-{i}", train={"seed": i, "lr": 5e-2},
                                    eval={"before": False, "general_data": None}))
        for i in range(2)
    ]  # fmt: skip
    out = tmp_path / "composed"
    compose([str(r) for r in runs], out, evaluate=False)

    def pipeline():
        return DiffusionPipeline.from_pretrained(str(tiny_base), torch_dtype=torch.float32)

    fused = pipeline()
    for run in runs:
        fused.load_lora_weights(str(run))
        fused.fuse_lora()
        fused.unload_lora_weights()
    composed = pipeline()
    composed.load_lora_weights(str(out))
    expected, got = denoise(fused), denoise(composed)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, denoise(pipeline()), atol=1e-4)
