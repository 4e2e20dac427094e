"""Export formats of the text modality."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyadapt.export import merge_with_parity_gate

if TYPE_CHECKING:
    from polyadapt.lifecycle import LoadedRun

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


def export_merged(loaded: LoadedRun, output_dir: Path) -> dict[str, Any]:
    """Merge the adapter into the base model and save it with the tokenizer, after the parity gate.

    The gate runs base+adapter and the merged model on :func:`parity_batch` in float32 and refuses the export when the
    largest logit difference over real (non-padding) tokens exceeds ``text.merge_tolerance``.
    """
    run = loaded.run
    tolerance = loaded.config.settings.merge_tolerance
    device = next(run.model.parameters()).device
    batch = {k: v.to(device) for k, v in parity_batch(run.tokenizer).items()}
    real = batch["attention_mask"].bool()
    merged, gap = merge_with_parity_gate(
        run.model,
        lambda model: model(**batch).logits[real],
        tolerance,
        "text.merge_tolerance",
        loaded.config.peft.method,
    )
    merged.save_pretrained(str(output_dir), safe_serialization=True)
    run.tokenizer.save_pretrained(str(output_dir))
    return {
        "parity": {"max_abs_logit_gap": gap, "tolerance": tolerance, "tokens": int(batch["attention_mask"].sum())},
        "architecture": type(merged).__name__,
        "files": sorted(p.name for p in Path(output_dir).iterdir()),
    }
