"""The speech modality: Whisper adapted with PEFT for domain transcription."""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from polyadapt.errors import ConfigError, DataError
from polyadapt.modality import (
    DatasetSplits,
    EvalResult,
    Modality,
    ModalitySettings,
    ModelBundle,
    PreparedSplit,
    RunContext,
)

if TYPE_CHECKING:
    import click
    import torch

    from polyadapt.config import AdaptConfig

#: clips shown in report.html with reference / base / adapted transcripts
REPORT_CLIPS = 5


class SpeechSettings(ModalitySettings):
    """The ``speech:`` section of a config."""

    language: str | None = Field(
        None,
        description="Language code of the audio (multilingual models), e.g. 'en', 'de'. None: the metadata's "
        "'language' column per clip, else English. English-only (.en) models take no language token.",
    )
    task: Literal["transcribe", "translate"] = Field(
        "transcribe", description="Whisper task token (multilingual models)."
    )
    adapter_scope: Literal["both", "encoder", "decoder"] = Field(
        "both", description="With peft.target_modules 'auto': adapt encoder and decoder, or only one of them."
    )
    features_on_device: bool = Field(
        True, description="Compute log-mel features with torch on the training device (else on the CPU in collate)."
    )
    specaugment: bool = Field(False, description="SpecAugment (frequency and time masking) on training batches.")
    freq_mask_bins: int = Field(27, ge=1, le=80, description="SpecAugment: widest frequency mask, in mel bins.")
    time_mask_frames: int = Field(100, ge=1, le=3000, description="SpecAugment: widest time mask, in 10 ms frames.")
    spec_masks: int = Field(2, ge=1, le=10, description="SpecAugment: frequency+time mask pairs per clip.")
    speed_perturb: bool = Field(False, description="Random speed perturbation of training clips.")
    speed_factors: tuple[float, ...] = Field((0.9, 1.0, 1.1), description="Speed factors drawn from, uniformly.")
    prompt_glossary: bool = Field(
        False, description="Give the decoder glossary.txt's terms as a previous-text prompt (training and decoding)."
    )
    max_label_length: int = Field(
        225, ge=1, le=440, description="Longest transcription in tokens; longer clips are bad samples."
    )
    pack_clips: bool = Field(
        False,
        description="Training only: join short clips (and their transcripts) into windows of up to 30 s, so one "
        "encoder pass serves several clips. Held-out clips are always scored one by one.",
    )
    pack_gap_seconds: float = Field(0.4, ge=0, le=2, description="Silence between packed clips.")
    long_form: bool = Field(
        False, description="Accept held-out/inference clips longer than 30 s (transcribed in chunks and stitched)."
    )
    num_beams: int = Field(1, ge=1, le=16, description="Beam size for evaluation and inference (1 = greedy).")
    encoder_cache_mib: int = Field(
        1024,
        ge=0,
        description="With a frozen encoder (adapter_scope: decoder, no SpecAugment/speed perturbation) keep encoder "
        "outputs of up to this many MiB of clips on the device, so each clip is encoded once per run; 0 disables.",
    )
    merge_tolerance: float = Field(
        1e-3, gt=0, description="Merged/ct2 export: largest allowed logit gap between merged and base+adapter."
    )
    max_new_tokens: int = Field(128, ge=1, le=440, description="Longest generated transcript per 30 s window.")

    @field_validator("speed_factors")
    @classmethod
    def _positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0.5 <= f <= 2.0 for f in value):
            raise ValueError(f"{list(value)} is invalid: give one or more factors between 0.5 and 2.0")
        return value


@lru_cache(maxsize=8)
def _glossary(path: str) -> tuple[str, ...]:
    from .data import read_glossary

    file = Path(path) / "glossary.txt"
    return tuple(read_glossary(file)) if file.is_file() else ()


def glossary_for(config: AdaptConfig) -> list[str]:
    """The glossary terms of the run's dataset (``glossary.txt`` next to the split folders), possibly empty."""
    return list(_glossary(str(Path(config.data.path).resolve())))


