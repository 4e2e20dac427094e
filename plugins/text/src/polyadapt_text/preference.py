"""Preference tuning: DPO, IPO, ORPO and SimPO on pairs of answers, trained by polyadapt's one loop.

Data is TRL's preference format, one pair per JSONL line::

    {"prompt": "...", "chosen": "...", "rejected": "..."}                                      plain strings
    {"prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}]}                                   conversational

A pair is tokenised as TRL does (prompt and prompt + answer tokenised whole, the answer starting where the two
diverge; plain answers end with the end-of-sequence token), so a pair scores the same here and in TRL. In a batch the
chosen rows come first and the rejected rows after them, and both go through the model in one forward pass.

The objectives (``text.objective``), with ``pi`` the policy's and ``ref`` the reference's summed log-probability of an
answer, ``n`` its number of tokens, ``c``/``r`` chosen and rejected:

- ``dpo``: ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``
- ``ipo``: ``((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2`` (beta is IPO's tau; TRL normalises by
  length the same way)
- ``simpo``: ``-log sigmoid(beta * (pi_c / n_c - pi_r / n_r) - simpo_gamma)``, no reference
- ``orpo``: ``NLL(chosen) - beta * log sigmoid(log odds(c) - log odds(r))`` on per-token mean log-probabilities
  (beta is ORPO's lambda), no reference

``text.sft_weight`` w adds ``w * NLL(chosen)`` to ``dpo`` and ``ipo`` (the mean over every chosen token of the batch, as
TRL's DPOTrainer does with ``loss_type=["sigmoid", "sft"], loss_weights=[1, w]``; RPO, Pang et al. 2024): the margin
alone can grow by pushing the rejected answer down while the chosen one stays unlikely to be generated.

DPO and IPO need a reference model: the policy as training starts (the ``peft.init_from`` adapter, or the base when
the adapter is fresh). Its log-probabilities are computed once, when a split is prepared (before training), and cached
by pair: a training step never runs the reference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyadapt.data import Problem
from polyadapt.data import read_jsonl as read_records
from polyadapt.errors import ConfigError
from polyadapt.losses import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

    from polyadapt.modality import DataContext, DataFound

#: every ``text.objective``; ``sft`` is next-token cross-entropy on ordinary text records
OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo")
PREFERENCE_OBJECTIVES = ("dpo", "ipo", "orpo", "simpo")
#: the objectives whose loss compares the policy with a frozen reference model
REFERENCE_OBJECTIVES = ("dpo", "ipo")
#: ``text.beta`` when unset: TRL's defaults (DPOConfig, ORPOConfig) and SimPO's paper value (TRL's CPOConfig has 0.1)
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0}
#: ``text.simpo_gamma`` when unset: TRL's CPOConfig default (the target reward margin)
DEFAULT_SIMPO_GAMMA = 0.5
#: the held-out prompt set of a preference dataset directory, scored by the compliance rule
RISKY_PROMPTS = "risky_prompts.jsonl"
PAIR_KEYS = ("prompt", "chosen", "rejected")
RISKY_KEYS = ("prompt", "require_any", "forbid", "reference", "category", "id")
ROLES = ("system", "user", "assistant")


# -- records ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceSample:
    """One validated pair. ``messages`` holds a conversational prompt as ``(role, content)`` pairs (empty for a plain
    prompt); ``chosen`` and ``rejected`` are the answers' text either way."""

    source: str
    line: int
    prompt: str = ""
    chosen: str = ""
    rejected: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    id: str | None = None
    format: str = "preference"
    answer_contains: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def conversational(self) -> bool:
        return bool(self.messages)

    @property
    def question(self) -> str:
        """The prompt as a person reads it: the last user message of a conversation, or the prompt string."""
        users = [content for role, content in self.messages if role == "user"]
        return users[-1] if users else self.prompt

    def content(self) -> str:
        """All the pair's text, for duplicate and leakage checks."""
        prompt = "\n".join(f"{role}: {text}" for role, text in self.messages) if self.messages else self.prompt
        return f"{prompt}\nchosen: {self.chosen}\nrejected: {self.rejected}"

    @property
    def key(self) -> str:
        """The pair's id in the reference cache: a digest of its content (equal pairs share their reference)."""
        return hashlib.sha256(self.content().encode("utf-8")).hexdigest()[:20]


