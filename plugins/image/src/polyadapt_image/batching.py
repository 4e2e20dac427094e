"""Preparing items (with or without cached latents and text embeddings), collating batches, the diffusion loss.

Latents are always ``mean + std * latent_noise`` of the VAE posterior, scaled by the VAE's ``scaling_factor``: with
caching the mean and std are computed once in :func:`prepare_items`, without caching the VAE computes them in
:func:`diffusion_loss` every step. The same ``latent_noise``, ``noise`` and ``timesteps`` therefore give the same loss
either way. Training batches draw those from the global RNG (seeded by polyadapt); held-out batches draw them from a
generator seeded per sample, and use the posterior mean, so the held-out loss is the same before and after training.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from polyadapt.modality import PreparedSplit

if TYPE_CHECKING:
    from .data import ImageSample
    from .modality import ImageRun

#: the timesteps held-out items are evaluated at are drawn uniformly from this range (very noisy and nearly clean
#: steps carry little signal about style, and their losses are dominated by the noise draw)
EVAL_TIMESTEP_RANGE = (50, 950)
ENCODE_BATCH = 16


def pixels_of(images: list[Any]) -> torch.Tensor:
    """PIL images -> float tensor (N, 3, H, W) in [-1, 1]."""
    import numpy as np

    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def encode_latent_stats(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior mean and std of ``vae`` for ``pixels`` (on the VAE's device), returned on the CPU."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for start in range(0, len(pixels), ENCODE_BATCH):
        dist = vae.encode(pixels[start : start + ENCODE_BATCH].to(device, torch.float32)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((torch.cat(means) - shift) * scale).cpu(), (torch.cat(stds) * scale).cpu()


@torch.no_grad()
def encode_prompts(run: ImageRun, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Conditioning tensors for ``prompts`` from the frozen text encoder(s), on the CPU in float32."""
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(prompts), ENCODE_BATCH):
        tokens = run.strategy.tokenize(prompts[start : start + ENCODE_BATCH])
        for key, value in run.strategy.encode_tokens(tokens, run.text_encoders).items():
            out.setdefault(key, []).append(value.float().cpu())
    return {key: torch.cat(values) for key, values in out.items()}


def prepare_items(run: ImageRun, samples: Sequence[ImageSample], training: bool) -> PreparedSplit:
    """Model-ready items. Each is a dict with ``key``, ``seed`` and either cached tensors or what to encode per step.

    Cached latents are computed from one crop per image (the centre, or one random crop drawn with the run's seed)
    and, with ``random_flip``, from its mirror image too; the flip is chosen per step in :func:`collate`.
    """
    from .data import load_image
    from .modality import item_seed

    settings, strategy = run.settings, run.strategy
    flip = settings.random_flip and training
    rng = random.Random(run.ctx.config.train.seed)
    items: list[dict[str, Any]] = []
    images = []
    for sample in samples:
        crop_rng = None if settings.center_crop or not training else rng
        image = load_image(sample.path, settings.resolution, settings.center_crop or not training, crop_rng)
        images.append(image)
        items.append({"key": sample.key, "seed": item_seed(sample.key), "caption": sample.caption, "path": sample.path})
    stats: dict[str, Any] = {
        "items": len(items),
        "resolution": settings.resolution,
        "cached_latents": settings.cache_latents,
        "cached_text_embeddings": settings.caches_text,
        # captions longer than the text encoder's window lose their end, in training and in generation alike
        "captions_truncated": strategy.truncated([item["caption"] for item in items]) if items else 0,
    }
    if not items:
        return PreparedSplit(items=items, stats=stats)
    if settings.cache_latents:
        mean, std = encode_latent_stats(run.vae, pixels_of(images))
        views = [(mean, std)]
        if flip:
            views.append(encode_latent_stats(run.vae, pixels_of([mirror(im) for im in images])))
        for i, item in enumerate(items):
            item["latents"] = [(m[i], s[i]) for m, s in views]
    else:
        for item, image in zip(items, images, strict=True):
            item["pixels"] = pixels_of([image])[0]
            item["flip"] = flip
    if settings.caches_text:
        cond = encode_prompts(run, [item["caption"] for item in items])
        for i, item in enumerate(items):
            item["cond"] = {key: value[i] for key, value in cond.items()}
    else:
        tokens = strategy.tokenize([item["caption"] for item in items])
        for i, item in enumerate(items):
            item["tokens"] = {key: value[i] for key, value in tokens.items()}
    for item in items:
        item.pop("path")
    return PreparedSplit(items=items, stats=stats)