def _local_tokenizer(config: AdaptConfig) -> Any:
    """The base's tokenizer when it is available locally (exact label lengths in ``doctor``), else None."""
    try:
        from polyadapt.plugins import get_plugin_manager

        resolved = get_plugin_manager().hook.resolve_base(reference=config.base)
    except Exception:  # noqa: BLE001 - an unresolvable base is reported by the run itself, not by doctor
        return None
    path = getattr(resolved, "path", None)
    if path is None or not Path(path).is_dir():
        return None
    if not any((Path(path) / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        return None
    from .model import load_tokenizer

    try:
        return load_tokenizer(Path(path))
    except ConfigError:
        return None


def pack_samples(
    samples: Sequence[Any], gap_seconds: float, seed: int, count_tokens: Any = None, max_tokens: int | None = None
) -> list[Any]:
    """Join clips of the same language, in a seeded random order, into windows of at most 30 s (and, given
    ``count_tokens``, at most ``max_tokens`` transcript tokens).

    Each window's transcript is its clips' transcripts joined by spaces; the gap is digital silence.
    """
    import numpy as np

    from .data import MAX_SECONDS, SAMPLE_RATE, SpeechSample

    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    gap = np.zeros(int(gap_seconds * SAMPLE_RATE), dtype=np.float32)
    limit = int(MAX_SECONDS * SAMPLE_RATE)
    windows: list[list[Any]] = []
    sizes: list[int] = []

    def tokens_of(text: str) -> int:
        return count_tokens(text) if count_tokens is not None else 0

    for i in order:
        sample = samples[i]
        for w, window in enumerate(windows):
            used = sum(len(s.audio) for s in window) + len(gap) * len(window)
            if window[0].language != sample.language or used + len(sample.audio) > limit:
                continue
            if max_tokens is not None and sizes[w] + tokens_of(" " + sample.text) > max_tokens:
                continue
            window.append(sample)
            sizes[w] += tokens_of(" " + sample.text)
            break
        else:
            windows.append([sample])
            sizes.append(tokens_of(" " + sample.text))
    packed = []
    for window in windows:
        parts: list[Any] = []
        for k, sample in enumerate(window):
            if k:
                parts.append(gap)
            parts.append(sample.audio)
        first = window[0]
        packed.append(
            SpeechSample(
                audio=np.concatenate(parts),
                text=" ".join(s.text for s in window),
                file=first.file if len(window) == 1 else f"{first.file} (+{len(window) - 1} packed)",
                line=first.line,
                language=first.language,
            )
        )
    return packed


class SpeechModality(Modality):
    """Whisper (transformers or CTranslate2 checkpoints) adapted on audiofolder data; WER, CER and term recall."""

    name = "speech"
    description = "Whisper speech recognition: LoRA on domain recordings, WER/CER and glossary-term recall"
    settings_model = SpeechSettings
    primary_metric = "wer"
    metric_directions: ClassVar[dict[str, bool]] = {
        "wer": False,
        "cer": False,
        "term_recall": True,
        "general_wer": False,
        "term_occurrences": True,
    }

    # -- model -------------------------------------------------------------------------------------------------------
    def load_base(self, ctx: RunContext) -> ModelBundle:
        """Whisper from ``ctx.base`` (transformers directory, CTranslate2 directory, or hub id)."""
        from .model import EncoderCache, load_whisper, whisper_tokens

        location = ctx.base.path if ctx.base.path is not None else ctx.base.hub_id
        model, processor, info = load_whisper(
            location, revision=ctx.config.base_revision, trust_remote_code=ctx.config.trust_remote_code
        )
        tokens = whisper_tokens(processor.tokenizer, model.config.vocab_size)
        return ModelBundle(
            model=model,
            processor=processor,
            components={
                "tokens": tokens,
                "settings": ctx.settings,
                "encoder_cache": EncoderCache(ctx.settings.encoder_cache_mib * 2**20),
            },
            info=info,
        )

    def default_target_modules(self, bundle: ModelBundle, ctx: RunContext) -> list[str]:
        from .model import target_modules

        return target_modules(bundle.model, ctx.settings.adapter_scope)

    def add_adapter(self, bundle: ModelBundle, ctx: RunContext) -> None:
        from peft import get_peft_model

        from polyadapt.adapters import build_peft_config

        if ctx.config.peft.method == "prefix":
            raise ConfigError("peft.method: 'prefix' is not supported by the speech modality (use lora, dora or ia3)")
        if ctx.config.train.grad_checkpointing:
            bundle.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        targets = self.resolve_target_modules(bundle, ctx)
        bundle.model = get_peft_model(bundle.model, build_peft_config(ctx.config.peft, targets))

    def save_adapter(self, bundle: ModelBundle, directory: Path) -> None:
        from .model import save_adapter

        save_adapter(bundle.model, directory)

    def load_adapter(self, bundle: ModelBundle, directory: Path, ctx: RunContext) -> None:
        from .model import load_adapter

        bundle.model = load_adapter(bundle.model, directory).to(ctx.device)
        bundle.model.eval()

    # -- data --------------------------------------------------------------------------------------------------------
    def load_data(self, config: AdaptConfig, path: Path) -> DatasetSplits:
        from .data import load_dataset

        settings: SpeechSettings = config.settings or SpeechSettings()
        tokenizer = _local_tokenizer(config)
        count = (lambda text: len(tokenizer.encode(" " + text, add_special_tokens=False))) if tokenizer else None
        found = load_dataset(
            path,
            holdout=config.data.holdout,
            seed=config.train.seed,
            long_form=settings.long_form,
            count_tokens=count,
            max_label_tokens=settings.max_label_length,
        )
        warnings = []
        if not found["glossary"]:
            warnings.append(f"{path}: no glossary.txt, so no domain-term recall is measured")
        return DatasetSplits(
            train=found["train"],
            validation=found["validation"],
            files=found["files"],
            problems=found["problems"],
            warnings=warnings,
            details=found["details"],
        )

    def _prompt_ids(self, bundle: ModelBundle, settings: SpeechSettings, glossary: list[str]) -> list[int]:
        if not settings.prompt_glossary or not glossary:
            return []
        tokens = bundle.components["tokens"]
        text = bundle.processor.tokenizer.encode(" " + ", ".join(glossary) + ".", add_special_tokens=False)
        # Whisper keeps at most half its context for the previous-text prompt
        limit = bundle.model.config.max_target_positions // 2 - 1
        return [tokens.prev, *text[-limit:]]

    def _prefix(self, bundle: ModelBundle, settings: SpeechSettings, language: str | None) -> list[int]:
        tokens = bundle.components["tokens"]
        return tokens.prefix(settings.language or language, settings.task)

    def prepare(self, bundle: ModelBundle, samples: Sequence[Any], ctx: RunContext, training: bool) -> PreparedSplit:
        import torch

        from polyadapt.data import Problem

        from .model import clip_key

        settings: SpeechSettings = ctx.settings
        tokenizer = bundle.processor.tokenizer
        tokens = bundle.components["tokens"]
        prompt = self._prompt_ids(bundle, settings, glossary_for(ctx.config))
        room = bundle.model.config.max_target_positions
        items, lengths, problems = [], [], []
        if training and settings.pack_clips:
            budget = min(settings.max_label_length, room - len(prompt) - 5)
            samples = pack_samples(
                samples,
                settings.pack_gap_seconds,
                ctx.config.train.seed,
                count_tokens=lambda text: len(tokenizer.encode(text, add_special_tokens=False)),
                max_tokens=budget,
            )
        for index, sample in enumerate(samples):
            try:
                prefix = self._prefix(bundle, settings, sample.language)
            except ConfigError as exc:
                problems.append(Problem(sample.file, str(exc), line=sample.line))
                continue
            # Whisper writes a space before the first word; training targets follow it
            text = tokenizer.encode(" " + sample.text, add_special_tokens=False)
            sequence = [*prompt, *prefix, *text, tokens.eot]
            if len(text) > settings.max_label_length or len(sequence) > room:
                problems.append(
                    Problem(
                        sample.file,
                        f"transcription is {len(text)} tokens; the decoder fits {min(settings.max_label_length, room - len(prompt) - len(prefix) - 1)}",
                        line=sample.line,
                    )
                )
                continue
            items.append(
                {
                    "audio": torch.from_numpy(sample.audio),
                    "sequence": sequence,
                    # targets before this position (prompt and task prefix) are given, not learned
                    "first_target": len(prompt) + len(prefix),
                    "index": index,
                    "key": clip_key(sample.audio),
                }
            )
            lengths.append(len(sequence))
        if problems:
            raise DataError("clips the model cannot take", problems)
        seconds = sum(len(i["audio"]) for i in items) / 16_000
        stats = {
            "clips": len(items),
            "seconds": round(seconds, 2),
            "label_tokens": sum(lengths),
            "prompt_tokens": len(prompt),
        }
        return PreparedSplit(items=items, lengths=lengths, stats=stats)

    def collate(self, bundle: ModelBundle, items: Sequence[Any], training: bool) -> dict[str, Any]:
        import torch

        from .features import log_mel, speed_perturb

        settings: SpeechSettings = bundle.components.get("settings") or SpeechSettings()
        clips = []
        for item in items:
            audio = item["audio"]
            if training and settings.speed_perturb:
                # torch's generator, so the run seed decides the draws
                factor = settings.speed_factors[int(torch.randint(len(settings.speed_factors), ()))]
                audio = speed_perturb(audio, factor)
            clips.append(audio[: 16_000 * 30])
        width = max(len(c) for c in clips)
        audio = torch.zeros(len(clips), width)
        for row, clip in enumerate(clips):
            audio[row, : len(clip)] = clip
        eot = bundle.components["tokens"].eot
        longest = max(len(i["sequence"]) for i in items) - 1
        inputs = torch.full((len(items), longest), eot, dtype=torch.long)
        labels = torch.full((len(items), longest), -100, dtype=torch.long)
        for row, item in enumerate(items):
            seq = torch.tensor(item["sequence"], dtype=torch.long)
            inputs[row, : len(seq) - 1] = seq[:-1]
            targets = seq[1:].clone()
            targets[: item["first_target"] - 1] = -100
            labels[row, : len(targets)] = targets
        batch: dict[str, Any] = {"decoder_input_ids": inputs, "labels": labels}
        if settings.features_on_device:
            batch["audio"] = audio
            if not (training and settings.speed_perturb):
                # the audio is the prepared clip itself, so its encoder output may come from the cache
                batch["clip_keys"] = torch.tensor([item["key"] for item in items], dtype=torch.long)
        else:
            batch["input_features"] = log_mel(audio, bundle.processor.feature_extractor.feature_size)
        return batch

    def compute_loss(self, bundle: ModelBundle, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:

        from .features import log_mel, spec_augment
        from .model import decoder_loss, encoder_is_frozen

        settings: SpeechSettings = bundle.components.get("settings") or SpeechSettings()
        cache = bundle.components.get("encoder_cache")
        augmenting = model.training and settings.specaugment
        if "clip_keys" in batch and cache is not None and cache.budget and not augmenting and encoder_is_frozen(model):
            hidden = cache.encode(
                model, batch["audio"], batch["clip_keys"].tolist(), bundle.processor.feature_extractor.feature_size
            )
            return decoder_loss(
                model, batch["labels"], encoder_outputs=(hidden,), decoder_input_ids=batch["decoder_input_ids"]
            )
        features = batch.get("input_features")
        if features is None:
            features = log_mel(batch["audio"], bundle.processor.feature_extractor.feature_size)
        if model.training and settings.specaugment:
            features = spec_augment(features, settings.freq_mask_bins, settings.time_mask_frames, settings.spec_masks)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        return decoder_loss(
            model, batch["labels"], input_features=features.to(dtype), decoder_input_ids=batch["decoder_input_ids"]
        )

    # -- evaluation and serving --------------------------------------------------------------------------------------
    def transcribe(
        self, bundle: ModelBundle, audios: Sequence[Any], ctx: RunContext, language: str | None = None
    ) -> list[str]:
        """Transcripts of 16 kHz mono clips with the current model; clips over 30 s are chunked and stitched."""
        from .transcribe import transcribe

        settings: SpeechSettings = ctx.settings
        batch_size = ctx.config.eval.batch_size or ctx.config.train.batch_size
        return transcribe(
            bundle,
            audios,
            device=ctx.device,
            prefix=self._prefix(bundle, settings, language),
            prompt=self._prompt_ids(bundle, settings, glossary_for(ctx.config)),
            num_beams=settings.num_beams,
            max_new_tokens=settings.max_new_tokens,
            batch_size=batch_size,
        )

    def evaluate(
        self, bundle: ModelBundle, samples: Sequence[Any], ctx: RunContext, eval_loss: float | None
    ) -> EvalResult:
        from .metrics import error_rates, term_recall

        samples = list(samples)
        predictions = self._transcribe_samples(bundle, samples, ctx)
        references = [s.text for s in samples]
        metrics: dict[str, float] = {}
        if eval_loss is not None:
            metrics["eval_loss"] = float(eval_loss)
        metrics.update(error_rates(references, predictions))
        metrics.update(term_recall(references, predictions, glossary_for(ctx.config)))
        examples = [
            {"file": s.file, "reference": s.text, "prediction": p, "seconds": round(s.seconds, 2)}
            for s, p in zip(samples, predictions, strict=True)
        ]
        return EvalResult(metrics=metrics, examples=examples)

    def _transcribe_samples(self, bundle: ModelBundle, samples: list[Any], ctx: RunContext) -> list[str]:
        predictions: list[str] = [""] * len(samples)
        by_language: dict[str | None, list[int]] = {}
        for i, sample in enumerate(samples):
            by_language.setdefault(sample.language, []).append(i)
        for language, indices in by_language.items():
            texts = self.transcribe(bundle, [samples[i].audio for i in indices], ctx, language=language)
            for i, text in zip(indices, texts, strict=True):
                predictions[i] = text
        return predictions

    def infer_params(self) -> list[click.Parameter]:
        import click

        return [
            click.Argument(
                ["audio"], nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
            ),
            click.Option(
                ["--num-beams"],
                type=click.IntRange(1, 16),
                default=None,
                help="Beam size (default: the run's speech.num_beams).",
            ),
            click.Option(
                ["--language"],
                default=None,
                help="Language code (multilingual models; default: the run's speech.language).",
            ),
        ]

    def infer(self, bundle: ModelBundle, ctx: RunContext, options: dict[str, Any]) -> list[str]:
        from polyadapt.data import Problem

        from .data import AudioReadError, read_audio
        from .transcribe import transcribe

        settings: SpeechSettings = ctx.settings
        audios, problems = [], []
        for path in options["audio"]:
            try:
                audio = read_audio(Path(path))
            except AudioReadError as exc:
                problems.append(Problem(str(path), str(exc)))
                continue
            if len(audio) == 0:
                problems.append(Problem(str(path), "zero-length audio (no samples)"))
                continue
            audios.append(audio)
        if problems:
            raise DataError("cannot transcribe", problems)
        texts = transcribe(
            bundle,
            audios,
            device=ctx.device,
            prefix=self._prefix(bundle, settings, options.get("language")),
            prompt=self._prompt_ids(bundle, settings, glossary_for(ctx.config)),
            num_beams=options.get("num_beams") or settings.num_beams,
            max_new_tokens=settings.max_new_tokens,
            batch_size=ctx.config.eval.batch_size or ctx.config.train.batch_size,
        )
        return [f"{path}\t{text}" for path, text in zip(options["audio"], texts, strict=True)]

    def report_sections(self, before: EvalResult | None, after: EvalResult, run_dir: Path) -> list[tuple[str, str]]:
        import html

        from .metrics import marked_diff

        base = {e["file"]: e["prediction"] for e in before.examples} if before else {}
        rows = []
        for example in after.examples[:REPORT_CLIPS]:
            name = html.escape(Path(example["file"]).name)
            reference = html.escape(example["reference"])
            was = marked_diff(example["reference"], base[example["file"]]) if example["file"] in base else "&mdash;"
            now = marked_diff(example["reference"], example["prediction"])
            rows.append(f"<tr><td>{name}</td><td>{reference}</td><td>{was}</td><td>{now}</td></tr>")
        table = (
            "<p>Transcripts are normalised as scored. <mark>marked</mark>: words that differ from the reference; "
            "<del>struck</del>: reference words that are missing.</p>"
            "<table><tr><th>clip</th><th>reference</th><th>base</th><th>adapted</th></tr>" + "".join(rows) + "</table>"
        )
        return [("Transcripts", table)]
