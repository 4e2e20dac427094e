"""Serving images: requests grouped by adapter (and strength, size and sampler settings), each group generated in
batched pipeline calls with that LoRA active (diffusion cannot mix LoRAs per row the way a linear layer can).

Image *i* of a request with ``seed`` s is drawn from its own generator seeded ``s + i`` with the sampler settings of
the run that trained the adapter, as ``polyadapt infer RUN --seed s --n N`` draws it; the adapter's strength is
``lora_scale`` (``--scale``).
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from polyadapt.serve.backend import (
    AdapterVersion,
    BackendContext,
    ImageBackend,
    ImageOptions,
    Images,
    Job,
    RequestProblem,
)

if TYPE_CHECKING:
    from .modality import ImageRun

#: the largest side an image may have
MAX_SIDE = 2048


@dataclass(frozen=True)
class ImageSpec:
    prompt: str
    seeds: tuple[int, ...]
    width: int
    height: int
    scale: float
    steps: int
    guidance: float


class DiffusionBackend(ImageBackend):
    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.run: ImageRun = context.run
        self.jobs: list[Job] = []
        self.factor = int(self.run.info.get("vae_scale_factor") or 8)

    # -- requests ----------------------------------------------------------------------------------------------------
    def image_spec(self, prompt: str, adapter: AdapterVersion | None, options: ImageOptions) -> ImageSpec:
        settings = adapter.settings if adapter is not None else self.run.settings
        native = settings.resolution or self.run.settings.resolution
        width, height = options.size or (native, native)
        if width % self.factor or height % self.factor or max(width, height) > MAX_SIDE:
            raise RequestProblem(
                f"size {width}x{height}: width and height must be multiples of {self.factor}, at most {MAX_SIDE} "
                f"(this model's native size: {native}x{native})", param="size",
            )  # fmt: skip
        seed = options.seed if options.seed is not None else random.randrange(2**31)
        scale = 1.0 if options.lora_scale is None else options.lora_scale
        return ImageSpec(
            prompt=prompt, seeds=tuple(range(seed, seed + options.n)), width=width, height=height, scale=scale,
            steps=settings.num_inference_steps, guidance=settings.guidance_scale,
        )  # fmt: skip

    # -- scheduling (worker thread) ----------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self.jobs)

    def rows(self) -> int:
        return sum(len(j.spec.seeds) for j in self.jobs)

    def admit(self, jobs: Sequence[Job]) -> None:
        self.jobs.extend(jobs)

    def step(self) -> None:
        jobs, self.jobs = self.jobs, []
        groups: dict[tuple[Any, ...], list[Job]] = {}
        for job in jobs:
            if job.cancelled.is_set():
                job.fail(ConnectionAbortedError("the client went away"))
                continue
            s = job.spec
            key = (job.slot, s.scale if job.slot else None, s.width, s.height, s.steps, s.guidance)
            groups.setdefault(key, []).append(job)
        try:
            for (slot, scale, width, height, steps, guidance), members in groups.items():
                self._use(slot, scale)
                pairs = [(job, seed) for job in members for seed in job.spec.seeds]
                images: list[Any] = []
                for start in range(0, len(pairs), self.limits.max_batch):
                    chunk = pairs[start : start + self.limits.max_batch]
                    images += self._generate([j.spec.prompt for j, _ in chunk], [s for _, s in chunk], width, height,
                                             steps, guidance)  # fmt: skip
                done = 0
                for job in members:
                    count = len(job.spec.seeds)
                    job.finish(Images(png=[_png(i) for i in images[done : done + count]], seeds=list(job.spec.seeds)))
                    done += count
        except Exception as exc:
            for job in jobs:
                job.fail(exc)
            raise

    def _use(self, slot: str | None, scale: float | None) -> None:
        run = self.run
        if slot is None:
            if run.adapter_names():
                run.set_adapter(None)
            return
        run.combine_adapters({slot: scale})

    def _generate(
        self, prompts: list[str], seeds: list[int], width: int, height: int, steps: int, guidance: float
    ) -> list[Any]:
        import torch
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            with torch.no_grad():
                out = self.run.pipeline(
                    prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                    generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds],
                )  # fmt: skip
        finally:
            diffusers_logging.set_verbosity(verbosity)
        return list(out.images)

    def fail_all(self, error: BaseException) -> None:
        for job in self.jobs:
            job.fail(error)
        self.jobs = []


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_backend(context: BackendContext) -> DiffusionBackend:
    return DiffusionBackend(context)
