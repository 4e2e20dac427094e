"""The text modality: PEFT adaptation of causal language models on JSONL text, instruction or chat data.

:class:`TextModality` is the stateless factory polyadapt registers; :class:`TextRun` is one run, holding the model,
its tokenizer and what the run decided about them (whether the loss fuses the output head) as attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class RetrievalSettings(BaseModel):
    """``text.retrieval``: train and evaluate with retrieved excerpts in every question's prompt (RAFT).

    Each training chat's question turn is built (:mod:`polyadapt_text.grounding`) with the chunk holding the answer
    (the golden one) and ``distractors`` other retrieved chunks, in an order drawn per sample from ``train.seed``; with
    probability ``drop_golden`` the golden chunk is left out, so the adapter also learns to answer when retrieval
    missed. Held-out questions get the ``top_k`` chunks retrieved for them, as at inference.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: str = Field(description="The index: a directory made by `polyadapt index build`, or NAME@REF (registry).")
    top_k: int = Field(4, ge=1, le=64, description="Chunks retrieved per held-out question (and at inference).")
    distractors: int = Field(3, ge=0, le=64, description="Retrieved chunks without the answer in each training prompt.")
    drop_golden: float = Field(
        0.2, ge=0.0, le=1.0, description="Probability that a training prompt leaves the golden chunk out (RAFT)."
    )
    cite: bool = Field(True, description="Append the golden chunk's citation [n] to the training answer.")


