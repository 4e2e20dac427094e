"""Export formats of the text modality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyadapt.errors import ExportError

# A fixed, model-independent batch for the parity gate: ordinary sentences plus the tokenizer's own special tokens.
PARITY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password and check my account balance?",
    "Numbers 0 1 2 3 4 5 6 7 8 9, symbols %$#@! and a longer clause that runs on for a while.",
)


def parity_batch(tokenizer: Any) -> dict[str, Any]:
    """Right-padded token ids and attention mask of :data:`PARITY_TEXTS`."""
    import torch

    encoded = [tokenizer(text)["input_ids"] for text in PARITY_TEXTS]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def merge_adapter(peft_model: Any) -> Any:
    """Fold the adapter into the base weights (peft's ``merge_and_unload``) and return the plain model."""
    return peft_model.merge_and_unload()


def logit_gap(reference: Any, candidate: Any, mask: Any) -> float:
    """Largest absolute difference between two logit tensors over the real (non-padding) positions."""
    real = mask.bool()
    return (reference.float()[real] - candidate.float()[real]).abs().max().item()


def export_merged(run: Any, output_dir: Path) -> dict[str, Any]:
    """Merge the adapter into the base model and save it with the tokenizer, after the parity gate.

    The gate runs base+adapter and the merged model on :func:`parity_batch` in float32 and refuses the export when the
    largest logit difference exceeds ``text.merge_tolerance``.
    """
    import torch

    bundle = run.bundle
    model = bundle.model
    if not hasattr(model, "merge_and_unload"):
        raise ExportError(
            f"peft.method {run.config.peft.method!r} cannot be merged into the base weights; use the adapter"
        )
    tolerance = run.config.settings.merge_tolerance
    batch = parity_batch(bundle.processor)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    model = model.float().eval()
    with torch.no_grad():
        reference = model(**batch).logits
    merged = merge_adapter(model).eval()
    if getattr(merged, "hf_quantizer", None) is not None:
        raise ExportError("the base model is held in quantized form; a merged model cannot be saved from it")
    with torch.no_grad():
        candidate = merged(**batch).logits
    gap = logit_gap(reference, candidate, batch["attention_mask"])
    if not gap <= tolerance:
        raise ExportError(
            f"merged export refused: the merged model's logits differ from base+adapter by up to {gap:.3g} "
            f"(tolerance text.merge_tolerance = {tolerance:g})"
        )
    merged.save_pretrained(str(output_dir), safe_serialization=True)
    bundle.processor.save_pretrained(str(output_dir))
    return {
        "parity": {"max_abs_logit_gap": gap, "tolerance": tolerance, "tokens": int(batch["attention_mask"].sum())},
        "architecture": type(merged).__name__,
        "files": sorted(p.name for p in Path(output_dir).iterdir()),
    }
