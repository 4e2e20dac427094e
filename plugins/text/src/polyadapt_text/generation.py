"""Batched generation for evaluation (greedy) and for ``polyadapt infer`` (greedy or sampled)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Continue each prompt (token ids) and return the decoded new text, special tokens removed.

    Prompts are left-padded so every row's new tokens start at the same column. ``temperature == 0`` is greedy.
    """
    import torch

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    stop = [
        t for t in {tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)} if t is not None
    ]
    stop_ids: list[int] = []
    for token in stop:
        stop_ids.extend(token if isinstance(token, list) else [token])
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad_id,
        "eos_token_id": sorted(set(stop_ids)) or None,
    }
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, prompt in enumerate(chunk):
                input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
                attention[row, width - len(prompt) :] = 1
            with torch.no_grad():
                generated = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), **options
                )
            for row in generated[:, width:]:
                outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return outputs