class TextSettings(ModalitySettings):
    """The ``text:`` section of a config."""

    format: Literal["auto", "text", "prompt_completion", "chat", "preference"] = Field(
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
    retrieval: RetrievalSettings | None = Field(
        None,
        description="Retrieved excerpts in training and held-out prompts: {index, top_k, distractors, "
        "drop_golden, cite} (see RetrievalSettings).",
    )
    objective: Literal["sft", "dpo", "ipo", "orpo", "simpo"] = Field(
        "sft",
        description="sft: next-token loss on text, prompt-completion or chat records; dpo, ipo, orpo, simpo: "
        "preference tuning on {prompt, chosen, rejected} pairs (polyadapt_text.preference).",
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="Preference objectives: DPO's beta, IPO's tau, ORPO's lambda, SimPO's beta; unset: "
        "0.1 (dpo, ipo, orpo, as TRL) or 2.0 (simpo, as the SimPO paper).",
    )
    simpo_gamma: float | None = Field(
        None, ge=0, description="SimPO's target reward margin gamma (TRL's name); unset with simpo: 0.5 (TRL)."
    )
    sft_weight: float | None = Field(
        None,
        ge=0,
        description="dpo, ipo: add this weight times the chosen answers' NLL (mean over their tokens) to the loss, as "
        "TRL's loss_type ['sigmoid', 'sft'] with loss_weights [1, w] (RPO); unset: none.",
    )

    @model_validator(mode="before")
    @classmethod
    def _objective_defaults(cls, data: Any) -> Any:
        from .preference import DEFAULT_BETA, DEFAULT_SIMPO_GAMMA

        if isinstance(data, dict) and data.get("objective") in DEFAULT_BETA:
            data = dict(data)
            if data.get("beta") is None:
                data["beta"] = DEFAULT_BETA[data["objective"]]
            if data["objective"] == "simpo" and data.get("simpo_gamma") is None:
                data["simpo_gamma"] = DEFAULT_SIMPO_GAMMA
        return data


class TextRun(PeftRun):
    """One text run: ``model`` (the causal LM, PEFT-wrapped once an adapter is attached) and its ``tokenizer``."""

    peft_task_type = "CAUSAL_LM"

    def __init__(self, modality: Modality, ctx: RunContext) -> None:
        super().__init__(modality, ctx)
        self.settings: TextSettings = ctx.settings
        self.tokenizer: Any = None
        #: whether the loss fuses the output head (decided once, at the first ``prepare``, by a check on the model)
        self.fused_loss: bool | None = None
        #: the ``text.retrieval`` index, opened at the first grounded prompt
        self.index: Any = None
        #: grounded samples already built, by (file, line, training): ``prepare`` and ``evaluate`` see the same ones
        self._grounded: dict[tuple[str, int, bool], Any] = {}
        from .preference import ReferenceCache

        #: preference objectives: reference log-probabilities by pair, computed once per pair when a split is prepared
        self.reference = ReferenceCache()
        #: prepared pair items by pair key, and the held-out prompts with their compliance rules (read once)
        self.pair_items: dict[str, dict[str, Any]] = {}
        self.risky_prompts: list[Any] | None = None

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
        from .preference import is_preference, prepare_preference

        if is_preference(samples):
            return prepare_preference(self, samples, training)
        settings = self.settings
        if self.fused_loss is None:
            self.fused_loss = settings.fused_loss and fused_loss_matches(self.model, self.vocab_size)[0]
        samples, grounding = self.grounded(samples, training)
        items, stats = tokenize_samples(
            samples, self.tokenizer, settings.max_length, settings.system_prompt, settings.completion_only_loss
        )
        stats["fused_loss"] = self.fused_loss
        if grounding is not None:
            stats["retrieval"] = grounding
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
        from .preference import collate_pairs

        if items and "chosen_ids" in items[0]:
            return collate_pairs(items, self.tokenizer.pad_token_id)
        return collate_items(items, self.tokenizer.pad_token_id)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        from .batching import mean_loss
        from .preference import pair_loss

        if "target_tokens" in batch:
            return pair_loss(model, batch, self.settings, fused=bool(self.fused_loss))
        return mean_loss(model, batch, fused=bool(self.fused_loss))

    def loss_weight(self, batch: dict[str, Any]) -> float:
        """Target tokens in the batch: the held-out loss is a per-token mean, so perplexity is exact. A batch of
        preference pairs weighs its number of pairs (the objectives are means over pairs)."""
        from polyadapt.losses import IGNORE_INDEX

        if "target_tokens" in batch:
            return float(batch["target_tokens"].shape[0])
        return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    # -- evaluation --------------------------------------------------------------------------------------------------
    def evaluate(self, samples: Sequence[Any], eval_loss: float | None) -> EvalResult:
        from .batching import generation_prompt
        from .metrics import answer_metrics, perplexity, score_example
        from .preference import evaluate_preference, is_preference

        if is_preference(samples):
            return evaluate_preference(self, samples)
        metrics: dict[str, float] = {}
        if eval_loss is not None:
            metrics["perplexity"] = perplexity(eval_loss)
        settings = self.settings
        samples, _ = self.grounded(samples, False)
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

    # -- retrieval ---------------------------------------------------------------------------------------------------
    def open_index(self, reference: str | None = None) -> Any:
        """The index ``reference`` names (default: ``text.retrieval.index``, opened once)."""
        from .grounding import open_retrieval_index

        if reference is not None:
            return open_retrieval_index(reference, "--retrieve")
        if self.index is None:
            self.index = open_retrieval_index(self.settings.retrieval.index, "text.retrieval.index")
        return self.index

    def grounded(self, samples: Sequence[Any], training: bool) -> tuple[list[Any], dict[str, Any] | None]:
        """With ``text.retrieval``: the samples with their question turns grounded in retrieved excerpts (RAFT
        prompts when ``training``), and what was done; without: the samples unchanged and None."""
        from .batching import encode
        from .grounding import ground_samples

        retrieval = self.settings.retrieval
        if retrieval is None:
            return list(samples), None
        settings = self.settings
        todo = [s for s in samples if (s.source, s.line, training) not in self._grounded]
        if todo:

            def count(sample: TextSample) -> int:
                return len(encode(sample, self.tokenizer, settings.system_prompt, settings.completion_only_loss)[0])

            built = ground_samples(
                todo, self.open_index(), retrieval, training=training, seed=self.ctx.config.train.seed, count=count,
                budget=settings.max_length, tokenizer=self.tokenizer,
            )  # fmt: skip
            for old, new in zip(todo, built, strict=True):
                self._grounded[(old.source, old.line, training)] = new
        done = [self._grounded[(s.source, s.line, training)] for s in samples]
        infos = [info for _, info in done if info is not None]
        documents = (getattr(self.open_index(), "manifest", None) or {}).get("documents") or {}
        stats: dict[str, Any] = {
            "index": retrieval.index, "documents_fingerprint": documents.get("fingerprint"), "grounded": len(infos),
            "excerpts": sum(i.excerpts for i in infos),
        }  # fmt: skip
        if training:
            stats.update(
                with_golden=sum(i.golden is not None for i in infos), golden_dropped=sum(i.dropped for i in infos),
                golden_not_found=sum(i.golden is None and not i.dropped for i in infos),
                distractors=retrieval.distractors, drop_golden=retrieval.drop_golden, seed=self.ctx.config.train.seed,
            )  # fmt: skip
        return [sample for sample, _ in done], stats

    def answer_questions(
        self, questions: Sequence[str], excerpts: Sequence[Sequence[Any]] | None = None
    ) -> list[tuple[str, list[Any]]]:
        """Greedy answers to ``questions`` asked as at inference, each grounded in its ``excerpts`` when given
        (cut to ``text.max_length`` tokens); with each answer, the excerpts its prompt numbered ``[1]..[n]``."""
        from .grounding import grounded_prompt
        from .inference import prompt_ids

        system = self.settings.system_prompt
        prompts: list[list[int]] = []
        kept: list[list[Any]] = []
        for i, question in enumerate(questions):
            if excerpts is None:
                prompts.append(prompt_ids(self.tokenizer, question, system))
                kept.append([])
            else:
                ids, used = grounded_prompt(self.tokenizer, question, excerpts[i], system, self.settings.max_length)
                prompts.append(ids)
                kept.append(used)
        answers = self.generate(prompts) if prompts else []
        return list(zip(answers, kept, strict=True))

    def grounded_eval(self, questions: Sequence[Any], excerpts: Sequence[Sequence[Any]] | None = None) -> EvalResult:
        """Answer and score held-out ``questions`` (``question``, ``reference``, ``facts``, ``source``), grounded in
        ``excerpts`` when given: fact accuracy, token F1 and exact match on the answer without its citation markers,
        and (with excerpts) citation accuracy: the share of answers citing an excerpt that holds the answer."""
        from .grounding import holds_answer, parse_citations, same_source, strip_citations
        from .metrics import answer_metrics, score_example

        answered = self.answer_questions([q.question for q in questions], excerpts)
        examples = []
        for question, (answer, used) in zip(questions, answered, strict=True):
            record = score_example(question.question, question.reference, strip_citations(answer), question.facts)
            record["answer"] = answer
            if excerpts is not None:
                cited = parse_citations(answer, len(used))
                record["citations"] = [used[n - 1].citation for n in cited]
                record["cited_ok"] = float(any(
                    holds_answer(used[n - 1], question.facts)
                    or (not question.facts and same_source(used[n - 1], question.source))
                    for n in cited
                ))  # fmt: skip
            examples.append(record)
        metrics = answer_metrics(examples)
        if excerpts is not None and examples:
            metrics["citation_accuracy"] = sum(e["cited_ok"] for e in examples) / len(examples)
        return EvalResult(metrics=metrics, examples=examples)

    def report_sections(self, before: EvalResult | None, after: EvalResult, run_dir: Path) -> list[tuple[str, str]]:
        from .report import answer_table, compliance_table

        if after.examples and "complies" in after.examples[0]:
            return compliance_table(before, after)
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
        from .grounding import format_sources, grounded_prompt, sources_of
        from .inference import prompt_ids

        system = options.get("system") or self.settings.system_prompt
        excerpts: list[Any] = []
        if options.get("top_k") and not options.get("retrieve"):
            raise ConfigError("--top-k: only with --retrieve INDEX")
        if options.get("retrieve"):
            index = self.open_index(options["retrieve"])
            top_k = options.get("top_k") or (self.settings.retrieval.top_k if self.settings.retrieval else 4)
            found = index.search(options["prompt"], top_k=top_k)
            ids, excerpts = grounded_prompt(self.tokenizer, options["prompt"], found, system, self.settings.max_length)
        else:
            ids = prompt_ids(self.tokenizer, options["prompt"], system)
        answer = self.generate(
            [ids],
            max_new_tokens=options.get("max_new_tokens"),
            temperature=options.get("temperature") or 0.0,
            top_p=options.get("top_p") or 1.0,
            seed=options.get("seed"),
        )[0]
        lines = answer.splitlines() or [""]
        if excerpts:
            lines += ["", *format_sources(sources_of(answer, excerpts))]
        return lines


class TextModality(Modality):
    """Causal language models (any ``AutoModelForCausalLM``) on text, prompt-completion or chat JSONL."""

    name = "text"
    description = "causal language models: continued pretraining, instruction and chat tuning (LoRA, DoRA, IA3, prefix)"
    settings_model = TextSettings
    primary_metric = "eval_loss"
    headline_metrics = ("preference_accuracy", "fact_accuracy", "token_f1", "eval_loss")
    metrics: ClassVar[dict[str, bool]] = {
        "perplexity": False,
        "exact_match": True,
        "token_f1": True,
        "fact_accuracy": True,
        "preference_accuracy": True,
        "reward_accuracy": True,
        "reward_margin": True,
        "chosen_logp": True,
        "rejected_logp": False,
        "compliance": True,
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
        from .preference import check_dataset

        found = read_text_dataset(ctx.path, fmt=ctx.settings.format, drop_duplicates=ctx.settings.drop_duplicates)
        return found if ctx.general else check_dataset(found, ctx)

    def check_config(self, config: AdaptConfig) -> list[str]:
        from .preference import validate_settings

        problems = validate_settings(config.settings)
        if config.settings.packing and config.peft.method == "prefix":
            problems.append("text.packing: not supported with peft.method 'prefix' (the prefix spans the whole row)")
        if config.settings.retrieval is not None and config.settings.objective != "sft":
            problems.append(
                f"text.retrieval: grounds chat prompts for objective sft only, not {config.settings.objective!r}"
            )
        return problems

    def heldout_questions(self, samples: Sequence[TextSample]) -> list[dict[str, Any]]:
        """Held-out chat and prompt-completion samples as questions (``question``, ``reference``, ``facts``, ``id``,
        ``where``) for ``polyadapt evaluate --retrieve``; plain text samples ask nothing and are left out."""
        questions = []
        for sample in samples:
            if sample.format not in ("chat", "prompt_completion"):
                continue
            if sample.format == "prompt_completion":
                question, reference = sample.prompt, sample.completion
            else:
                question = _last_user(sample)
                reference = next(c for r, c in reversed(sample.messages) if r == "assistant")
            questions.append({"question": question, "reference": reference, "facts": sample.answer_contains,
                              "id": sample.id, "where": sample.where})  # fmt: skip
        return questions

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
