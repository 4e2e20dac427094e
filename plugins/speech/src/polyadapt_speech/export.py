"""Export formats of the speech modality: a merged transformers Whisper, and a CTranslate2 (faster-whisper) model."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyadapt.errors import ExportError
from polyadapt.export import merge_with_parity_gate

if TYPE_CHECKING:
    from polyadapt.lifecycle import LoadedRun

    from .modality import SpeechRun

PARITY_TEXT = " Thank you for calling, how can I help you with your account today?"


@lru_cache(maxsize=1)
def ctranslate2_available() -> bool:
    """Whether the optional ``ctranslate2`` package can be imported."""
    import importlib.util

    return importlib.util.find_spec("ctranslate2") is not None


def parity_inputs(run: SpeechRun, device: Any) -> dict[str, Any]:
    """A fixed model input for the parity gate: 4 s of seeded synthetic audio (tones and noise) and a decoder prompt."""
    import torch

    from .data import SAMPLE_RATE
    from .features import log_mel

    generator = torch.Generator().manual_seed(0)
    t = torch.arange(4 * SAMPLE_RATE) / SAMPLE_RATE
    audio = 0.3 * torch.sin(2 * torch.pi * (220 + 180 * t) * t) + 0.05 * torch.randn(t.shape, generator=generator)
    features = log_mel(audio.unsqueeze(0), run.n_mels)
    prefix = run.sequences.prefix(None)
    text = run.tokenizer.encode(PARITY_TEXT, add_special_tokens=False)
    ids = torch.tensor([[*prefix, *text]], dtype=torch.long)
    return {"input_features": features.to(device), "decoder_input_ids": ids.to(device)}


def merged_model(loaded: LoadedRun) -> tuple[Any, dict[str, Any]]:
    """Merge the run's adapter into Whisper after the parity gate; returns the plain model and the gate's figures."""
    run = loaded.run
    tolerance = run.settings.merge_tolerance
    inputs = parity_inputs(run, next(run.model.parameters()).device)
    merged, gap = merge_with_parity_gate(
        run.model, lambda model: model(**inputs).logits, tolerance, "speech.merge_tolerance", loaded.config.peft.method
    )
    return merged, {
        "max_abs_logit_gap": gap,
        "tolerance": tolerance,
        "positions": int(inputs["decoder_input_ids"].numel()),
    }


def export_merged(loaded: LoadedRun, output_dir: Path) -> dict[str, Any]:
    """A transformers Whisper directory (safetensors, generation config, processor) with the adapter merged in, that
    ``pipeline("automatic-speech-recognition", model=output_dir)`` runs."""
    merged, parity = merged_model(loaded)
    merged.save_pretrained(str(output_dir), safe_serialization=True)
    loaded.run.processor.save_pretrained(str(output_dir))
    return {
        "parity": parity,
        "architecture": type(merged).__name__,
        "files": sorted(p.name for p in Path(output_dir).iterdir()),
    }


def export_ct2(loaded: LoadedRun, output_dir: Path) -> dict[str, Any]:
    """A CTranslate2 Whisper directory (``model.bin``, ``config.json``, tokenizer and preprocessor files) converted
    from the merged model with CTranslate2's own transformers converter; faster-whisper loads it."""
    if not ctranslate2_available():
        raise ExportError("--format ct2 needs the ctranslate2 package: pip install ctranslate2")
    from ctranslate2.converters import TransformersConverter

    merged, parity = merged_model(loaded)
    processor = loaded.run.processor
    with tempfile.TemporaryDirectory(prefix="polyadapt-ct2-") as scratch:
        merged.save_pretrained(scratch, safe_serialization=True)
        processor.save_pretrained(scratch)
        # faster-whisper reads the feature extractor settings from preprocessor_config.json
        processor.feature_extractor.save_pretrained(scratch)
        extra = [name for name in ("tokenizer.json", "preprocessor_config.json") if (Path(scratch) / name).is_file()]
        TransformersConverter(scratch, copy_files=extra).convert(str(output_dir), force=True)
    return {"parity": parity, "files": sorted(p.name for p in Path(output_dir).iterdir())}
