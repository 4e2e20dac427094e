"""Hook implementations of the text plugin. Kept thin and cheap to import: models load inside the modality."""

from __future__ import annotations

from polyadapt import hookimpl
from polyadapt.export import ExportFormat

from .modality import TextModality


@hookimpl
def register_modalities(register):
    register(TextModality)


@hookimpl
def register_export_formats(register):
    from .export import export_merged, export_vllm

    register(
        ExportFormat(
            name="merged",
            modality="text",
            help="adapter merged into the base weights (safetensors + tokenizer), after a logit parity gate",
            export=export_merged,
        )
    )
    register(
        ExportFormat(
            name="vllm",
            modality="text",
            help="the LoRA as vLLM loads it (checked) and serve.sh with the `vllm serve --enable-lora` command",
            export=export_vllm,
        )
    )


@hookimpl
def register_serving_backends(register):
    from polyadapt.serve.backend import BackendSpec

    def factory(context):
        from .serving import TextBackend

        return TextBackend(context)

    register(BackendSpec("text", frozenset({"completions", "chat"}), factory, peft_methods=frozenset({"lora"})))
