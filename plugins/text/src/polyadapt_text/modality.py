"""The text modality: PEFT adaptation of causal language models on JSONL text, instruction or chat data.

:class:`TextModality` is the stateless factory polyadapt registers; :class:`TextRun` is one run, holding the model,
its tokenizer and what the run decided about them (whether the loss fuses the output head) as attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from polyadapt.defaults import TrainingRule
from polyadapt.errors import ConfigError
from polyadapt.modality import DataContext, DataFound, EvalResult, Modality, ModalitySettings, PreparedSplit
from polyadapt.peft_run import PeftRun

from .data import LAYOUT

if TYPE_CHECKING:
    import click
    import torch

    from polyadapt.config import AdaptConfig
    from polyadapt.modality import RunContext

    from .data import TextSample


class TextSettings(ModalitySettings):
    """The ``text:`` section of a config."""

    format: Literal["auto", "text", "prompt_completion", "chat"] = Field(
        "auto", description="Record format of every file; auto detects it per file from the first record's keys."
    )
    max_length: int = Field(1024, ge=8, description="Tokens per sample (and per packed row); longer samples are cut.")
    packing: bool = Field(False, description="Pack several training samples per row (isolated from each other).")
    completion_only_loss: bool = Field(
        True, description="Loss on completion / assistant tokens only (prompt-completion and chat data)."
    )
    drop_duplicates: bool = Field(True, description="Drop exact and near-duplicate training records.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per held-out question for answer metrics.")
    generate_eval: bool = Field(True, description="Score generated answers (exact match, token F1, fact accuracy).")
    system_prompt: str | None = Field(None, description="System message added to chats that have none.")
    chat_template: str | None = Field(None, description="Jinja chat template (or a .jinja file) replacing the base's.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = Field(
        None, description="Attention kernel; default: transformers' choice for the model."
    )
    fused_loss: bool = Field(
        True,
        description="Compute the output head and the loss together in chunks (never all target logits at once); "
        "used when a check shows it gives the model's own loss.",
    )
    merge_tolerance: float = Field(
        1e-3, gt=0, description="merged export: largest allowed |logit| gap between merged and base+adapter (fp32)."
    )


class TextRun(PeftRun):
    """One text run: ``model`` (the causal LM, PEFT-wrapped once an adapter is attached) and its ``tokenizer``."""

    peft_task_type = "CAUSAL_LM"

    def __init__(self, modality: Modality, ctx: RunContext) -> None:
        super().__init__(modality, ctx)
        self.settings: TextSettings = ctx.settings
        self.tokenizer: Any = None
        #: whether the loss fuses the output head (decided once, at the first ``prepare``, by a check on the model)
        self.fused_loss: bool | None = None

    # -- model -------------------------------------------------------------------------------------------------------
    def load_base(self) -> None:
        from .model import load_causal_lm

        self.model, self.tokenizer, self.info = load_causal_lm(self.ctx)

    def target_modules(self) -> list[str]:
        from .model import auto_target_modules

        return auto_target_modules(self.base_model)

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    # -- data --------------------------------------------------------------------------------------------------------
    def prepare(self, samples: Sequence[Any], training: bool) -> PreparedSplit:
        from .batching import fused_loss_matches, pack, packing_isolated, tokenize_samples

        settings = self.settings
        if self.fused_loss is None:
            self.fused_loss = settings.fused_loss and fused_loss_matches(self.model, self.vocab_size)[0]
        items, stats = tokenize_samples(
            samples, self.tokenizer, settings.max_length, settings.system_prompt, settings.completion_only_loss
        )
        stats["fused_loss"] = self.fused_loss
        if training and settings.packing and items:
            isolated, gap = packing_isolated(self.model, self.vocab_size)
            if not isolated:
                attn = getattr(self.base_model.config, "_attn_implementation", "?")
                raise ConfigError(
                    f"text.packing: {type(self.base_model).__name__} with attention {attn!r} lets packed samples see "
                    f"each other (logit gap {gap:.3g}); set text.packing: false or text.attn_implementation: sdpa"
                )
            rows = pack(items, settings.max_length)
            stats["packed_rows"] = len(rows)
            stats["packing_efficiency"] = round(stats["tokens"] / (len(rows) * settings.max_length), 4) if rows else 0.0
            items = rows
        return PreparedSplit(items=items, lengths=[len(i["input_ids"]) for i in items], stats=stats)

    def collate(self, items: Sequence[Any], training: bool) -> dict[str, Any]:
        from .batching import collate_items

        return collate_items(items, self.tokenizer.pad_token_id)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        from .batching import mean_loss

        return mean_loss(model, batch, fused=bool(self.fused_loss))

    def loss_weight(self, batch: dict[str, Any]) -> float:
        """Target tokens in the batch: the held-out loss is a per-token mean, so perplexity is exact."""
        from polyadapt.losses import IGNORE_INDEX

        return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    # -- evaluation --------------------------------------------------------------------------------------------------
    def evaluate(self, samples: Sequence[Any], eval_loss: float | None) -> EvalResult:
        from .batching import generation_prompt
        from .metrics import answer_metrics, perplexity, score_example

        metrics: dict[str, float] = {}
        if eval_loss is not None:
            metrics["perplexity"] = perplexity(eval_loss)
        settings = self.settings
        asked: list[tuple[TextSample, list[int], str]] = []
        for sample in samples:
            found = generation_prompt(sample, self.tokenizer, settings.system_prompt)
            if found is not None:
                asked.append((sample, *found))
        examples: list[dict[str, Any]] = []
        if settings.generate_eval and asked:
            answers = self.generate([ids for _, ids, _ in asked])
            for (sample, _, reference), answer in zip(asked, answers, strict=True):
                question = sample.prompt if sample.format == "prompt_completion" else _last_user(sample)
                examples.append(score_example(question, reference, answer, sample.answer_contains))
            metrics.update(answer_metrics(examples))
        return EvalResult(metrics=metrics, examples=examples)

    def report_sections(self, before: EvalResult | None, after: EvalResult, run_dir: Path) -> list[tuple[str, str]]:
        from .report import answer_table

        return answer_table(before, after)

    # -- inference ---------------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[list[int]],
        adapters: Sequence[str | None] | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[str]:
        """The decoded answers to ``prompts`` (token ids), in batches of ``eval.batch_size``. With ``adapters``, row
        ``i`` is answered by adapter ``adapters[i]`` (``None``: the base) in the same batches; without, by the active
        adapter. Call it inside :func:`polyadapt.evaluation.evaluating` (polyadapt does, around evaluate and infer)."""
        from .inference import generate, generate_per_row

        config = self.ctx.config
        batch = config.eval.batch_size or config.train.batch_size
        tokens = max_new_tokens or self.settings.max_new_tokens
        if adapters is not None:
            return generate_per_row(self, prompts, adapters, tokens, batch, temperature, top_p, seed)
        return generate(self.model, self.tokenizer, prompts, tokens, batch, temperature, top_p, seed)

    def infer(self, options: dict[str, Any]) -> list[str]:
        from .inference import prompt_ids

        system = options.get("system") or self.settings.system_prompt
        answer = self.generate(
            [prompt_ids(self.tokenizer, options["prompt"], system)],
            max_new_tokens=options.get("max_new_tokens"),
            temperature=options.get("temperature") or 0.0,
            top_p=options.get("top_p") or 1.0,
            seed=options.get("seed"),
        )[0]
        return answer.splitlines() or [""]


class TextModality(Modality):
    """Causal language models (any ``AutoModelForCausalLM``) on text, prompt-completion or chat JSONL."""

    name = "text"
    description = "causal language models: continued pretraining, instruction and chat tuning (LoRA, DoRA, IA3, prefix)"
    settings_model = TextSettings
    primary_metric = "eval_loss"
    headline_metrics = ("fact_accuracy", "token_f1", "eval_loss")
    metrics: ClassVar[dict[str, bool]] = {
        "perplexity": False,
        "exact_match": True,
        "token_f1": True,
        "fact_accuracy": True,
    }
    peft_methods = ("lora", "dora", "ia3", "prefix")
    capabilities = frozenset({"inference", "report", "multi_adapter", "batched_adapters"})
    #: LoRA at 1e-3 is what SmolLM2-135M needs to learn facts; at least 150 steps, loss-driven (generating answers
    #: at every periodic evaluation costs more than the steps between them on a CPU)
    training_rule = TrainingRule(
        reference_lr=1e-3, reference_params=135e6, min_steps=150, amount="tokens", max_amount=20e6
    )
    data_layout = LAYOUT
    run_class = TextRun

    def read_data(self, ctx: DataContext) -> DataFound:
        from .data import read_text_dataset

        return read_text_dataset(ctx.path, fmt=ctx.settings.format, drop_duplicates=ctx.settings.drop_duplicates)

    def check_config(self, config: AdaptConfig) -> list[str]:
        if config.settings.packing and config.peft.method == "prefix":
            return ["text.packing: not supported with peft.method 'prefix' (the prefix spans the whole row)"]
        return []

    def infer_params(self) -> list[click.Parameter]:
        from .inference import infer_params

        return infer_params()

    def usage(self, run_dir: Path, base: str) -> str:
        from .report import usage_snippet

        return usage_snippet(run_dir, base)


def _last_user(sample: TextSample) -> str:
    last = max(i for i, (role, _) in enumerate(sample.messages) if role == "assistant")
    users = [content for role, content in sample.messages[:last] if role == "user"]
    return users[-1] if users else ""