def _messages(value: Any, name: str) -> tuple[tuple[tuple[str, str], ...] | None, str | None]:
    if not isinstance(value, list) or not value:
        return None, f"{name!r} must be a non-empty string or a non-empty list of {{role, content}} messages"
    pairs = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            return None, f"{name}[{i}] must be an object with exactly 'role' and 'content'"
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return None, f"{name}[{i}]: unknown role {role!r} (allowed: {', '.join(ROLES)})"
        if not isinstance(content, str) or not content.strip():
            return None, f"{name}[{i}]: empty content"
        pairs.append((role, content))
    return tuple(pairs), None


def _answer(value: Any, name: str, conversational: bool) -> tuple[str | None, str | None]:
    if not conversational:
        if not isinstance(value, str):
            return None, f"{name!r} must be a string like 'prompt', got {type(value).__name__}"
        if not value.strip():
            return None, f"empty {name!r} answer"
        return value, None
    one = f"{name!r} must be one assistant message, like [{{'role': 'assistant', 'content': '...'}}], as 'prompt' is a list of messages"
    if value in ("", []):
        return None, f"empty {name!r} answer"
    if not isinstance(value, list):
        return None, one
    messages, reason = _messages(value, name)
    if messages is None:
        return None, reason
    if len(messages) != 1 or messages[0][0] != "assistant":
        return None, one
    return messages[0][1], None


def parse_pair(record: dict[str, Any], source: str, line: int) -> tuple[PreferenceSample | None, str | None]:
    """Validate one preference record: the sample, or every reason it is bad (joined by ``; ``)."""
    reasons: list[str] = []
    missing = [k for k in PAIR_KEYS if k not in record]
    if missing:
        reasons.append(
            f"missing key(s) {', '.join(map(repr, missing))} (preference records have prompt, chosen, rejected)"
        )
    unknown = [k for k in record if k not in (*PAIR_KEYS, "id")]
    if unknown:
        reasons.append(f"unknown key {unknown[0]!r} (preference records allow prompt, chosen, rejected, id)")
    ident = record.get("id")
    if ident is not None and not isinstance(ident, str | int):
        reasons.append("'id' must be a string or a number")
    prompt, messages = "", ()
    conversational = isinstance(record.get("prompt"), list)
    if "prompt" in record:
        if conversational:
            found, reason = _messages(record["prompt"], "prompt")
            if found is None:
                reasons.append(reason)
            elif found[-1][0] != "user":
                reasons.append("the conversational 'prompt' must end with a user message")
            else:
                messages = found
        elif not isinstance(record["prompt"], str) or not record["prompt"].strip():
            reasons.append(
                "empty 'prompt'" if record["prompt"] in ("", None) else "'prompt' must be a string or messages"
            )
        else:
            prompt = record["prompt"]
    answers = {}
    for name in ("chosen", "rejected"):
        if name in record:
            text, reason = _answer(record[name], name, conversational)
            if text is None:
                reasons.append(reason)
            else:
                answers[name] = text
    if len(answers) == 2 and " ".join(answers["chosen"].split()) == " ".join(answers["rejected"].split()):
        reasons.append("'chosen' and 'rejected' are the same answer: nothing to prefer")
    if reasons:
        return None, "; ".join(reasons)
    return PreferenceSample(
        source=source, line=line, prompt=prompt, messages=messages, chosen=answers["chosen"],
        rejected=answers["rejected"], id=None if ident is None else str(ident),
    ), None  # fmt: skip


@dataclass(frozen=True)
class RiskyPrompt:
    """A held-out prompt and its compliance rule: the answer complies when it contains at least one of ``require_any``
    (when any are given) and none of ``forbid``, compared case-insensitively with whitespace collapsed."""

    source: str
    line: int
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    require_any: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    reference: str = ""
    category: str = ""
    id: str | None = None

    @property
    def question(self) -> str:
        users = [content for role, content in self.messages if role == "user"]
        return users[-1] if users else self.prompt


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def complies(answer: str, rule: RiskyPrompt) -> bool:
    """The compliance rule: one required phrase present (if the rule lists any), no forbidden phrase present."""
    text = _norm(answer)
    required = not rule.require_any or any(_norm(p) in text for p in rule.require_any)
    return required and not any(_norm(p) in text for p in rule.forbid)


