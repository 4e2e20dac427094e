"""From clips to model-ready batches, and the decoder loss.

A clip's decoder sequence is ``[glossary prompt] prefix transcript <|endoftext|>``. The prompt (``<|startofprev|>``
and the glossary terms, with ``speech.prompt_glossary``) and the prefix (``<|startoftranscript|>`` [language, task]
``<|notimestamps|>``) are given; the transcript and the end token are learned. :class:`DecoderSequences` builds the
sequence and says why a clip does not fit the decoder. The dataset reader uses it too, whenever the base's tokenizer
can be read before the model loads, so such clips are bad samples that ``doctor`` names.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from polyadapt.errors import ConfigError, DataError
from polyadapt.losses import IGNORE_INDEX
from polyadapt.modality import PreparedSplit

if TYPE_CHECKING:
    import torch

    from .data import SpeechSample
    from .modality import SpeechSettings
    from .model import DecoderVocabulary, EncoderCache

#: the longest decoder prefix: <|startoftranscript|> <|lang|> <|task|> <|notimestamps|>, plus the end token
PREFIX_AND_END = 5


class UnfitClip(Exception):
    """A clip the decoder cannot take (a transcription too long, a language the model lacks); the message says why."""


class DecoderSequences:
    """Decoder sequences of clips for one base (its tokenizer, special tokens and decoder length) and one config."""

    def __init__(self, vocabulary: DecoderVocabulary, settings: SpeechSettings, glossary: Sequence[str]) -> None:
        self.tokenizer = vocabulary.tokenizer
        self.tokens = vocabulary.tokens
        self.room = vocabulary.max_target_positions
        self.settings = settings
        self.prompt = self._glossary_prompt(glossary)
        # what the config alone gets wrong is one config error, not one bad sample per clip
        try:
            self.tokens.prefix(settings.language, settings.task)
        except ConfigError as exc:
            reason = exc.problems[0]
            raise ConfigError(reason if reason.startswith("speech.") else f"speech.language: {reason}") from None

    def _glossary_prompt(self, glossary: Sequence[str]) -> list[int]:
        if not self.settings.prompt_glossary or not glossary:
            return []
        text = self.tokenizer.encode(" " + ", ".join(glossary) + ".", add_special_tokens=False)
        # Whisper keeps at most half its context for the previous-text prompt
        limit = self.room // 2 - 1
        return [self.tokens.prev, *text[-limit:]]

    def prefix(self, language: str | None) -> list[int]:
        """The decoder prefix of a clip in ``language`` (``speech.language`` wins); ConfigError if the model lacks it."""
        return self.tokens.prefix(self.settings.language or language, self.settings.task)

    def count(self, text: str) -> int:
        """Tokens of ``text`` as it follows other words (after a space)."""
        return len(self.tokenizer.encode(" " + text, add_special_tokens=False))

    def label_budget(self) -> int:
        """The most transcript tokens any clip may have (packed windows are filled up to it)."""
        return min(self.settings.max_label_length, self.room - len(self.prompt) - PREFIX_AND_END)

    def encode(self, text: str, language: str | None) -> tuple[list[int], int]:
        """``(sequence, first_target)``: the decoder sequence and the position of its first learned token.

        :raises UnfitClip: the model lacks the clip's language or the transcription does not fit.
        """
        try:
            prefix = self.prefix(language)
        except ConfigError as exc:
            raise UnfitClip(exc.problems[0]) from None
        # Whisper writes a space before the first word; training targets follow it
        ids = self.tokenizer.encode(" " + text, add_special_tokens=False)
        fits = min(self.settings.max_label_length, self.room - len(self.prompt) - len(prefix) - 1)
        if len(ids) > fits:
            raise UnfitClip(f"transcription is {len(ids)} tokens, more than the decoder allows ({fits})")
        return [*self.prompt, *prefix, *ids, self.tokens.eot], len(self.prompt) + len(prefix)

    def problem(self, text: str, language: str | None) -> str | None:
        """Why a clip does not fit (None when it does): what the dataset reader records as a bad sample."""
        try:
            self.encode(text, language)
        except UnfitClip as exc:
            return str(exc)
        return None


def pack_samples(
    samples: Sequence[SpeechSample],
    gap_seconds: float,
    seed: int,
    count_tokens: Any = None,
    max_tokens: int | None = None,
) -> list[SpeechSample]:
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
            if max_tokens is not None and sizes[w] + tokens_of(sample.text) > max_tokens:
                continue
            window.append(sample)
            sizes[w] += tokens_of(sample.text)
            break
        else:
            windows.append([sample])
            sizes.append(tokens_of(sample.text))
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


def prepare_clips(
    samples: Sequence[SpeechSample],
    sequences: DecoderSequences,
    *,
    training: bool,
    seed: int,
    on_bad_sample: str,
) -> PreparedSplit:
    """Model-ready items (audio tensor, decoder sequence, first learned position, encoder-cache key) of ``samples``.

    Clips that do not fit the decoder were bad samples of the dataset already when the base's tokenizer could be read
    before the model loaded; otherwise they are found here and ``data.on_bad_sample`` applies to them as it does to
    every bad sample: ``skip`` leaves them out (recorded in the split's statistics, which the manifest keeps),
    ``fail`` stops before anything is trained, listing them.
    """
    import torch

    from polyadapt.data import Problem

    from .data import SAMPLE_RATE
    from .model import clip_key

    settings = sequences.settings
    problems: list[Problem] = []
    fitting = []
    for sample in samples:
        reason = sequences.problem(sample.text, sample.language)
        if reason is None:
            fitting.append(sample)
        else:
            problems.append(Problem(sample.file, reason, line=sample.line))
    if problems and on_bad_sample == "fail":
        raise DataError("clips the decoder cannot take (set data.on_bad_sample: skip to train without them)", problems)
    if training and settings.pack_clips:
        fitting = pack_samples(
            fitting, settings.pack_gap_seconds, seed, count_tokens=sequences.count, max_tokens=sequences.label_budget()
        )
    items, lengths = [], []
    for sample in fitting:
        sequence, first_target = sequences.encode(sample.text, sample.language)
        items.append(
            {
                "audio": torch.from_numpy(sample.audio),
                "sequence": sequence,
                # targets before this position (prompt and task prefix) are given, not learned
                "first_target": first_target,
                "key": clip_key(sample.audio),
            }
        )
        lengths.append(len(sequence))
    stats: dict[str, Any] = {
        "clips": len(items),
        "seconds": round(sum(len(i["audio"]) for i in items) / SAMPLE_RATE, 2),
        "label_tokens": sum(lengths),
        "prompt_tokens": len(sequences.prompt),
    }
    if problems:
        stats["bad_samples_skipped"] = [p.as_dict() for p in problems]
    return PreparedSplit(items=items, lengths=lengths, stats=stats)


def collate_clips(
    items: Sequence[dict[str, Any]], settings: SpeechSettings, *, eot: int, n_mels: int, training: bool
) -> dict[str, Any]:
    """A batch: decoder inputs and labels (the given prefix and padding are :data:`IGNORE_INDEX`), and either the
    padded audio (log-mel computed on the device in the loss; ``clip_keys`` when its encoder output may be cached) or
    ``input_features`` computed here on the CPU."""
    import torch

    from .features import N_SAMPLES, log_mel, speed_perturb

    clips = []
    for item in items:
        audio = item["audio"]
        if training and settings.speed_perturb:
            # torch's generator, so the run seed decides the draws
            factor = settings.speed_factors[int(torch.randint(len(settings.speed_factors), ()))]
            audio = speed_perturb(audio, factor)
        clips.append(audio[:N_SAMPLES])
    width = max(len(c) for c in clips)
    audio = torch.zeros(len(clips), width)
    for row, clip in enumerate(clips):
        audio[row, : len(clip)] = clip
    longest = max(len(i["sequence"]) for i in items) - 1
    inputs = torch.full((len(items), longest), eot, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        seq = torch.tensor(item["sequence"], dtype=torch.long)
        inputs[row, : len(seq) - 1] = seq[:-1]
        targets = seq[1:].clone()
        targets[: item["first_target"] - 1] = IGNORE_INDEX
        labels[row, : len(targets)] = targets
    batch: dict[str, Any] = {"decoder_input_ids": inputs, "labels": labels}
    if settings.features_on_device:
        batch["audio"] = audio
        if not (training and settings.speed_perturb):
            # the audio is the prepared clip itself, so its encoder output may come from the cache
            batch["clip_keys"] = torch.tensor([item["key"] for item in items], dtype=torch.long)
    else:
        batch["input_features"] = log_mel(audio, n_mels)
    return batch


def target_tokens(batch: dict[str, Any]) -> int:
    """The learned tokens of a batch: the decoder loss is their mean, so they weigh the batch in a held-out loss."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def decoder_loss(model: Any, labels: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """Mean cross-entropy of the decoder's predictions against ``labels`` (:data:`IGNORE_INDEX` left out), per token.

    Whisper's output projection is fused with the loss (:func:`polyadapt.peft_run.fused_head_loss`), so its 51,865-way
    logits for every decoder position are never held at once; an adapted projection computes its logits itself.
    """
    import torch

    from polyadapt.peft_run import fused_head_loss, plain_linear_head

    head = plain_linear_head(model)
    if head is None:
        logits = model(**inputs).logits
        return torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )
    return fused_head_loss(model, head, labels, **inputs)


def batch_loss(
    model: Any, batch: dict[str, Any], settings: SpeechSettings, cache: EncoderCache, n_mels: int
) -> torch.Tensor:
    """The decoder loss of a collated batch: encoder outputs from ``cache`` while the encoder is frozen and the audio
    is not augmented, else log-mel (SpecAugment-masked in training when asked) through the whole model."""
    from .features import log_mel, spec_augment
    from .model import encoder_is_frozen

    augmenting = model.training and settings.specaugment
    if "clip_keys" in batch and cache.budget and not augmenting and encoder_is_frozen(model):
        hidden = cache.encode(model, batch["audio"], batch["clip_keys"].tolist(), n_mels)
        return decoder_loss(
            model, batch["labels"], encoder_outputs=(hidden,), decoder_input_ids=batch["decoder_input_ids"]
        )
    features = batch.get("input_features")
    if features is None:
        features = log_mel(batch["audio"], n_mels)
    if augmenting:
        features = spec_augment(features, settings.freq_mask_bins, settings.time_mask_frames, settings.spec_masks)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return decoder_loss(
        model, batch["labels"], input_features=features.to(dtype), decoder_input_ids=batch["decoder_input_ids"]
    )
