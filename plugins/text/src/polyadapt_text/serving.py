"""Serving text: continuous batching of generation, every row with its own LoRA adapter, in one forward pass.

:class:`TextBackend` keeps one running batch on the base: a KV cache (transformers' ``DynamicCache``), a left-padded
attention mask and each row's next position. New requests are prefilled as a batch of their own (left padding,
attention mask, position ids counted from each row's first real token: what ``generate`` does) and then joined to
the running batch between two decoding steps, their cache left-padded to the running width; finished rows leave at
once, and cache columns that only padding uses are dropped. Each forward pass runs inside
peft's mixed-adapter batch: row *i* uses its own adapter (``None``: the base), exactly as ``run.adapter_batch`` and
peft's ``adapter_names`` do; the pre-forward hooks that pass the rows' adapter names to the LoRA layers stay installed
while the batch runs (re-installed after each attach or detach) instead of being added and removed at every step.

Greedy rows take the argmax of the last position's logits in float32, as ``generate`` does, so temperature 0 gives
what vanilla transformers + PEFT ``generate`` gives for the same ids; a row's answer does not depend on the rows
beside it (padding is masked, positions are per row). Sampled rows draw from their own generator (``seed``).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyadapt.errors import ConfigError
from polyadapt.serve.backend import (
    AdapterVersion,
    BackendContext,
    Generated,
    GenerationBackend,
    GenerationOptions,
    Job,
    RequestProblem,
    TextDelta,
)

if TYPE_CHECKING:
    import torch

    from .modality import TextRun


@dataclass(frozen=True)
class TextSpec:
    """One completion to generate: prompt ids and decoding options."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: the retrieved chunks the prompt numbers [1]..[n] (a grounded request; see :mod:`polyadapt_text.grounding`)
    excerpts: tuple[Any, ...] = ()


@dataclass(eq=False)
class _Row:
    job: Job
    spec: TextSpec
    generator: Any = None
    tokens: list[int] = field(default_factory=list)
    sent: str = ""