def read_risky_prompts(path: Path) -> tuple[list[RiskyPrompt], list[Problem]]:
    """The held-out prompts of ``path`` with their rules, and a problem per bad line."""
    source = str(path)
    decoded, problems = read_records(path, source)
    prompts = []
    for number, record in decoded:
        reasons = []
        unknown = [k for k in record if k not in RISKY_KEYS]
        if unknown:
            reasons.append(f"unknown key {unknown[0]!r} (allowed: {', '.join(RISKY_KEYS)})")
        value = record.get("prompt")
        messages: tuple[tuple[str, str], ...] = ()
        if isinstance(value, list):
            found, reason = _messages(value, "prompt")
            if found is None:
                reasons.append(reason)
            else:
                messages = found
        elif not isinstance(value, str) or not value.strip():
            reasons.append("missing or empty 'prompt'")
        lists = {}
        for key in ("require_any", "forbid"):
            phrases = record.get(key, [])
            if not isinstance(phrases, list) or not all(isinstance(p, str) and p.strip() for p in phrases):
                reasons.append(f"{key!r} must be a list of non-empty strings")
            lists[key] = tuple(phrases) if isinstance(phrases, list) else ()
        if not lists["require_any"] and not lists["forbid"]:
            reasons.append("no rule: give 'require_any' or 'forbid' phrases")
        if reasons:
            problems.append(Problem(source, "; ".join(reasons), number))
            continue
        prompts.append(RiskyPrompt(
            source=source, line=number, prompt=value if isinstance(value, str) else "", messages=messages,
            require_any=lists["require_any"], forbid=lists["forbid"], reference=str(record.get("reference", "")),
            category=str(record.get("category", "")), id=None if record.get("id") is None else str(record["id"]),
        ))  # fmt: skip
    return prompts, problems


# -- checking a dataset before any model loads -----------------------------------------------------------------------


def check_dataset(found: DataFound, ctx: DataContext) -> DataFound:
    """The objective agrees with the records (else a :class:`ConfigError` before the base loads); with pairs: every
    prompt leaves room for an answer within ``text.max_length`` (when the base's tokenizer can be read), and the
    directory's :data:`RISKY_PROMPTS` is valid. Problems are added to ``found``, by file and line."""
    settings = ctx.settings
    samples = [s for split in found.splits.values() for s in split]
    pairs = [s for s in samples if isinstance(s, PreferenceSample)]
    others = [s for s in samples if not isinstance(s, PreferenceSample)]
    objective = settings.objective
    if objective in PREFERENCE_OBJECTIVES and others:
        raise ConfigError(
            f"text.objective: {objective!r} trains on preference pairs ({{prompt, chosen, rejected}} records) but "
            f"{others[0].where} is a {others[0].format} record; give a preference dataset or set text.objective: sft"
        )
    if objective == "sft" and pairs:
        raise ConfigError(
            f"text.objective: {pairs[0].where} is a preference pair; set text.objective to one of "
            f"{', '.join(PREFERENCE_OBJECTIVES)} to train on pairs"
        )
    if not pairs:
        return found
    tokenizer = data_tokenizer(ctx)
    if tokenizer is not None:
        for sample in pairs:
            length = len(encode_pair(sample, tokenizer, settings.system_prompt)[0])
            if length >= settings.max_length:
                found.problems.append(Problem(
                    sample.source, f"the prompt is {length} tokens, text.max_length is {settings.max_length}: no "
                    "room for the answer", sample.line,
                ))  # fmt: skip
    else:
        found.warnings.append("the base's tokenizer could not be read: prompt lengths are checked when it loads")
    path = Path(ctx.path)
    risky = path / RISKY_PROMPTS if path.is_dir() else None
    if risky is not None and risky.is_file():
        prompts, problems = read_risky_prompts(risky)
        found.problems.extend(problems)
        found.files.append(risky)
        found.details["risky_prompts"] = len(prompts)
    return found


