"""Generation: batched for evaluation (greedy) and for ``polyadapt infer`` (greedy or sampled), with one adapter for
the whole batch or a different adapter per row, and the prompt ``infer`` builds from its options."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from polyadapt.errors import ConfigError

if TYPE_CHECKING:
    import click

    from .modality import TextRun


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

    Prompts are left-padded so every row's new tokens start at the same column. ``temperature == 0`` is greedy. The
    model is used in the mode it is in: polyadapt calls evaluation and inference inside
    :func:`polyadapt.evaluation.evaluating`, which puts it in eval mode and restores it after.
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
    outputs: list[str] = []
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
    return outputs


def generate_per_row(
    run: TextRun,
    prompts: Sequence[list[int]],
    adapters: Sequence[str | None],
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """:func:`generate` where prompt ``i`` is answered by adapter ``adapters[i]`` (``None``: the base model), all in
    the same batches: each batch runs inside ``run.adapter_batch`` with its rows' adapter names."""
    if len(adapters) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompt(s) but {len(adapters)} adapter name(s); give one per prompt")
    run.check_adapter_batch(adapters)  # before any batch is generated
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        with run.adapter_batch(list(adapters[rows])):
            outputs += generate(
                run.model, run.tokenizer, prompts[rows], max_new_tokens, batch_size, temperature, top_p,
                seed if start == 0 else None,
            )  # fmt: skip
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


def infer_params() -> list[click.Parameter]:
    """The options of ``polyadapt infer RUN_DIR`` for a text run."""
    import click

    return [
        click.Option(
            ["--prompt"], required=True, help="The user message (or raw prompt for models without a chat template)."
        ),
        click.Option(["--system"], default=None, help="System message (default: the run's text.system_prompt)."),
        click.Option(["--max-new-tokens"], type=click.IntRange(1), default=None, help="Default: text.max_new_tokens."),
        click.Option(["--temperature"], type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy."),
        click.Option(["--top-p"], type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True),
        click.Option(["--seed"], type=int, default=0, show_default=True, help="Sampling seed."),
        click.Option(
            ["--retrieve"],
            metavar="INDEX",
            default=None,
            help="Ground the answer in chunks of INDEX (a directory or NAME@REF): they go into the prompt, numbered, "
            "and the sources are printed after the answer.",
        ),  # fmt: skip
        click.Option(
            ["--top-k"],
            type=click.IntRange(1, 64),
            default=None,
            help="Chunks retrieved with --retrieve (default: text.retrieval.top_k, else 4).",
        ),  # fmt: skip
    ]


def prompt_ids(tokenizer: Any, prompt: str, system: str | None) -> list[int]:
    """Token ids of a user message as the model is asked it: through the chat template when the tokenizer has one,
    else the raw text (after the system message, if any)."""
    from .batching import chat_messages, render

    if tokenizer.chat_template:
        text = render(tokenizer, chat_messages([("user", prompt)], system), add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(((system + "\n") if system else "") + prompt)["input_ids"]
