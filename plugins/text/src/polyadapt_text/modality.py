"""The text modality: PEFT adaptation of causal language models on JSONL text, instruction or chat data."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from polyadapt.errors import ConfigError
from polyadapt.modality import DatasetSplits, EvalResult, Modality, ModalitySettings, ModelBundle, PreparedSplit

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


class TextModality(Modality):
    """Causal language models (any ``AutoModelForCausalLM``) on text, prompt-completion or chat JSONL."""

    name = "text"
    description = "causal language models: continued pretraining, instruction and chat tuning (LoRA, DoRA, IA3, prefix)"
    settings_model = TextSettings
    primary_metric = "eval_loss"
    metric_directions: ClassVar[dict[str, bool]] = {
        "perplexity": False,
        "exact_match": True,
        "token_f1": True,
        "fact_accuracy": True,
    }

    # -- model -------------------------------------------------------------------------------------------------------
    def load_base(self, ctx: RunContext) -> ModelBundle:
        from .model import load_base_bundle

        return load_base_bundle(ctx)

    def default_target_modules(self, bundle: ModelBundle, ctx: RunContext) -> list[str]:
        from .model import auto_target_modules

        return auto_target_modules(bundle.model)

    def add_adapter(self, bundle: ModelBundle, ctx: RunContext) -> None:
        from .model import attach_adapter

        if ctx.config.peft.method == "prefix" and ctx.settings.packing:
            raise ConfigError("text.packing: not supported with peft.method 'prefix' (the prefix spans the whole row)")
        attach_adapter(bundle, ctx, self.resolve_target_modules(bundle, ctx))

    def save_adapter(self, bundle: ModelBundle, directory: Path) -> None:
        from .model import save_adapter_dir

        save_adapter_dir(bundle.model, directory)

    def load_adapter(self, bundle: ModelBundle, directory: Path, ctx: RunContext) -> None:
        from .model import load_adapter_dir

        load_adapter_dir(bundle, directory)

    # -- data --------------------------------------------------------------------------------------------------------
    def load_data(self, config: AdaptConfig, path: Path) -> DatasetSplits:
        from .data import load_text_dataset

        settings = config.settings or TextSettings()
        return load_text_dataset(
            path,
            fmt=settings.format,
            holdout=config.data.holdout,
            seed=config.train.seed,
            drop_duplicates=settings.drop_duplicates,
        )

    def prepare(self, bundle: ModelBundle, samples: Sequence[Any], ctx: RunContext, training: bool) -> PreparedSplit:
        from .batching import fused_loss_matches, pack, packing_isolated, tokenize_samples

        settings = ctx.settings
        vocab = bundle.model.get_input_embeddings().num_embeddings
        if "fused_loss" not in bundle.components:
            bundle.components["fused_loss"] = settings.fused_loss and fused_loss_matches(bundle.model, vocab)[0]
        items, stats = tokenize_samples(
            samples, bundle.processor, settings.max_length, settings.system_prompt, settings.completion_only_loss
        )
        stats["fused_loss"] = bundle.components["fused_loss"]
        if training and settings.packing and items:
            isolated, gap = packing_isolated(bundle.model, vocab)
            if not isolated:
                attn = getattr(bundle.model.config, "_attn_implementation", "?")
                raise ConfigError(
                    f"text.packing: {type(bundle.model).__name__} with attention {attn!r} lets packed samples see each "
                    f"other (logit gap {gap:.3g}); set text.packing: false or text.attn_implementation: sdpa"
                )
            rows = pack(items, settings.max_length)
            stats["packed_rows"] = len(rows)
            stats["packing_efficiency"] = round(stats["tokens"] / (len(rows) * settings.max_length), 4) if rows else 0.0
            items = rows
        return PreparedSplit(items=items, lengths=[len(i["input_ids"]) for i in items], stats=stats)

    def collate(self, bundle: ModelBundle, items: Sequence[Any], training: bool) -> dict[str, Any]:
        from .batching import collate_items

        return collate_items(items, bundle.processor.pad_token_id)

    def compute_loss(self, bundle: ModelBundle, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        from .batching import mean_loss

        return mean_loss(model, batch, fused=bundle.components.get("fused_loss", False))

    def loss_weight(self, batch: dict[str, Any]) -> float:
        """Target tokens in the batch: the held-out loss is a per-token mean, so perplexity is exact."""
        from .batching import IGNORE

        return float((batch["labels"][:, 1:] != IGNORE).sum())

    # -- evaluation and serving --------------------------------------------------------------------------------------
    def evaluate(
        self, bundle: ModelBundle, samples: Sequence[Any], ctx: RunContext, eval_loss: float | None
    ) -> EvalResult:
        from .batching import generation_prompt
        from .generation import generate
        from .metrics import answer_metrics, perplexity, score_example

        metrics: dict[str, float] = {}
        if eval_loss is not None:
            metrics["perplexity"] = perplexity(eval_loss)
        settings = ctx.settings
        tokenizer = bundle.processor
        asked: list[tuple[TextSample, list[int], str]] = []
        for sample in samples:
            found = generation_prompt(sample, tokenizer, settings.system_prompt)
            if found is not None:
                asked.append((sample, *found))
        examples: list[dict[str, Any]] = []
        if settings.generate_eval and asked:
            batch = ctx.config.eval.batch_size or ctx.config.train.batch_size
            answers = generate(bundle.model, tokenizer, [ids for _, ids, _ in asked], settings.max_new_tokens, batch)
            for (sample, _, reference), answer in zip(asked, answers, strict=True):
                question = sample.prompt if sample.format == "prompt_completion" else _last_user(sample)
                examples.append(score_example(question, reference, answer, sample.answer_contains))
            metrics.update(answer_metrics(examples))
        return EvalResult(metrics=metrics, examples=examples)

    def infer_params(self) -> list[click.Parameter]:
        import click

        return [
            click.Option(
                ["--prompt"], required=True, help="The user message (or raw prompt for models without a chat template)."
            ),
            click.Option(["--system"], default=None, help="System message (default: the run's text.system_prompt)."),
            click.Option(
                ["--max-new-tokens"], type=click.IntRange(1), default=None, help="Default: text.max_new_tokens."
            ),
            click.Option(
                ["--temperature"], type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy."
            ),
            click.Option(["--top-p"], type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True),
            click.Option(["--seed"], type=int, default=0, show_default=True, help="Sampling seed."),
        ]

    def infer(self, bundle: ModelBundle, ctx: RunContext, options: dict[str, Any]) -> list[str]:
        from .batching import chat_messages, render
        from .generation import generate

        tokenizer = bundle.processor
        system = options.get("system") or ctx.settings.system_prompt
        if tokenizer.chat_template:
            text = render(tokenizer, chat_messages([("user", options["prompt"])], system), add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(((system + "\n") if system else "") + options["prompt"])["input_ids"]
        answer = generate(
            bundle.model,
            tokenizer,
            [ids],
            options.get("max_new_tokens") or ctx.settings.max_new_tokens,
            temperature=options.get("temperature") or 0.0,
            top_p=options.get("top_p") or 1.0,
            seed=options.get("seed"),
        )[0]
        return answer.splitlines() or [""]

    def report_sections(self, before: EvalResult | None, after: EvalResult, run_dir: Path) -> list[tuple[str, str]]:
        if not after.examples:
            return []
        previous = {e["prompt"]: e for e in (before.examples if before else [])}
        rows = []
        for example in after.examples[:5]:
            old = previous.get(example["prompt"], {})
            cells = [example["prompt"], example["reference"], old.get("prediction", "—"), example["prediction"]]
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        table = (
            "<table><thead><tr><th>question</th><th>reference</th><th>base</th><th>adapted</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
        return [("Sample answers: base vs adapted", table)]


def _last_user(sample: TextSample) -> str:
    last = max(i for i, (role, _) in enumerate(sample.messages) if role == "assistant")
    users = [content for role, content in sample.messages[:last] if role == "user"]
    return users[-1] if users else ""
