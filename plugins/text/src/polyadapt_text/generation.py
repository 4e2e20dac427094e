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
                if _prompt_learning(model):
                    generated = _decode_without_cache(
                        model, input_ids.to(device), attention.to(device), max_new_tokens, options["eos_token_id"],
                        pad_id, temperature, top_p,
                    )  # fmt: skip
                else:
                    generated = model.generate(
                        input_ids=input_ids.to(device), attention_mask=attention.to(device), **options
                    )
            for row in generated[:, width:]:
                outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return outputs


def _prompt_learning(model: Any) -> bool:
    """Whether ``model`` is a peft model with learned virtual tokens (prefix tuning)."""
    configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    return bool(configs and active in configs and configs[active].is_prompt_learning)


def _decode_without_cache(
    model: Any,
    input_ids: Any,
    attention: Any,
    max_new_tokens: int,
    stop_ids: list[int] | None,
    pad_id: int,
    temperature: float,
    top_p: float,
) -> Any:
    """Token-by-token decoding with a full forward pass per token.

    peft injects prefix-tuning key/values through ``past_key_values``, which transformers 5's ``generate`` replaces
    with its own cache, so ``generate`` would silently answer as the base model. A full forward per token keeps the
    prefix in every step; it is quadratic in length, which is fine for evaluation-sized answers.
    """
    import torch

    stops = torch.tensor(stop_ids or [], device=input_ids.device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False).logits
        scores = logits[:, -1, :].float()
        if temperature > 0:
            probs = torch.softmax(scores / temperature, dim=-1)
            ordered, order = probs.sort(dim=-1, descending=True)
            outside = ordered.cumsum(dim=-1) - ordered > top_p
            ordered[outside] = 0.0
            choice = torch.multinomial(ordered / ordered.sum(dim=-1, keepdim=True), 1)
            token = order.gather(-1, choice).squeeze(-1)
        else:
            token = scores.argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        input_ids = torch.cat([input_ids, token[:, None]], dim=1)
        attention = torch.cat([attention, (~finished).long()[:, None]], dim=1)
        if stops.numel():
            finished |= torch.isin(token, stops)
        if finished.all():
            break
    return input_ids
