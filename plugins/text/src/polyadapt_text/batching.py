"""From validated samples to model-ready token sequences: chat rendering, loss masks, truncation, packing, batches
and the loss.

An item is a dict of token lists: ``input_ids`` and ``labels`` (``IGNORE_INDEX`` where no loss is taken), plus
``position_ids`` for a packed row. In a packed row each sample's positions restart at 0 and the label of each sample's
first token is ``-100``, so no sample is ever predicted from another; attention isolation between samples comes from the
model's packed-sequence support (checked by :func:`packing_isolated` before packing is used).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from polyadapt.errors import ConfigError, DataError
from polyadapt.evaluation import evaluating
from polyadapt.losses import IGNORE_INDEX
from polyadapt.peft_run import fused_head_loss, plain_linear_head, unwrap

if TYPE_CHECKING:
    import torch

    from .data import TextSample


# -- rendering -------------------------------------------------------------------------------------------------------


def chat_messages(sample_messages: Sequence[tuple[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Messages as dicts for ``apply_chat_template``; ``system_prompt`` is added when the record has no system turn."""
    messages = [{"role": role, "content": content} for role, content in sample_messages]
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not tokenizer.chat_template:
        raise ConfigError("text: chat data needs a chat template; the tokenizer has none, set text.chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, is_assistant_reply)`` pieces.

    Each assistant reply spans from the end of the rendering of the conversation before it (with the generation
    prompt) to the end of the rendering including it, so the reply's end-of-turn tokens are learned too. Templates that
    re-render earlier turns differently (and so are not prefix-stable) fall back to learning the last reply only.
    """
    full = render(tokenizer, messages, add_generation_prompt=False)
    cuts: list[tuple[int, int]] = []
    stable = True
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(upto) and len(before) <= len(upto)):
            stable = False
            break
        cuts.append((len(before), len(upto)))
    if not stable:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        before = render(tokenizer, messages[:last], add_generation_prompt=True)
        if not full.startswith(before):
            raise DataError("the chat template renders the prompt differently from the conversation; cannot mask it")
        cuts = [(len(before), len(full))]
    pieces: list[tuple[str, bool]] = []
    position = 0
    for start, end in cuts:
        if start > position:
            pieces.append((full[position:start], False))
        pieces.append((full[start:end], True))
        position = end
    if position < len(full):
        pieces.append((full[position:], False))
    return pieces


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"] if text else []


def encode(
    sample: TextSample, tokenizer: Any, system_prompt: str | None, completion_only: bool
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one whole sample (untruncated).

    Plain text and completions end with the end-of-sequence token so the model learns to stop.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if sample.format == "text":
        ids = _ids(tokenizer, sample.text, special=True) + eos
        return ids, list(ids)
    if sample.format == "prompt_completion":
        prompt = _ids(tokenizer, sample.prompt, special=True)
        completion = _ids(tokenizer, sample.completion) + eos
        ids = prompt + completion
        labels = ([IGNORE_INDEX] * len(prompt) if completion_only else list(prompt)) + completion
        return ids, labels
    ids, labels = [], []
    for text, is_reply in chat_segments(tokenizer, chat_messages(sample.messages, system_prompt)):
        piece = _ids(tokenizer, text)
        ids += piece
        labels += piece if (is_reply or not completion_only) else [IGNORE_INDEX] * len(piece)
    return ids, labels


def generation_prompt(sample: TextSample, tokenizer: Any, system_prompt: str | None) -> tuple[list[int], str] | None:
    """Prompt token ids and reference answer for generation-based metrics, or None for plain text."""
    if sample.format == "prompt_completion":
        return _ids(tokenizer, sample.prompt, special=True), sample.completion
    if sample.format == "chat":
        last = max(i for i, (role, _) in enumerate(sample.messages) if role == "assistant")
        messages = chat_messages(sample.messages[:last], system_prompt)
        return _ids(tokenizer, render(tokenizer, messages, add_generation_prompt=True)), sample.messages[last][1]
    return None


# -- preparing -------------------------------------------------------------------------------------------------------


def tokenize_samples(
    samples: Sequence[TextSample], tokenizer: Any, max_length: int, system_prompt: str | None, completion_only: bool
) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """Encode and truncate every sample; samples with no target token left after truncation are dropped (counted)."""
    items: list[dict[str, list[int]]] = []
    truncated = no_target = tokens = targets = 0
    for sample in samples:
        try:
            ids, labels = encode(sample, tokenizer, system_prompt, completion_only)
        except DataError as exc:
            raise DataError(f"{sample.where}: {exc}") from None
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        # the first token is never predicted, so it cannot be a target
        if not any(label != IGNORE_INDEX for label in labels[1:]):
            no_target += 1
            continue
        tokens += len(ids)
        targets += sum(label != IGNORE_INDEX for label in labels[1:])
        items.append({"input_ids": ids, "labels": labels})
    stats = {
        "samples": len(samples),
        "items": len(items),
        "tokens": tokens,
        "target_tokens": targets,
        "truncated": truncated,
        "dropped_no_target": no_target,
        "max_length": max_length,
    }
    return items, stats


def pack(items: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack items into rows of at most ``max_length`` tokens, first-fit by decreasing length (deterministic)."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i]["input_ids"]), i))
    rows: list[list[int]] = []
    free: list[int] = []
    for index in order:
        length = len(items[index]["input_ids"])
        for r, space in enumerate(free):
            if length <= space:
                rows[r].append(index)
                free[r] -= length
                break
        else:
            rows.append([index])
            free.append(max_length - length)
    packed = []
    for members in rows:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for index in sorted(members):
            ids, labels = items[index]["input_ids"], items[index]["labels"]
            row["input_ids"] += ids
            row["labels"] += [IGNORE_INDEX] + labels[1:]
            row["position_ids"] += list(range(len(ids)))
        packed.append(row)
    return packed


# -- batches and loss ------------------------------------------------------------------------------------------------


def collate_items(items: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded CPU tensors. Packed rows carry ``position_ids`` and no ``attention_mask``: padding forms one more
    segment at the end of the row, which no real token can attend to under the causal mask."""
    import torch

    width = max(len(item["input_ids"]) for item in items)
    packed = "position_ids" in items[0]
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    positions = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"])
        labels[row, :n] = torch.tensor(item["labels"])
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(item["position_ids"])
            positions[row, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = mask
    return batch


@lru_cache(maxsize=32)
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _forward_inputs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """The model's keyword arguments for ``batch``, the mask of positions that predict a target, and the targets."""
    labels = batch["labels"]
    keep = labels.new_zeros(labels.shape, dtype=bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    inputs: dict[str, Any] = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    # with a cache, transformers builds a plain causal mask and ignores the packed position ids
    inputs["use_cache"] = False
    if _accepts_logits_to_keep(type(unwrap(model))):
        inputs["logits_to_keep"] = keep
    return inputs, keep, labels[:, 1:][keep[:, :-1]]


def target_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a target token, the targets, and each position's row and column.

    Only those positions go through the output head (``logits_to_keep`` with a boolean mask), which saves the largest
    activation of a small LM's step when loss is taken on completions only.
    """
    inputs, keep, targets = _forward_inputs(model, batch)
    logits = model(**inputs).logits
    if logits.dim() == 3:
        logits = logits[keep]
    return logits, targets, keep.nonzero()


def mean_loss(model: Any, batch: dict[str, torch.Tensor], fused: bool = False) -> torch.Tensor:
    """Mean cross-entropy over every target token of the batch.

    With ``fused`` (and a plain linear output head), the head and the loss are computed together chunk by chunk
    (:func:`polyadapt.peft_run.fused_head_loss`): the target positions' logits are never held all at once. Callers
    check with :func:`fused_loss_matches` that the model applies its head to the hidden states and nothing after it
    (no logit soft-capping or scaling).
    """
    import torch.nn.functional as F

    head = plain_linear_head(model) if fused else None
    if head is None:
        logits, targets, _ = target_logits(model, batch)
        return F.cross_entropy(logits.float(), targets)
    inputs, keep, targets = _forward_inputs(model, batch)
    # with logits_to_keep the model returns only the kept positions; without it, select them from every position
    select = None if "logits_to_keep" in inputs else keep
    return fused_head_loss(model, head, targets, select=select, **inputs)


def fused_loss_matches(model: Any, vocab_size: int, tolerance: float = 1e-4) -> tuple[bool, float]:
    """Whether the fused head + loss gives the model's own loss on a short random sequence (eval mode, no grad).

    Returns ``(matches, relative_gap)``; false for models without a plain linear head or that transform the logits
    after it.
    """
    import torch

    if plain_linear_head(model) is None:
        return False, float("inf")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, 9), generator=generator)
    device = next(model.parameters()).device
    batch = {"input_ids": ids.to(device), "labels": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    with evaluating(model):
        plain = mean_loss(model, batch).item()
        fused = mean_loss(model, batch, fused=True).item()
    gap = abs(plain - fused) / max(1.0, abs(plain))
    return gap <= tolerance, gap


def packing_isolated(model: Any, vocab_size: int, tolerance: float = 1e-4) -> tuple[bool, float]:
    """Whether the model keeps packed samples apart when given restarted ``position_ids`` and no attention mask.

    Runs two short random sequences packed in one row and alone, in eval mode and without a cache (as in training),
    and compares the second sequence's logits. Returns ``(isolated, max_abs_gap)``.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab_size, (1, 7), generator=generator)
    b = torch.randint(0, vocab_size, (1, 5), generator=generator)
    device = next(model.parameters()).device
    with evaluating(model):
        alone = model(input_ids=b.to(device), use_cache=False).logits
        row = torch.cat([a, b], dim=1).to(device)
        positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0).to(device)
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[:, 7:]
    gap = (alone.float() - packed.float()).abs().max().item()
    return gap <= tolerance * max(1.0, alone.abs().max().item()), gap