def mirror(image: Any) -> Any:
    from PIL import Image

    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def collate(run: ImageRun, items: Sequence[dict[str, Any]], training: bool) -> dict[str, Any]:
    """A batch of CPU tensors: latent statistics or pixels, conditioning or token ids, and the noise draws."""
    settings, scheduler, strategy = run.settings, run.noise_scheduler, run.strategy
    batch: dict[str, Any] = {}
    if "latents" in items[0]:
        views = [random.choice(item["latents"]) if training else item["latents"][0] for item in items]
        batch["latent_mean"] = torch.stack([m for m, _ in views])
        batch["latent_std"] = torch.stack([s for _, s in views])
        shape = batch["latent_mean"].shape[1:]
    else:
        pixels = [
            item["pixels"].flip(-1) if training and item["flip"] and random.random() < 0.5 else item["pixels"]
            for item in items
        ]
        batch["pixel_values"] = torch.stack(pixels)
        factor = run.info["vae_scale_factor"]
        channels = run.vae.config.latent_channels
        shape = (channels, settings.resolution // factor, settings.resolution // factor)
    if "cond" in items[0]:
        for key in items[0]["cond"]:
            batch[key] = torch.stack([item["cond"][key] for item in items])
    else:
        for key in items[0]["tokens"]:
            batch[key] = torch.stack([item["tokens"][key] for item in items])
    batch.update(strategy.extra_conditioning(len(items), settings.resolution))

    steps = scheduler.config.num_train_timesteps
    if training:
        batch["timesteps"] = torch.randint(0, steps, (len(items),))
        batch["noise"] = torch.randn(len(items), *shape)
        latent_noise = torch.randn(len(items), *shape)
        batch["latent_noise"] = latent_noise if settings.sample_latents else torch.zeros_like(latent_noise)
        offset = torch.randn(len(items), shape[0], 1, 1)
    else:
        low, high = EVAL_TIMESTEP_RANGE
        draws = []
        for item in items:
            generator = torch.Generator().manual_seed(item["seed"])
            timestep = torch.randint(min(low, steps - 1), min(high, steps), (1,), generator=generator)
            draws.append(
                (timestep, torch.randn(*shape, generator=generator), torch.randn(shape[0], 1, 1, generator=generator))
            )
        batch["timesteps"] = torch.cat([t for t, _, _ in draws])
        batch["noise"] = torch.stack([n for _, n, _ in draws])
        batch["latent_noise"] = torch.zeros(len(items), *shape)
        offset = torch.stack([o for _, _, o in draws])
    if settings.noise_offset:
        # offset noise (Guttenberg 2023): a per-channel constant lets the model shift overall brightness and colour
        batch["noise"] = batch["noise"] + settings.noise_offset * offset
    return batch


def diffusion_loss(run: ImageRun, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Mean (optionally min-SNR weighted) MSE between the denoiser's prediction and its target: the mean of the rows'
    losses, each row weighted alike."""
    strategy, scheduler, settings = run.strategy, run.noise_scheduler, run.settings
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        vae = run.vae
        with torch.no_grad():
            dist = vae.encode(batch["pixel_values"].to(torch.float32)).latent_dist
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            mean = (dist.mean - shift) * vae.config.scaling_factor
            std = dist.std * vae.config.scaling_factor
    latents = (mean + std * batch["latent_noise"]).float()
    if "encoder_hidden_states" in batch:
        cond = {k: batch[k] for k in ("encoder_hidden_states", "text_embeds", "time_ids") if k in batch}
    else:
        tokens = {k: v for k, v in batch.items() if k.startswith("input_ids")}
        encoders = run.text_encoders
        trains_text = any(p.requires_grad for e in encoders for p in e.parameters())
        with torch.set_grad_enabled(trains_text and torch.is_grad_enabled()):
            cond = strategy.encode_tokens(tokens, encoders)
        if "time_ids" in batch:
            cond["time_ids"] = batch["time_ids"]
    timesteps = batch["timesteps"].long()
    noise = batch["noise"].float()
    noisy, target = strategy.noisy_and_target(scheduler, latents, noise, timesteps)
    dtype = next(p.dtype for p in model.parameters())
    cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
    prediction = strategy.predict(model, noisy.to(dtype), timesteps, cond).float()
    per_sample = (prediction - target.float()).pow(2).mean(dim=tuple(range(1, prediction.dim())))
    weights = strategy.loss_weights(scheduler, timesteps, settings.snr_gamma)
    return per_sample.mean() if weights is None else (per_sample * weights).mean()
