"""Pretrain the tiny text-to-image base model of the image demo on generic synthetic shapes, on the CPU.

    python sample_data/image/make_base.py   # about 30 minutes on 2 CPU threads; writes sample_data/image/base/

Recipe (all seeded, so a rerun gives the same weights on the same library versions):

1. Data: an endless stream of 32x32 pictures of one shape (circle, square, triangle, ring, cross, stripes, diamond)
   in one colour on a plain background of another colour, drawn at 128x128 and downsampled (anti-aliased), captioned
   "a red circle on a white background". The colours are generic (red, green, blue, yellow, orange, purple, pink,
   white, black, gray, brown, cyan, lime, magenta); the brand palette of the demo (navy, teal, sand, gold) is left
   out on purpose so that the demo's adaptation has something to teach.
2. VAE: ``AutoencoderKL`` (factor 4, 4 latent channels) trained for reconstruction (4000 steps of batch 16; L1 + MSE,
   KL weight 1e-6, AdamW 3e-4 with cosine decay); ``scaling_factor`` set to 1/std of the latents. Its pictures are
   not the captioned ones: one to three shapes in colours drawn uniformly from the whole RGB cube, on plain or
   two-band backgrounds, so that, like the VAE of a real pretrained pipeline, it redraws any colour (the brand's
   included) while the denoiser has never been taught those colours.
3. Denoiser: ``UNet2DConditionModel`` (48/96 channels, cross-attention at both levels) and the 2-layer CLIP text
   encoder trained together for 2000 steps of batch 32 on 8x8 latents of 8192 pre-encoded pictures, with the
   epsilon loss, min-SNR-5 weighting, 10% empty captions (so that classifier-free guidance works), AdamW 1e-3,
   100 warm-up steps, cosine decay.
4. Saved as a ``StableDiffusionPipeline`` (safetensors, DDIM scheduler) with a preview grid of generated samples.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 50, 170),
    "pink": (245, 140, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (120, 70, 30),
    "cyan": (60, 220, 240),
    "lime": (170, 240, 60),
    "magenta": (230, 40, 200),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross", "stripes", "diamond")
HERE = Path(__file__).resolve().parent


def draw_shape(shape: str, colour: tuple, background: tuple, rng: random.Random, size: int = 32) -> Image.Image:
    """One picture: ``shape`` in ``colour`` on ``background``, with random size and position."""
    big = size * 4
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.38) * big
    cx, cy = (rng.uniform(radius, big - radius) for _ in range(2))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=int(radius * 0.35))
    elif shape == "cross":
        w = radius * 0.35
        draw.rectangle((cx - w, cy - radius, cx + w, cy + radius), fill=colour)
        draw.rectangle((cx - radius, cy - w, cx + radius, cy + w), fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=colour)
    elif shape == "stripes":
        band = big / rng.choice((4, 6, 8))
        y = rng.uniform(0, band)
        while y < big:
            draw.rectangle((0, y, big, y + band / 2), fill=colour)
            y += band
    return image.resize((size, size), Image.Resampling.LANCZOS)


def sample(rng: random.Random) -> tuple[Image.Image, str]:
    shape = rng.choice(SHAPES)
    colour, background = rng.sample(list(COLOURS), 2)
    caption = f"a {colour} {shape} on a {background} background"
    return draw_shape(shape, COLOURS[colour], COLOURS[background], rng), caption


def random_colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def vae_picture(rng: random.Random, size: int = 32) -> Image.Image:
    """A picture for the autoencoder: one to three shapes in random colours over a plain or two-band background."""
    background = draw_shape(rng.choice(SHAPES), random_colour(rng), random_colour(rng), rng, size)
    if rng.random() < 0.5:  # a horizon: the lower band in another colour
        band = Image.new("RGB", (size, size), random_colour(rng))
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).rectangle((0, rng.randrange(size // 4, size), size, size), fill=255)
        background.paste(band, (0, 0), mask)
    for _ in range(rng.randrange(0, 3)):
        colour = random_colour(rng)
        key = tuple(255 - c for c in colour)  # drawn on its complement, then cut out of it
        overlay = draw_shape(rng.choice(SHAPES), colour, key, rng, size)
        distance = np.abs(np.asarray(overlay, dtype=np.int32) - np.array(key)).sum(axis=-1)
        background.paste(overlay, (0, 0), Image.fromarray(((distance > distance.max() / 2) * 255).astype(np.uint8)))
    return background


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_vae(vae, rng: random.Random, steps: int, batch: int) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-4, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    vae.train()
    for step in range(steps):
        pixels = to_tensor([vae_picture(rng) for _ in range(batch)])
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - pixels).abs().mean() + (recon - pixels).pow(2).mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_dataset(vae, rng: random.Random, count: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    means, stds, captions = [], [], []
    for start in range(0, count, 64):
        pairs = [sample(rng) for _ in range(min(64, count - start))]
        dist = vae.encode(to_tensor([p[0] for p in pairs])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        captions += [p[1] for p in pairs]
    return torch.cat(means), torch.cat(stds), captions


def train_denoiser(pipe, means, stds, captions, steps: int, batch: int, rng: random.Random) -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    scale = pipe.vae.config.scaling_factor
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    unet.train()
    text_encoder.train()
    for step in range(steps):
        index = torch.tensor([rng.randrange(len(captions)) for _ in range(batch)])
        latents = (means[index] + stds[index] * torch.randn_like(means[index])) * scale
        texts = [captions[i] if rng.random() > 0.1 else "" for i in index.tolist()]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        hidden = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, hidden).sample
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=5.0) / snr
        loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"denoiser step {step}/{steps} loss {loss.item():.4f}")
    unet.eval()
    text_encoder.eval()


def preview(pipe, path: Path) -> None:
    prompts = [
        "a red circle on a white background",
        "a blue square on a yellow background",
        "a green triangle on a black background",
        "a yellow stripes on a purple background",
        "a white cross on a red background",
        "a orange ring on a blue background",
        "a pink diamond on a green background",
        "a black circle on a cyan background",
    ]
    images = pipe(prompts, num_inference_steps=25, guidance_scale=4.0, height=32, width=32,
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    grid = Image.new("RGB", (32 * len(images), 32))
    for i, image in enumerate(images):
        grid.paste(image, (32 * i, 0))
    grid.resize((grid.width * 4, grid.height * 4), Image.Resampling.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "base")
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--denoiser-steps", type=int, default=2000)
    parser.add_argument("--latents", type=int, default=8192, help="pictures encoded once for denoiser training")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from polyadapt_image.tiny import tiny_pipeline

    rng = random.Random(0)
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    log(f"training VAE for {args.vae_steps} steps")
    train_vae(pipe.vae, rng, args.vae_steps, batch=16)
    means, stds, captions = encode_dataset(pipe.vae, rng, args.latents)
    scaling = 1.0 / float(means.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    log(f"latent scaling factor {scaling:.4f}; training denoiser for {args.denoiser_steps} steps")
    train_denoiser(pipe, means, stds, captions, args.denoiser_steps, batch=32, rng=rng)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    preview(pipe, args.out.parent / "base_preview.png")
    log(f"saved {args.out}")


if __name__ == "__main__":
    main()
