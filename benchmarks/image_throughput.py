"""Image adaptation throughput: polyadapt with cached latents/text embeddings vs without vs a reference loop.

    python benchmarks/image_throughput.py [--steps 30] [--batch 8] [--base sample_data/image/base]

All three train the same LoRA (r=8 on to_q/to_k/to_v/to_out.0) of the same tiny pipeline on the same Harbor Bank
images (sample_data/image/train, 32x32) with the same batch size and number of steps, one after the other in this
one process:

- ``polyadapt cached``: the image modality with ``cache_latents`` and text-embedding caching (the default), driven by
  polyadapt's own training loop; the one-time encoding cost is reported separately and included in "total".
- ``polyadapt uncached``: the same with both caches off (VAE and text encoder run every step).
- ``reference``: a plain loop written like diffusers' ``examples/text_to_image/train_text_to_image_lora.py``: every
  step loads and transforms the images, tokenizes the captions, encodes with the VAE and the text encoder, then
  adds noise, predicts, takes the MSE and steps AdamW.

Printed: steps/s (after 3 warm-up steps), seconds in total, and peak memory above the start of each variant (CUDA:
``max_memory_allocated``; CPU: resident set size sampled every 5 ms); then the ratios to the reference. The variants
run in interleaved rounds (``--rounds``) and the fastest run of each counts, which keeps a shared machine's changing
load from deciding the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 3


class PeakMemory:
    """Peak memory above the level at entry, in MiB (CUDA allocator, or sampled process RSS on the CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0.0

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start, self.high, self.running = self._rss(), self._rss(), True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.high = max(self.high, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.peak = (self.high - self.start) / 2**20


def write_config(base: Path, data: Path, out: Path, steps: int, batch: int, cache: bool, resolution: int) -> Path:
    import yaml

    config = {
        "modality": "image", "base": str(base), "data": {"path": str(data)}, "output": str(out),
        "peft": {"r": 8, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-4, "precision": "auto", "scheduler": "constant",
                  "warmup_steps": 0, "eval_every": None,
                  "log_every": 1},
        "image": {"resolution": resolution, "cache_latents": cache, "cache_text_embeddings": cache},
    }  # fmt: skip
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def run_polyadapt(config_path: Path, device: torch.device) -> dict[str, float]:
    """Prepare (the caching, when on) and train with polyadapt's loop; no evaluation."""
    import shutil

    from polyadapt.config import load_config
    from polyadapt.lifecycle import compute_dtype, make_accelerator, resolve_base
    from polyadapt.modality import DataContext, RunContext
    from polyadapt.plugins import get_plugin_manager
    from polyadapt.training import train_loop

    config = load_config(config_path)
    run_dir = Path(config.output)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    modality = get_plugin_manager().get_modality("image")
    base = resolve_base(config.base)
    splits = modality.load_data(DataContext(config=config, path=Path(config.data.path), base=base))
    accelerator = make_accelerator(config, run_dir)
    ctx = RunContext(config=config, base=base, device=accelerator.device,
                     dtype=compute_dtype(accelerator.mixed_precision), run_dir=run_dir)  # fmt: skip
    run = modality.open(ctx)
    run.load_base()
    run.model.to(accelerator.device)
    torch.manual_seed(0)
    run.add_adapter()
    run.model.to(accelerator.device)
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        prepared = run.prepare(splits.train, True)
        prepare_seconds = time.perf_counter() - started
        result = train_loop(accelerator=accelerator, run=run, train_split=prepared, eval_split=None, run_dir=run_dir,
                            show_progress=False)  # fmt: skip
    timed = [r for r in result.history if "elapsed" in r]
    measured = timed[-1]["elapsed"] - timed[WARMUP - 1]["elapsed"]
    return {
        "steps_per_second": (len(timed) - WARMUP) / measured,
        "prepare_seconds": prepare_seconds,
        "total_seconds": prepare_seconds + result.seconds,
        "peak_mib": memory.peak,
    }


def run_reference(
    base: Path, data: Path, steps: int, batch: int, device: torch.device, resolution: int
) -> dict[str, float]:
    """The per-step-encoding loop of diffusers' LoRA text-to-image example, reduced to its training step."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(str(base), use_safetensors=True)
    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False).to(device)
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(r=8, lora_alpha=8, init_lora_weights=True, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rows = [json.loads(line) for line in (data / "train" / "metadata.jsonl").read_text().splitlines() if line.strip()]
    rng = random.Random(0)

    def transform(path: Path) -> torch.Tensor:
        image = Image.open(path).convert("RGB").resize((resolution, resolution), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1)

    unet.train()
    times = []
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        for _ in range(steps):
            chosen = rng.sample(rows, batch) if batch <= len(rows) else [rng.choice(rows) for _ in range(batch)]
            pixels = torch.stack([transform(data / "train" / r["file_name"]) for r in chosen]).to(device)
            ids = tokenizer([r["text"] for r in chosen], max_length=tokenizer.model_max_length, padding="max_length",
                            truncation=True, return_tensors="pt").input_ids.to(device)  # fmt: skip
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            hidden = text_encoder(ids, return_dict=False)[0]
            pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
        total = time.perf_counter() - started
    return {
        "steps_per_second": (len(times) - WARMUP) / (times[-1] - times[WARMUP - 1]),
        "prepare_seconds": 0.0,
        "total_seconds": total,
        "peak_mib": memory.peak,
    }


def encoding_share(base: Path, batch: int, resolution: int, device: torch.device) -> dict[str, float]:
    """What caching can save at most: per-step times of the parts of an uncached step, on this device.

    VAE encode and text encode (what caching removes) against the UNet's forward and backward pass with the LoRA
    (what every step keeps). Also the same split in FLOPs, for this pipeline and for Stable Diffusion 1.5 at 512 px
    (its configs built on the meta device: no weights), so the tiny pipeline's proportions can be compared with a
    real one's.
    """
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    pipe = StableDiffusionPipeline.from_pretrained(str(base), use_safetensors=True)
    pipe.to(device)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    parts = _step_parts(
        pipe.vae, pipe.text_encoder, pipe.unet, batch, resolution, pipe.tokenizer.model_max_length, device
    )

    def timed(fn, repeats: int = 5) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    seconds = {name: timed(fn) for name, fn in parts.items()}
    flops = _flops(parts)
    sd15 = _sd15_flops()
    return {
        **{f"{name}_ms": 1000 * value for name, value in seconds.items()},
        "time_bound": sum(seconds.values()) / seconds["unet_train"],
        "flop_bound": sum(flops.values()) / flops["unet_train"],
        "sd15_flop_bound": sum(sd15.values()) / sd15["unet_train"],
        "flops": flops,
        "sd15_flops": sd15,
    }


def _step_parts(vae, text_encoder, unet, batch: int, resolution: int, tokens: int, device) -> dict:
    pixels = torch.randn(batch, 3, resolution, resolution, device=device)
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean if device.type != "meta" else None
    if latents is None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        latents = torch.randn(
            batch, vae.config.latent_channels, resolution // factor, resolution // factor, device=device
        )
    hidden = torch.randn(batch, tokens, text_encoder.config.hidden_size, device=device)
    timesteps = torch.full((batch,), 500, dtype=torch.long, device=device)

    def vae_encode():
        with torch.no_grad():
            return vae.encode(pixels).latent_dist.sample()

    def text_encode():
        with torch.no_grad():
            return text_encoder(ids)[0]

    def unet_train():
        unet(latents, timesteps, hidden).sample.pow(2).mean().backward()

    return {"vae_encode": vae_encode, "text_encode": text_encode, "unet_train": unet_train}


def _flops(parts: dict) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    counted = {}
    for name, fn in parts.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        counted[name] = float(counter.get_total_flops())
    return counted


def _sd15_flops() -> dict[str, float]:
    """FLOPs of the same three parts for Stable Diffusion 1.5's architecture at 512x512, batch 1, 77 tokens."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
        )  # fmt: skip
        text_encoder = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        )
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return _flops(_step_parts(vae, text_encoder, unet, 1, 512, 77, torch.device("meta")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--base", type=Path, default=ROOT / "sample_data" / "image" / "base")
    parser.add_argument("--data", type=Path, default=ROOT / "sample_data" / "image")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=32, help="training resolution (the demo base's)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, interleaved; the best counts")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-image")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device if args.device != "auto" else auto)
    base = args.base
    if not (base / "model_index.json").is_file():
        from polyadapt_image.tiny import tiny_pipeline

        base = args.work / "tiny-base"
        tiny_pipeline(seed=0, resolution=args.resolution).save_pretrained(base, safe_serialization=True)
    args.work.mkdir(parents=True, exist_ok=True)

    variants = {
        "polyadapt cached": lambda: run_polyadapt(
            write_config(base, args.data, args.work / "cached", args.steps, args.batch, True, args.resolution), device
        ),
        "polyadapt uncached": lambda: run_polyadapt(
            write_config(base, args.data, args.work / "uncached", args.steps, args.batch, False, args.resolution),
            device,
        ),
        "reference": lambda: run_reference(base, args.data, args.steps, args.batch, device, args.resolution),
    }
    # rounds of all three, best of each: on a shared machine the load changes while a variant runs
    results: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for name, run in variants.items():
            measured = run()
            best = results.get(name)
            if best is None or measured["steps_per_second"] > best["steps_per_second"]:
                results[name] = measured
    print(f"device {device}, {args.steps} steps of batch {args.batch}, best of {args.rounds} rounds, base {base}")
    print(f"{'variant':<20} {'steps/s':>9} {'prepare s':>10} {'total s':>9} {'peak MiB':>9}")
    for name, r in results.items():
        print(
            f"{name:<20} {r['steps_per_second']:>9.2f} {r['prepare_seconds']:>10.2f} {r['total_seconds']:>9.2f} {r['peak_mib']:>9.1f}"
        )
    reference = results["reference"]
    for name in ("polyadapt cached", "polyadapt uncached"):
        r = results[name]
        print(
            f"{name} vs reference: steps/s x{r['steps_per_second'] / reference['steps_per_second']:.2f}, "
            f"total time x{reference['total_seconds'] / r['total_seconds']:.2f} faster"
        )
    share = encoding_share(base, args.batch, args.resolution, device)
    print(
        f"parts of an uncached step (batch {args.batch}): VAE encode {share['vae_encode_ms']:.1f} ms, text encode "
        f"{share['text_encode_ms']:.1f} ms, UNet forward+backward {share['unet_train_ms']:.1f} ms: caching can give at "
        f"most x{share['time_bound']:.2f} on this device"
    )
    print(
        f"by FLOPs: caching can give at most x{share['flop_bound']:.2f} for this pipeline, "
        f"x{share['sd15_flop_bound']:.2f} for Stable Diffusion 1.5 at 512 px"
    )
    if args.json:
        summary = {
            "encoding_share": share,
            "cached_steps_per_second_ratio": results["polyadapt cached"]["steps_per_second"]
            / reference["steps_per_second"],
            "uncached_steps_per_second_ratio": results["polyadapt uncached"]["steps_per_second"]
            / reference["steps_per_second"],
            "cached_total_time_ratio": reference["total_seconds"] / results["polyadapt cached"]["total_seconds"],
        }
        args.json.write_text(json.dumps({**summary, "device": str(device), "results": results}, indent=2))


if __name__ == "__main__":
    main()
