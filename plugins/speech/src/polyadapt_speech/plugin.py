"""Hook implementations of the speech plugin. Kept thin and cheap to import: models load inside the modality."""

from __future__ import annotations

from polyadapt import hookimpl
from polyadapt.export import ExportFormat

from .modality import SpeechModality


@hookimpl
def register_modalities(register):
    register(SpeechModality)


@hookimpl
def register_export_formats(register):
    from .export import export_ct2, export_merged

    register(
        ExportFormat(
            name="merged",
            modality="speech",
            help="adapter merged into Whisper (transformers safetensors + processor), after a logit parity gate",
            export=export_merged,
        )
    )
    register(
        ExportFormat(
            name="ct2",
            modality="speech",
            help="CTranslate2 / faster-whisper model of the merged weights (needs the ctranslate2 package)",
            export=export_ct2,
        )
    )


@hookimpl
def register_serving_backends(register):
    from polyadapt.serve.backend import BackendSpec

    def factory(context):
        from .serving import SpeechBackend

        return SpeechBackend(context)

    register(BackendSpec("speech", frozenset({"transcriptions"}), factory, peft_methods=frozenset({"lora"})))
