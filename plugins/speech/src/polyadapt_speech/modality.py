"""The speech modality: Whisper adapted with PEFT for domain transcription.

:class:`SpeechModality` is the stateless factory (what the modality supports, how its data is read);
:class:`SpeechRun` is one run: the Whisper model, its processor and special tokens, the decoder sequences of the run's
config and glossary, and the frozen-encoder cache are its attributes. Adapters (attach, save, load, several by name,
mixed-adapter batches), gradient checkpointing and the fused head loss come from :mod:`polyadapt.peft_run`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from polyadapt.defaults import TrainingRule
from polyadapt.errors import ConfigError, DataError
from polyadapt.modality import DataContext, DataFound, EvalResult, Modality, ModalitySettings, PreparedSplit, RunContext
from polyadapt.peft_run import PeftRun

if TYPE_CHECKING:
    import click
    import numpy as np
    import torch

    from polyadapt.config import AdaptConfig

    from .batching import DecoderSequences
    from .data import SpeechSample
    from .model import EncoderCache, WhisperTokens


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


class SpeechModality(Modality):
    """Whisper (transformers or CTranslate2 checkpoints) adapted on audiofolder data; WER, CER and term recall."""

    name = "speech"
    description = "Whisper speech recognition: LoRA on domain recordings, WER/CER and glossary-term recall"
    settings_model = SpeechSettings
    primary_metric = "wer"
    metrics = {"eval_loss": False, "wer": False, "cer": False, "term_recall": True, "term_occurrences": True}
    # no prefix tuning: a config asking for it is refused at validation, before any model loads
    peft_methods = ("lora", "dora", "ia3")
    capabilities = frozenset({"inference", "report", "multi_adapter", "batched_adapters"})
    #: LoRA at 1e-3 for whisper-tiny (37.8M parameters); early stopping on the held-out WER (greedy decoding of the held-out
    #: clips is cheap next to training)
    training_rule = TrainingRule(
        reference_lr=1e-3, reference_params=37.8e6, min_steps=40, amount="seconds", max_amount=72_000, stop_metric="wer"
    )
    data_layout = (
        "train/, validation/ or test/ folders with metadata.csv or metadata.jsonl, or a metadata file at the root"
    )

    def read_data(self, ctx: DataContext) -> DataFound:
        """Every split of the audiofolder dataset; with the base's tokenizer readable from its files (a local base, or
        a hub base already in the cache), clips whose transcription does not fit the decoder are bad samples too."""
        from .batching import DecoderSequences
        from .data import dataset_glossary, read_dataset
        from .model import read_vocabulary

        settings: SpeechSettings = ctx.settings
        vocabulary = read_vocabulary(ctx.base, ctx.config.base_revision)
        label_problem = None
        if vocabulary is not None:
            # the prompt is the run's dataset's glossary, also when reading other data (eval.general_data)
            sequences = DecoderSequences(vocabulary, settings, dataset_glossary(Path(ctx.config.data.path)))
            label_problem = sequences.problem
        found = read_dataset(ctx.path, long_form=settings.long_form, label_problem=label_problem)
        if vocabulary is None and found.splits:
            found.warnings.append(
                "the base's tokenizer cannot be read before the model loads: transcription lengths are checked when "
                "the run prepares its data"
            )
        return found

    def reported_metrics(self, config: AdaptConfig) -> set[str]:
        from .data import dataset_glossary

        reported = super().reported_metrics(config)
        data = Path(config.data.path)
        # term recall needs a glossary; a finished run's data may be gone, and then nothing is known about it
        if data.is_dir() and not dataset_glossary(data):
            reported -= {"term_recall", "term_occurrences"}
        return reported

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

    def usage(self, run_dir: Path, base: str) -> str:
        from .ct2 import is_ct2_directory
        from .data import SAMPLE_RATE

        location = _local_location(base)
        note = ""
        if is_ct2_directory(Path(location)):
            note = (
                f"# {base} is a CTranslate2 model: transformers needs the same weights in transformers format;\n"
                f"# polyadapt_speech.model.load_whisper({location!r}) converts them\n"
            )
        return (
            "```python\n"
            "from peft import PeftModel\n"
            "from transformers import WhisperForConditionalGeneration, WhisperProcessor\n\n"
            f"{note}"
            f"base = WhisperForConditionalGeneration.from_pretrained({location!r})\n"
            f"processor = WhisperProcessor.from_pretrained({location!r})\n"
            f"model = PeftModel.from_pretrained(base, {str(run_dir)!r}).eval()\n\n"
            f"# audio: {SAMPLE_RATE} Hz mono float32 samples, e.g. soundfile.read('call.wav', dtype='float32')[0]\n"
            f"features = processor(audio, sampling_rate={SAMPLE_RATE}, return_tensors='pt').input_features\n"
            "ids = model.generate(input_features=features)\n"
            "print(processor.batch_decode(ids, skip_special_tokens=True)[0])\n"
            "```"
        )


def _local_location(base: str) -> str:
    """Where transformers finds the base: the reference itself, or the directory inside the package of a ``pkg://``
    base."""
    from polyadapt.builtin import PKG_SCHEME, locate_package_file

    if not base.startswith(PKG_SCHEME):
        return base
    try:
        return str(locate_package_file(base))
    except ConfigError:  # the card is still written when the package is gone
        return base


class SpeechRun(PeftRun):
    """One speech run. Attributes beyond :class:`polyadapt.modality.ModalityRun`'s:

    ``processor`` (WhisperProcessor), ``tokens`` (the special token ids), ``sequences`` (decoder sequences of this
    config and glossary), ``glossary`` (the terms of the run's dataset), ``encoder_cache``.
    """

    settings: SpeechSettings

    def __init__(self, modality: Modality, ctx: RunContext) -> None:
        from .data import dataset_glossary
        from .model import EncoderCache

        super().__init__(modality, ctx)
        self.processor: Any = None
        self.tokens: WhisperTokens | None = None
        self.sequences: DecoderSequences | None = None
        self.glossary: list[str] = dataset_glossary(Path(ctx.config.data.path))
        self.encoder_cache: EncoderCache = EncoderCache(self.settings.encoder_cache_mib * 2**20)
        # the adapter of each row while adapter_batch is active (beam search repeats them per beam)
        self.row_adapters: list[str | None] | None = None

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def n_mels(self) -> int:
        return int(self.processor.feature_extractor.feature_size)

    @property
    def batch_size(self) -> int:
        return self.ctx.config.eval.batch_size or self.ctx.config.train.batch_size

    # -- model -------------------------------------------------------------------------------------------------------
    def load_base(self) -> None:
        """Whisper from ``ctx.base`` (transformers directory, CTranslate2 directory, or hub id)."""
        from .batching import DecoderSequences
        from .model import DecoderVocabulary, load_whisper, whisper_tokens

        base, config = self.ctx.base, self.ctx.config
        location = base.path if base.path is not None else base.hub_id
        self.model, self.processor, self.info = load_whisper(
            location, revision=config.base_revision, trust_remote_code=config.trust_remote_code
        )
        self.tokens = whisper_tokens(self.tokenizer, self.model.config.vocab_size)
        vocabulary = DecoderVocabulary(self.tokenizer, self.tokens, self.model.config.max_target_positions)
        self.sequences = DecoderSequences(vocabulary, self.settings, self.glossary)

    def target_modules(self) -> list[str]:
        from .model import target_modules

        return target_modules(self.base_model, self.settings.adapter_scope)

    @contextmanager
    def adapter_batch(self, names: Sequence[str | None]) -> Iterator[None]:
        """Row ``i`` of every batch uses adapter ``names[i]``; transcription repeats the rows per beam itself."""
        with super().adapter_batch(names):
            outer, self.row_adapters = self.row_adapters, list(names)
            try:
                yield
            finally:
                self.row_adapters = outer

    # -- data --------------------------------------------------------------------------------------------------------
    def prepare(self, samples: Sequence[SpeechSample], training: bool) -> PreparedSplit:
        from .batching import prepare_clips

        config = self.ctx.config
        return prepare_clips(
            samples, self.sequences, training=training, seed=config.train.seed, on_bad_sample=config.data.on_bad_sample
        )

    def collate(self, items: Sequence[dict[str, Any]], training: bool) -> dict[str, Any]:
        from .batching import collate_clips

        return collate_clips(items, self.settings, eot=self.tokens.eot, n_mels=self.n_mels, training=training)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        from .batching import batch_loss

        return batch_loss(model, batch, self.settings, self.encoder_cache, self.n_mels)

    def loss_weight(self, batch: dict[str, Any]) -> float:
        from .batching import target_tokens

        # the decoder loss is a mean over learned tokens, so the held-out loss is an exact per-token mean
        return float(target_tokens(batch))

    # -- evaluation and inference ------------------------------------------------------------------------------------
    def evaluate(self, samples: Sequence[SpeechSample], eval_loss: float | None) -> EvalResult:
        from .metrics import error_rates, term_recall

        # the clips prepare keeps: those the decoder can take (the rest are bad samples, reported already)
        samples = [s for s in samples if self.sequences.problem(s.text, s.language) is None]
        predictions: list[str] = [""] * len(samples)
        by_language: dict[str | None, list[int]] = {}
        for i, sample in enumerate(samples):
            by_language.setdefault(sample.language, []).append(i)
        for language, indices in by_language.items():
            texts = self.transcribe([samples[i].audio for i in indices], self.sequences.prefix(language))
            for i, text in zip(indices, texts, strict=True):
                predictions[i] = text
        references = [s.text for s in samples]
        metrics = {**error_rates(references, predictions), **term_recall(references, predictions, self.glossary)}
        examples = [
            {"file": s.file, "reference": s.text, "prediction": p, "seconds": round(s.seconds, 2)}
            for s, p in zip(samples, predictions, strict=True)
        ]
        return EvalResult(metrics=metrics, examples=examples)

    def transcribe(
        self,
        audios: Sequence[np.ndarray],
        prefix: list[int] | None = None,
        *,
        adapters: Sequence[str | None] | None = None,
        num_beams: int | None = None,
    ) -> list[str]:
        """Transcripts of 16 kHz mono clips with the current model; clips over 30 s are chunked and stitched.

        :param prefix: the decoder prefix (default: ``speech.language``, else English).
        :param adapters: the adapter of each clip (None: the base alone), decoded in mixed-adapter batches.
        :param num_beams: beam size (default: ``speech.num_beams``).
        """
        from .inference import transcribe

        prefix = prefix if prefix is not None else self.sequences.prefix(None)
        beams = num_beams or self.settings.num_beams

        def decode(pieces: list[np.ndarray], owners: list[int]) -> list[str]:
            rows = self.adapter_batch([adapters[o] for o in owners]) if adapters is not None else nullcontext()
            with rows:
                ids = self.generate_ids(pieces, prefix, beams)
            return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

        return transcribe(decode, audios, self.batch_size)

    def generate_ids(self, audios: Sequence[np.ndarray], prefix: list[int], num_beams: int) -> torch.Tensor:
        """Generated token ids of clips of at most 30 s in one batch (rows as :meth:`adapter_batch` set them)."""
        from .inference import generate_ids

        return generate_ids(
            self.model,
            audios,
            device=self.ctx.device,
            prefix=prefix,
            prompt=self.sequences.prompt,
            num_beams=num_beams,
            max_new_tokens=self.settings.max_new_tokens,
            cache=self.encoder_cache,
            decoder_rows=self._beam_rows,
        )

    def _beam_rows(self, num_beams: int) -> AbstractContextManager[Any]:
        # the encoder saw one row per clip; under beam search the decoder sees each clip's row once per beam
        if self.row_adapters is None or num_beams == 1:
            return nullcontext()
        return PeftRun.adapter_batch(self, [name for name in self.row_adapters for _ in range(num_beams)])

    def infer(self, options: dict[str, Any]) -> list[str]:
        from polyadapt.data import Problem

        from .data import AudioReadError, read_audio

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
        # --language wins over speech.language here; a clip's metadata language never does
        prefix = self.tokens.prefix(options.get("language") or self.settings.language, self.settings.task)
        texts = self.transcribe(audios, prefix, num_beams=options.get("num_beams"))
        return [f"{path}\t{text}" for path, text in zip(options["audio"], texts, strict=True)]

    def report_sections(self, before: EvalResult | None, after: EvalResult, run_dir: Path) -> list[tuple[str, str]]:
        from .report import transcript_sections

        return transcript_sections(before, after)


SpeechModality.run_class = SpeechRun