class TextBackend(GenerationBackend):
    """The text modality's serving backend (see the module docstring)."""

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.run: TextRun = context.run
        self.tokenizer = self.run.tokenizer
        #: the tokenizer is used from request threads (encoding) and the worker (decoding)
        self.lock = threading.Lock()
        config = self.run.base_model.config
        self.context_length = int(
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
            or self.tokenizer.model_max_length
        )  # fmt: skip
        stops: set[int] = set()
        for token in (
            self.tokenizer.eos_token_id,
            getattr(self.run.base_model.generation_config, "eos_token_id", None),
        ):
            if token is not None:
                stops.update(token if isinstance(token, list) else [token])
        self.stop_ids = sorted(stops)
        self.pad_id = self.tokenizer.pad_token_id
        self.rows_: list[_Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        import inspect

        parameters = inspect.signature(self.run.base_model.forward).parameters
        self.keep_logits = "logits_to_keep" in parameters
        #: the adapter name of each row of the next forward pass, read by the LoRA layers' pre-forward hooks
        self.row_names: list[str] = []
        self._hooks: list[Any] = []
        self._hooked: Any = None
        #: transformers renamed the forward argument ``past_key_values`` to ``cache``
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"

    # -- requests (request threads) ----------------------------------------------------------------------------------
    def completion_spec(self, prompt: str, adapter: AdapterVersion | None, options: GenerationOptions) -> TextSpec:
        kept: list[Any] = []
        with self.lock:
            if options.excerpts:
                from .grounding import fit_excerpts

                prompt, kept = fit_excerpts(
                    prompt, options.excerpts, lambda text: len(self.tokenizer(text)["input_ids"]),
                    self._prompt_budget(adapter, options), self.tokenizer,
                )  # fmt: skip
            ids = self.tokenizer(prompt)["input_ids"]
        return self._spec(ids, adapter, options, "prompt", kept)

    def chat_spec(
        self, messages: list[tuple[str, str]], adapter: AdapterVersion | None, options: GenerationOptions
    ) -> TextSpec:
        from .batching import chat_messages

        settings = self.settings_of(adapter)
        template = _template(settings.chat_template) or self.tokenizer.chat_template
        if not template:
            raise RequestProblem("this model has no chat template; use /v1/completions", param="messages")

        def render(asked: list[tuple[str, str]]) -> list[int]:
            text = self.tokenizer.apply_chat_template(
                chat_messages(asked, settings.system_prompt), tokenize=False, add_generation_prompt=True,
                chat_template=template,
            )  # fmt: skip
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        kept: list[Any] = []
        with self.lock:
            turn = next((i for i in range(len(messages) - 1, -1, -1) if messages[i][0] == "user"), None)
            if options.excerpts and turn is not None:
                from .grounding import fit_excerpts

                def grounded(message: str) -> list[tuple[str, str]]:
                    return [*messages[:turn], ("user", message), *messages[turn + 1 :]]

                message, kept = fit_excerpts(
                    messages[turn][1], options.excerpts, lambda m: len(render(grounded(m))),
                    self._prompt_budget(adapter, options), self.tokenizer,
                )  # fmt: skip
                messages = grounded(message)
            ids = render(messages)
        return self._spec(ids, adapter, options, "messages", kept)

    def sources(self, spec: TextSpec, text: str) -> tuple[str, list[dict[str, Any]]]:
        """The answer with ``Sources:`` and a ``[n] citation`` line per excerpt after it, and the excerpts as dicts
        (each marked ``cited`` when the answer cites its number)."""
        from .grounding import format_sources, sources_of

        if not spec.excerpts:
            return text, []
        found = sources_of(text, spec.excerpts)
        return text.rstrip() + "\n\n" + "\n".join(format_sources(found)), [s.as_dict() for s in found]

    def _prompt_budget(self, adapter: AdapterVersion | None, options: GenerationOptions) -> int:
        """Tokens a grounded prompt may take: the context less what the completion may add."""
        return self.context_length - (options.max_tokens or min(self.settings_of(adapter).max_new_tokens,
                                                                 self.limits.max_tokens))  # fmt: skip

    def settings_of(self, adapter: AdapterVersion | None) -> Any:
        """The ``text:`` settings that decide how a request is asked: the adapter's run's, else the base entry's."""
        return adapter.settings if adapter is not None else self.context.config.settings

    def _spec(
        self, ids: list[int], adapter: AdapterVersion | None, options: GenerationOptions, param: str,
        excerpts: Sequence[Any] = (),
    ) -> TextSpec:  # fmt: skip
        limit = options.max_tokens or min(self.settings_of(adapter).max_new_tokens, self.limits.max_tokens)
        if not ids:
            raise RequestProblem("the prompt is empty (no tokens)", param=param)
        if len(ids) + limit > self.context_length:
            raise RequestProblem(
                f"This model's maximum context length is {self.context_length} tokens; the prompt has {len(ids)} "
                f"and {limit} more were asked for ({len(ids) + limit}). Shorten the prompt or lower max_tokens.",
                param=param, code="context_length_exceeded",
            )  # fmt: skip
        return TextSpec(
            prompt_ids=list(ids), max_tokens=limit, temperature=options.temperature, top_p=options.top_p,
            seed=options.seed, stop=tuple(options.stop), excerpts=tuple(excerpts),
        )  # fmt: skip

    # -- adapters ----------------------------------------------------------------------------------------------------
    def attach(self, version: AdapterVersion) -> None:
        from polyadapt.peft_run import quiet_library_warnings

        self._unhook()
        with quiet_library_warnings():
            super().attach(version)
        self.run.check_adapter_batch([version.slot])

    def detach(self, slot: str) -> None:
        self._unhook()
        super().detach(slot)

    # -- scheduling (worker thread) ----------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self.rows_)

    def rows(self) -> int:
        return len(self.rows_)

    def room(self) -> int:
        if self.rows_ and not self._joinable():
            return 0
        return max(0, self.limits.max_batch - len(self.rows_))

    def admit(self, jobs: Sequence[Job]) -> None:
        import torch

        rows = [_Row(job=j, spec=j.spec, generator=_generator(j.spec)) for j in jobs]
        width = max(len(r.spec.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            prompt = row.spec.prompt_ids
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        device = self.run.ctx.device
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        logits, cache = self._forward(ids, mask, positions, None, [j.slot for j in jobs])
        tokens = self._choose(rows, logits)
        keep = [i for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)) if self._record(row, token)]
        if not keep:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            rows, mask, tokens = [rows[i] for i in keep], mask[index], tokens[index]
        lengths = torch.tensor([len(r.spec.prompt_ids) for r in rows], device=device)
        self._join(rows, cache, mask, lengths, tokens)

    def step(self) -> None:
        import torch

        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits, cache = self._forward(
            self.last[:, None], mask, self.positions[:, None], self.cache, [r.job.slot for r in self.rows_]
        )
        self.cache, self.mask = cache, mask
        self.positions = self.positions + 1
        tokens = self._choose(self.rows_, logits)
        self.last = tokens
        self._advance(tokens)

    def fail_all(self, error: BaseException) -> None:
        for row in self.rows_:
            row.job.fail(error)
        self._reset()

    def close(self) -> None:
        self.fail_all(RuntimeError("the server stopped"))

    # -- internals ---------------------------------------------------------------------------------------------------
    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any, slots: list[str | None]) -> tuple[Any, Any]:
        import torch

        model = self.run.model
        self._rows(model, slots)
        extra = {"logits_to_keep": 1} if self.keep_logits else {}
        extra[self.cache_arg] = cache
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        returned = getattr(out, "cache", None) if self.cache_arg == "cache" else out.past_key_values
        return out.logits[:, -1, :].to(dtype=torch.float32), returned

    def _rows(self, model: Any, slots: list[str | None]) -> None:
        """Row *i* of the next forward pass uses adapter ``slots[i]`` (``None``: the base)."""
        from polyadapt.peft_run import BASE_ROW

        if not hasattr(model, "peft_config"):
            return  # no adapter attached: every row is the base
        if self._hooked is not model:
            self._hook(model)
        self.row_names[:] = [BASE_ROW if slot is None else slot for slot in slots]

    def _hook(self, model: Any) -> None:
        from functools import partial

        from peft.tuners.lora.layer import LoraLayer
        from peft.tuners.lora.model import _adapter_names_pre_forward_hook
        from peft.utils import AuxiliaryTrainingWrapper

        self._unhook()
        hook = partial(_adapter_names_pre_forward_hook, adapter_names=self.row_names)
        for module in model.modules():
            if isinstance(module, LoraLayer | AuxiliaryTrainingWrapper):
                self._hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        self._hooked = model

    def _unhook(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._hooked = [], None

    def _choose(self, rows: Sequence[_Row], logits: Any) -> Any:

        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row.spec.temperature > 0:
                tokens[i] = _sample(logits[i], row.spec.temperature, row.spec.top_p, row.generator)
        return tokens

    def _join(self, rows: list[_Row], cache: Any, mask: Any, positions: Any, tokens: Any) -> None:
        """Make the prefilled ``rows`` part of the running batch."""
        import torch

        if not self.rows_:
            self.rows_, self.cache, self.mask, self.positions, self.last = rows, cache, mask, positions, tokens
            return
        width = max(self.mask.shape[1], mask.shape[1])
        _pad_cache(self.cache, width)
        _pad_cache(cache, width)
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([old.keys, new.keys], dim=0)
            old.values = torch.cat([old.values, new.values], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)], dim=0)
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, tokens])
        self.rows_ = self.rows_ + rows

    def _advance(self, tokens: Any) -> None:
        """Record each running row's new token; drop the rows that finished from the batch."""
        import torch

        chosen = tokens.tolist()
        keep = [i for i, (row, token) in enumerate(zip(self.rows_, chosen, strict=True)) if self._record(row, token)]
        if len(keep) == len(self.rows_):
            return
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        self.rows_ = [self.rows_[i] for i in keep]
        self._trim()

    def _record(self, row: _Row, token: int) -> bool:
        """Append ``token`` to ``row``: stream what is new, finish the row when it is done; False once finished."""
        if row.job.cancelled.is_set():
            row.job.fail(ConnectionAbortedError("the client went away"))
            return False
        row.tokens.append(int(token))
        finish = None
        if token in self.stop_ids:
            finish = "stop"
        elif len(row.tokens) >= row.spec.max_tokens:
            finish = "length"
        text = None
        if row.spec.stop or row.job.on_event is not None or finish:
            text = self._decode(row.tokens)
            cut = _first_stop(text, row.spec.stop)
            if cut is not None:
                text, finish = text[:cut], "stop"
        if finish is None:
            if row.job.on_event is not None:
                self._emit(row, text, hold=max((len(s) for s in row.spec.stop), default=1) - 1)
            return True
        if row.job.on_event is not None:
            self._emit(row, text, hold=0)
        row.job.finish(Generated(text=text, finish_reason=finish, prompt_tokens=len(row.spec.prompt_ids),
                                 completion_tokens=len(row.tokens)))  # fmt: skip
        return False

    def _trim(self) -> None:
        """Drop the leading cache columns no remaining row attends to."""
        if not self._joinable():
            return
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start <= 0:
            return
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, start:, :]
            layer.values = layer.values[:, :, start:, :]

    def _joinable(self) -> bool:
        """Whether the running cache is one whose rows can be joined and trimmed (plain dynamic layers)."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = self.cache
        return cache is None or (
            isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)
        )

    def _decode(self, tokens: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @staticmethod
    def _emit(row: _Row, text: str | None, hold: int) -> None:
        if text is None:
            return
        safe = text[: len(text) - hold] if hold else text
        if safe.endswith("\ufffd"):  # half of a multi-byte character
            return
        if safe.startswith(row.sent) and len(safe) > len(row.sent):
            row.job.emit(TextDelta(safe[len(row.sent) :]))
            row.sent = safe

    def _reset(self) -> None:
        self.rows_, self.cache, self.mask, self.positions, self.last = [], None, None, None, None


def _generator(spec: TextSpec) -> Any:
    if spec.temperature <= 0:
        return None
    import torch

    return torch.Generator().manual_seed(spec.seed if spec.seed is not None else random.randrange(2**63))


def _sample(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    import torch

    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered > top_p
        ordered[outside] = 0.0
        choice = torch.multinomial(ordered / ordered.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _pad_left(tensor: Any, width: int) -> Any:
    import torch

    missing = width - tensor.shape[1]
    if missing <= 0:
        return tensor
    return torch.cat([torch.zeros((tensor.shape[0], missing), dtype=tensor.dtype, device=tensor.device), tensor], 1)


def _pad_cache(cache: Any, width: int) -> None:
    import torch

    for layer in cache.layers:
        missing = width - layer.keys.shape[2]
        if missing > 0:
            shape = (*layer.keys.shape[:2], missing, layer.keys.shape[3])
            layer.keys = torch.cat([layer.keys.new_zeros(shape), layer.keys], dim=2)
            shape = (*layer.values.shape[:2], missing, layer.values.shape[3])
            layer.values = torch.cat([layer.values.new_zeros(shape), layer.values], dim=2)


def _template(value: str | None) -> str | None:
    """``text.chat_template`` of a run: a Jinja string, or a file (read when it is still there)."""
    if not value:
        return None
    if "{" in value:
        return value
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise RequestProblem(f"the adapter's chat template file {value} is gone", status=400)


def make_backend(context: BackendContext) -> TextBackend:
    return TextBackend(context)


__all__ = ["ConfigError", "TextBackend", "TextSpec", "make_backend"]
