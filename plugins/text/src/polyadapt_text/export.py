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


#: the ranks vLLM's ``--max-lora-rank`` accepts
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_adapter_name(run_dir: Path) -> str:
    """The name clients send as ``model``: the run directory's name, or ``NAME-vN`` for a registry version pulled
    into the cache (``.../registry/NAME/vN-<digest>``)."""
    import re

    name = run_dir.name
    match = re.match(r"^(v[0-9]+)-[0-9a-f]{16}$", name)
    if match and run_dir.parent.parent.name == "registry":
        name = f"{run_dir.parent.name}-{match.group(1)}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "adapter"


def export_vllm(loaded: LoadedRun, output_dir: Path) -> dict[str, Any]:
    """The adapter as vLLM's LoRA loader reads it, beside a ``serve.sh`` with the ``vllm serve`` command.

    Checked before anything is written, each refusal naming the reason: a plain LoRA (``peft_type`` LORA, no DoRA, no
    bias, no ``modules_to_save``, no per-layer rank or alpha patterns), every tensor a ``lora_A``/``lora_B`` weight
    under ``base_model.model.``, and a rank vLLM supports (``--max-lora-rank`` is set to the smallest accepted value at
    least that rank)."""
    import json
    import shlex
    import shutil

    from safetensors import safe_open

    from polyadapt.errors import ExportError

    run_dir = Path(loaded.run_dir)
    config = json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))
    problems = []
    if str(config.get("peft_type", "")).upper() != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (vLLM serves LoRA adapters only)")
    if config.get("use_dora"):
        problems.append("use_dora is true (vLLM has no DoRA)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config.get('bias')!r} (vLLM loads no LoRA biases)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-layer rank_pattern/alpha_pattern")
    with safe_open(str(run_dir / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        ranks = {handle.get_slice(k).get_shape()[0] for k in keys if k.endswith(".lora_A.weight")}
    odd = [
        k for k in keys if not (k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")))
    ]
    if odd:
        problems.append(f"tensors other than plain lora_A/lora_B weights ({odd[0]}, {len(odd)} in all)")
    rank = max(ranks | {int(config.get("r", 0))})
    if rank > VLLM_RANKS[-1]:
        problems.append(f"rank {rank} is above vLLM's largest --max-lora-rank {VLLM_RANKS[-1]}")
    if problems:
        raise ExportError("--format vllm: this adapter is not one vLLM loads: " + "; ".join(problems))
    name = vllm_adapter_name(run_dir)
    target = output_dir / name
    target.mkdir(parents=True)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(run_dir / file, target / file)
    base = loaded.manifest.base
    model = base.hub_id or base.path or base.reference
    max_rank = next(r for r in VLLM_RANKS if r >= rank)
    gguf = str(model).endswith(".gguf")
    command = [
        "vllm", "serve", str(model), "--enable-lora", "--max-lora-rank", str(max_rank), "--max-loras", "1",
        "--lora-modules", f"{name}=$(dirname \"$0\")/{name}",
    ]  # fmt: skip
    lines = ["#!/usr/bin/env bash", "# Serve the base with this adapter as the model name " + shlex.quote(name)]
    if gguf:
        lines.append("# The base is a GGUF file: point vLLM at the original Hugging Face checkpoint instead.")
    lines.append(" ".join(shlex.quote(c) if "$" not in c else c for c in command))
    (output_dir / "serve.sh").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (output_dir / "serve.sh").chmod(0o755)
    return {"adapters": {name: name}, "max_lora_rank": max_rank, "base": str(model), "base_is_gguf": gguf}
