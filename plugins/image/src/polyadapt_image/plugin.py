"""Hook implementations of the image plugin (cheap to import: diffusers loads only when a run starts)."""

from __future__ import annotations

from polyadapt import hookimpl
from polyadapt.export import ExportFormat


@hookimpl
def register_modalities(register):
    from .modality import ImageModality

    register(ImageModality)


@hookimpl
def register_export_formats(register):
    from . import export

    register(
        ExportFormat(
            "kohya", "image", "one LoRA file in the kohya/A1111/ComfyUI key layout (lora_unet_...)", export.export_kohya
        )
    )
    register(
        ExportFormat(
            "merged",
            "image",
            "the pipeline with the LoRA fused into its weights (diffusers, safetensors)",
            export.export_merged,
        )
    )


@hookimpl
def register_serving_backends(register):
    from polyadapt.serve.backend import BackendSpec

    def factory(context):
        from .serving import DiffusionBackend

        return DiffusionBackend(context)

    register(BackendSpec("image", frozenset({"images"}), factory))