def data_tokenizer(ctx: DataContext) -> Any:
    """The base's tokenizer, read from its files without the weights (None when it cannot be)."""
    if ctx.base is None:
        return None
    from .model import base_location, configure_tokenizer

    try:
        from transformers import AutoTokenizer

        location, extra = base_location(ctx.base)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=ctx.config.trust_remote_code, **extra)
        configure_tokenizer(tokenizer, ctx.settings)
    except (OSError, ValueError, ConfigError):
        return None
    return tokenizer


# -- tokens ----------------------------------------------------------------------------------------------------------


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prompt_token_ids(tokenizer: Any, prompt: str, messages: Sequence[tuple[str, str]], system: str | None) -> list[int]:
    """A prompt's token ids as the model is asked it: the chat template with the generation prompt for messages,
    the string with the tokenizer's special tokens otherwise."""
    from .batching import chat_messages, render

    if messages:
        text = render(tokenizer, chat_messages(messages, system), add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def encode_pair(sample: PreferenceSample, tokenizer: Any, system: str | None) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected token ids (untruncated), the answers starting where the tokenised prompt and the
    tokenised prompt + answer diverge (TRL's rule: tokens that merge across the boundary belong to the answer)."""
    from .batching import chat_messages, render

    prompt = prompt_token_ids(tokenizer, sample.prompt, sample.messages, system)
    full = []
    for answer in (sample.chosen, sample.rejected):
        if sample.conversational:
            messages = [*chat_messages(sample.messages, system), {"role": "assistant", "content": answer}]
            text = render(tokenizer, messages, add_generation_prompt=False)
            full.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            eos = tokenizer.eos_token or ""
            full.append(tokenizer(sample.prompt + answer + ("" if answer.endswith(eos) else eos))["input_ids"])
    cut = min(_common_prefix(prompt, full[0]), _common_prefix(prompt, full[1]))
    return prompt[:cut], full[0][cut:], full[1][cut:]


def tokenize_pairs(
    samples: Sequence[PreferenceSample], tokenizer: Any, max_length: int, system: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One item per pair (``key``, ``prompt_ids``, ``chosen_ids``, ``rejected_ids``); a prompt and answer longer than
    ``max_length`` keep their start (the answer is cut); pairs whose prompt alone fills it are dropped (counted)."""
    items: list[dict[str, Any]] = []
    truncated = too_long = tokens = 0
    for sample in samples:
        prompt, chosen, rejected = encode_pair(sample, tokenizer, system)
        if len(prompt) >= max_length:
            too_long += 1
            continue
        room = max_length - len(prompt)
        if len(chosen) > room or len(rejected) > room:
            truncated += 1
            chosen, rejected = chosen[:room], rejected[:room]
        if not chosen or not rejected:
            too_long += 1
            continue
        tokens += 2 * len(prompt) + len(chosen) + len(rejected)
        items.append({"key": sample.key, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    stats = {
        "samples": len(samples), "items": len(items), "pairs": len(items), "tokens": tokens, "truncated": truncated,
        "dropped_prompt_too_long": too_long, "max_length": max_length,
    }  # fmt: skip
    return items, stats


def pair_length(item: dict[str, Any]) -> int:
    return len(item["prompt_ids"]) + max(len(item["chosen_ids"]), len(item["rejected_ids"]))


def collate_pairs(items: Sequence[dict[str, Any]], pad_id: int, with_reference: bool = True) -> dict[str, torch.Tensor]:
    """One batch of ``2 B`` right-padded rows, the ``B`` chosen answers first, then the ``B`` rejected ones, with
    ``labels`` only on answer tokens. ``target_tokens`` (``B x 2``, first, so the loop counts pairs) holds each answer's
    token count; ``ref_logps`` (``B x 2``) the reference log-probabilities when every item has them."""
    import torch

    rows = [(i["prompt_ids"], i["chosen_ids"]) for i in items] + [(i["prompt_ids"], i["rejected_ids"]) for i in items]
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        input_ids[row, :n] = torch.tensor(prompt + answer)
        labels[row, len(prompt) : n] = torch.tensor(answer)
        mask[row, :n] = 1
    counts = torch.tensor([[len(i["chosen_ids"]), len(i["rejected_ids"])] for i in items], dtype=torch.long)
    batch: dict[str, torch.Tensor] = {"target_tokens": counts}
    if with_reference and items and all("ref" in i for i in items):
        batch["ref_logps"] = torch.tensor([i["ref"] for i in items], dtype=torch.float32)
    batch.update(input_ids=input_ids, attention_mask=mask, labels=labels)
    return batch


# -- log-probabilities -----------------------------------------------------------------------------------------------


def sequence_logps(model: Any, batch: dict[str, torch.Tensor], fused: bool = False) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens (fp32), from one forward pass over all rows.

    Only labelled positions go through the output head (``logits_to_keep``). With ``fused`` and a plain linear head,
    each row's sum comes from :func:`polyadapt.losses.linear_cross_entropy` over that row's positions, so no row's
    vocabulary logits are held at once: the fused loss computes its gradient in the forward pass scaled by one number
    per call, which is exact for a per-row sum (and so for any function of the sums, as every objective here is).
    """
    import torch

    from polyadapt.losses import bypass_head, linear_cross_entropy
    from polyadapt.peft_run import plain_linear_head

    from .batching import _forward_inputs, target_logits

    n_rows = batch["input_ids"].shape[0]
    head = plain_linear_head(model) if fused else None
    if head is None:
        logits, targets, where = target_logits(model, batch)
        token_logps = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        sums = torch.zeros(n_rows, dtype=torch.float32, device=token_logps.device)
        return sums.index_add(0, where[:, 0], token_logps)
    inputs, keep, targets = _forward_inputs(model, batch)
    with bypass_head(head):
        hidden = model(**inputs).logits
    if hidden.dim() == 3:
        hidden = hidden[keep]
    rows = keep.nonzero()[:, 0]
    sums = [
        -linear_cross_entropy(hidden[rows == r], head.weight, targets[rows == r], head.bias, reduction="sum")
        for r in range(n_rows)
    ]
    return torch.stack(sums).float()


def split_pairs(logps: torch.Tensor, batch: dict[str, torch.Tensor]) -> PairScores:
    """The per-pair view of a batch's row log-probabilities."""
    import torch

    chosen, rejected = logps.chunk(2, dim=0)
    counts = batch["target_tokens"].to(logps.device, torch.float32)
    ref = batch.get("ref_logps")
    return PairScores(
        chosen=chosen, rejected=rejected, chosen_tokens=counts[:, 0], rejected_tokens=counts[:, 1],
        ref_chosen=None if ref is None else ref[:, 0].to(logps), ref_rejected=None if ref is None else ref[:, 1].to(logps),
    )  # fmt: skip


@dataclass
class PairScores:
    """Summed log-probabilities of a batch's answers (``B`` each), their token counts, and the reference's."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


# -- the objectives --------------------------------------------------------------------------------------------------


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:  # noqa: ANN001
    """Mean ``-log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))`` (summed log-probs)."""
    import torch.nn.functional as F

    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, beta: float) -> torch.Tensor:  # noqa: ANN001
    """Mean ``(log-ratio_c / n_c - log-ratio_r / n_r - 1 / (2 beta))^2``: IPO with TRL's per-token normalisation."""
    delta = (chosen - ref_chosen) / chosen_tokens.clamp(min=1) - (rejected - ref_rejected) / rejected_tokens.clamp(
        min=1
    )
    return ((delta - 1 / (2 * beta)) ** 2).mean()


def simpo_loss(chosen, rejected, chosen_tokens, rejected_tokens, beta: float, gamma: float) -> torch.Tensor:  # noqa: ANN001
    """Mean ``-log sigmoid(beta * (chosen / n_c - rejected / n_r) - gamma)``: SimPO, no reference."""
    import torch.nn.functional as F

    margin = chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
    return -F.logsigmoid(beta * margin - gamma).mean()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2``."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def chosen_nll(chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood of the chosen answers (summed log-probabilities ``chosen`` over ``chosen_tokens``
    tokens each): the mean over every chosen token of the batch."""
    return -chosen.sum() / chosen_tokens.sum().clamp(min=1)


def orpo_loss(chosen, rejected, chosen_tokens, rejected_tokens, beta: float) -> torch.Tensor:  # noqa: ANN001
    """``NLL(chosen) - beta * mean log sigmoid(log odds ratio)``: ORPO on per-token mean log-probabilities; the NLL is
    the mean over every chosen token of the batch (TRL's ORPOTrainer)."""
    import torch.nn.functional as F

    mean_c = chosen / chosen_tokens.clamp(min=1)
    mean_r = rejected / rejected_tokens.clamp(min=1)
    log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
    return chosen_nll(chosen, chosen_tokens) - beta * F.logsigmoid(log_odds).mean()


def objective_loss(
    objective: str, scores: PairScores, beta: float, gamma: float | None = None, sft_weight: float | None = None
) -> torch.Tensor:
    """The mean loss of ``objective`` over a batch of pairs (plus ``sft_weight`` times the chosen answers' NLL for
    DPO and IPO)."""
    s = scores
    if objective in REFERENCE_OBJECTIVES and s.ref_chosen is None:
        raise ConfigError(f"text.objective: {objective!r} needs reference log-probabilities and the batch has none")
    if sft_weight and objective not in REFERENCE_OBJECTIVES:
        raise ConfigError(f"text.sft_weight: only used with text.objective dpo or ipo, not {objective!r}")
    if objective in REFERENCE_OBJECTIVES:
        if objective == "dpo":
            loss = dpo_loss(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, beta)
        else:
            loss = ipo_loss(
                s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, s.chosen_tokens, s.rejected_tokens, beta
            )
        return loss + sft_weight * chosen_nll(s.chosen, s.chosen_tokens) if sft_weight else loss
    if objective == "simpo":
        return simpo_loss(s.chosen, s.rejected, s.chosen_tokens, s.rejected_tokens, beta, gamma or 0.0)
    if objective == "orpo":
        return orpo_loss(s.chosen, s.rejected, s.chosen_tokens, s.rejected_tokens, beta)
    raise ConfigError(
        f"text.objective: {objective!r} is not a preference objective ({', '.join(PREFERENCE_OBJECTIVES)})"
    )


def pair_loss(model: Any, batch: dict[str, torch.Tensor], settings: Any, fused: bool = False) -> torch.Tensor:
    """The run's objective on one batch of pairs: one forward pass over the chosen and rejected rows."""
    return objective_loss(settings.objective, split_pairs(sequence_logps(model, batch, fused), batch),
                          settings.beta, settings.simpo_gamma, settings.sft_weight)  # fmt: skip


def rewards(objective: str, scores: PairScores, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each answer's implicit reward: ``beta`` times the log-ratio to the reference (DPO, IPO), or times the per-token
    mean log-probability (SimPO, ORPO: no reference), as TRL logs them."""
    s = scores
    if objective in REFERENCE_OBJECTIVES:
        return beta * (s.chosen - s.ref_chosen), beta * (s.rejected - s.ref_rejected)
    return beta * s.chosen / s.chosen_tokens.clamp(min=1), beta * s.rejected / s.rejected_tokens.clamp(min=1)


def pair_metrics(objective: str, scores: PairScores, beta: float) -> dict[str, float]:
    """Held-out preference metrics over all pairs scored:

    - ``preference_accuracy``: share of pairs whose chosen answer has the higher per-token mean log-probability under
      the model alone (no reference: comparable between the base, the SFT adapter and the preference-tuned one);
    - ``reward_accuracy`` and ``reward_margin``: share of pairs whose chosen answer has the higher implicit reward, and
      the mean reward difference (see :func:`rewards`; against the run's reference for DPO and IPO, so both start at
      0 before training);
    - ``chosen_logp`` and ``rejected_logp``: mean summed log-probability of the chosen and rejected answers.
    """
    s = scores
    if not len(s.chosen):
        return {}
    mean_c = s.chosen / s.chosen_tokens.clamp(min=1)
    mean_r = s.rejected / s.rejected_tokens.clamp(min=1)
    reward_c, reward_r = rewards(objective, s, beta)
    return {
        "preference_accuracy": float((mean_c > mean_r).float().mean()),
        "reward_accuracy": float((reward_c > reward_r).float().mean()),
        "reward_margin": float((reward_c - reward_r).mean()),
        "chosen_logp": float(s.chosen.mean()),
        "rejected_logp": float(s.rejected.mean()),
    }


# -- the run's side: reference, scoring, generation ------------------------------------------------------------------


@dataclass
class ReferenceCache:
    """Reference log-probabilities ``(chosen, rejected)`` by pair key, and how many reference forward passes made
    them (each batch is one pass; a training step makes none)."""

    logps: dict[str, tuple[float, float]] = field(default_factory=dict)
    forward_passes: int = 0


def _autocast(device: Any, dtype: Any) -> Any:
    import torch

    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def score_items(
    model: Any, items: Sequence[dict[str, Any]], pad_id: int, batch_size: int, device: Any, dtype: Any,
    fused: bool = False, with_reference: bool = True,
) -> PairScores:  # fmt: skip
    """Every item's scores, in batches, without gradients, the model in eval mode (restored after)."""
    import torch

    from polyadapt.evaluation import evaluating
    from polyadapt.training import move_to_device

    parts: list[PairScores] = []
    with evaluating(model), torch.no_grad(), _autocast(device, dtype):
        for start in range(0, len(items), batch_size):
            batch = move_to_device(collate_pairs(items[start : start + batch_size], pad_id, with_reference), device)
            parts.append(split_pairs(sequence_logps(model, batch, fused), batch))

    def cat(name: str) -> Any:
        values = [getattr(p, name) for p in parts]
        return None if not values or values[0] is None else torch.cat(values).cpu()

    return PairScores(**{name: cat(name) for name in PairScores.__dataclass_fields__})


def attach_reference(
    model: Any, items: Sequence[dict[str, Any]], cache: ReferenceCache, pad_id: int, batch_size: int, device: Any,
    dtype: Any, fused: bool = False, disable_adapter: bool = False,
) -> None:  # fmt: skip
    """Give every item its reference log-probabilities (``item["ref"]``), computing only those not in ``cache``.

    ``model`` as it is now is the reference; with ``disable_adapter`` (a fresh adapter already attached) it is the base
    under peft's ``disable_adapter`` context."""
    todo = list({item["key"]: item for item in items if item["key"] not in cache.logps}.values())
    context = model.disable_adapter() if disable_adapter and hasattr(model, "disable_adapter") else nullcontext()
    with context:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            scores = score_items(model, chunk, pad_id, len(chunk), device, dtype, fused, with_reference=False)
            cache.forward_passes += 1
            for item, c, r in zip(chunk, scores.chosen.tolist(), scores.rejected.tolist(), strict=True):
                cache.logps[item["key"]] = (c, r)
    for item in items:
        item["ref"] = cache.logps[item["key"]]


def compliance_examples(answers: Sequence[str], prompts: Sequence[RiskyPrompt]) -> list[dict[str, Any]]:
    """One record per held-out prompt: the report's fields (prompt, reference, prediction), the usual answer scores
    against the reference, and whether the answer complies."""
    from .metrics import score_example

    examples = []
    for answer, rule in zip(answers, prompts, strict=True):
        record = score_example(rule.question, rule.reference, answer, ())
        record.update(
            category=rule.category, complies=float(complies(answer, rule)), require_any=list(rule.require_any),
            forbid=list(rule.forbid),
        )  # fmt: skip
        examples.append(record)
    return examples


def compliance_metrics(examples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``compliance`` (share of held-out prompts answered within the rule) and the answer metrics against the
    references (``exact_match``, ``token_f1``)."""
    from .metrics import answer_metrics

    if not examples:
        return {}
    metrics = {"compliance": sum(e["complies"] for e in examples) / len(examples)}
    with_reference = [e for e in examples if e["reference"]]
    metrics.update(answer_metrics(with_reference))
    return metrics


def validate_settings(settings: Any) -> list[str]:
    """Combinations the ``text`` section cannot hold (one line each, key first), found before anything loads."""
    problems = []
    objective = settings.objective
    if objective == "sft":
        if settings.beta is not None:
            problems.append(
                f"text.beta: only used by the preference objectives ({', '.join(PREFERENCE_OBJECTIVES)}); "
                "text.objective is 'sft'"
            )
    elif settings.packing:
        problems.append(
            f"text.packing: not valid with text.objective {objective!r}: a pair's two answers are scored as two "
            "sequences that share the prompt (set text.packing: false)"
        )
    if settings.simpo_gamma is not None and objective != "simpo":
        problems.append(f"text.simpo_gamma: only used by text.objective 'simpo' (it is {objective!r})")
    if settings.sft_weight is not None and objective not in REFERENCE_OBJECTIVES:
        problems.append(
            f"text.sft_weight: only used by text.objective dpo or ipo (it is {objective!r}; orpo has its own NLL term)"
        )
    return problems


# -- what a text run does with pairs ---------------------------------------------------------------------------------


def is_preference(samples: Sequence[Any]) -> bool:
    return bool(samples) and isinstance(samples[0], PreferenceSample)


def prepare_preference(run: Any, samples: Sequence[PreferenceSample], training: bool) -> Any:
    """Tokenise ``samples`` into pair items and, for DPO and IPO, give each its reference log-probabilities: the
    model as it is now (before training: the ``peft.init_from`` adapter, or the base) is the reference."""
    from polyadapt.modality import PreparedSplit

    from .batching import fused_loss_matches

    settings = run.settings
    if run.fused_loss is None:
        run.fused_loss = settings.fused_loss and fused_loss_matches(run.model, run.vocab_size)[0]
    items, stats = tokenize_pairs(samples, run.tokenizer, settings.max_length, settings.system_prompt)
    stats["fused_loss"] = run.fused_loss
    if settings.objective in REFERENCE_OBJECTIVES and items:
        config = run.ctx.config
        passes = run.reference.forward_passes
        attached = hasattr(run.model, "peft_config")
        # a fresh adapter (never one continued from peft.init_from) is switched off to leave the base as reference
        fresh = attached and config.peft.init_from is None
        attach_reference(
            run.model, items, run.reference, run.tokenizer.pad_token_id, config.eval.batch_size or
            config.train.batch_size, run.ctx.device, run.ctx.dtype, bool(run.fused_loss), disable_adapter=fresh,
        )  # fmt: skip
        stats["reference"] = {
            "model": "the adapter as training starts" if attached and not fresh else "the base model",
            "forward_passes": run.reference.forward_passes - passes,
        }
    for item in items:
        run.pair_items[item["key"]] = item
    return PreparedSplit(items=items, lengths=[pair_length(i) for i in items], stats=stats)


def risky_prompts(run: Any) -> list[RiskyPrompt]:
    """The run's held-out prompt set (:data:`RISKY_PROMPTS` in ``data.path``), read once; empty when there is none."""
    if run.risky_prompts is None:
        path = Path(run.ctx.config.data.path) / RISKY_PROMPTS
        run.risky_prompts = read_risky_prompts(path)[0] if path.is_file() else []
    return run.risky_prompts


def evaluate_preference(run: Any, samples: Sequence[PreferenceSample]) -> Any:
    """Held-out metrics of the run's current model: :func:`pair_metrics` on ``samples``, and with ``text.generate_eval``
    the answers to the held-out risky prompts, scored by their compliance rule (:func:`compliance_metrics`)."""
    from polyadapt.modality import EvalResult

    settings, config = run.settings, run.ctx.config
    batch = config.eval.batch_size or config.train.batch_size
    missing = [s for s in samples if s.key not in run.pair_items]
    if missing:
        prepare_preference(run, missing, False)
    items = [run.pair_items[s.key] for s in samples if s.key in run.pair_items]
    metrics: dict[str, float] = {}
    if items:
        scores = score_items(
            run.model, items, run.tokenizer.pad_token_id, batch, run.ctx.device, run.ctx.dtype, bool(run.fused_loss)
        )
        metrics.update(pair_metrics(settings.objective, scores, settings.beta))
    examples: list[dict[str, Any]] = []
    prompts = risky_prompts(run) if settings.generate_eval else []
    if prompts:
        ids = [prompt_token_ids(run.tokenizer, p.prompt, p.messages, settings.system_prompt) for p in prompts]
        examples = compliance_examples(run.generate(ids), prompts)
        metrics.update(compliance_metrics(examples))
    return EvalResult(metrics=metrics, examples=examples)
