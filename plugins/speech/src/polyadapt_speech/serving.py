"""Serving speech: batched Whisper transcription, every clip with its own LoRA adapter, in one decoding pass.

An upload is decoded as ``polyadapt infer`` decodes a file (:func:`polyadapt_speech.data.read_audio`: 16 kHz mono),
cut into windows of at most 30 s (:func:`polyadapt_speech.inference.split_long`) and decoded with the settings of the
run that trained its adapter (its language and task, decoder prompt, beams, token budget), so a transcription equals
``polyadapt infer RUN FILE``. The windows of every request admitted together are decoded in batches: those sharing a
decoder start (prompt + prefix) and beam size go through one ``generate`` inside ``run.adapter_batch``, row *i* with
its clip's adapter (rows repeated once per beam for the decoder).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyadapt.errors import ConfigError
from polyadapt.serve.backend import (
    AdapterVersion,
    BackendContext,
    Job,
    RequestProblem,
    Transcribed,
    TranscriptionBackend,
)

if TYPE_CHECKING:
    import numpy as np

    from .modality import SpeechRun

#: upload suffixes kept for the decoder to recognise the container (anything else is decoded as-is)
SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".webm", ".mp4", ".mpeg", ".mpga", ".oga", ".opus")


@dataclass(frozen=True)
class Decoding:
    """How one adapter's clips are decoded (from its run's ``speech:`` settings)."""

    prompt: tuple[int, ...]
    prefix: tuple[int, ...]
    num_beams: int
    max_new_tokens: int


@dataclass(frozen=True)
class SpeechSpec:
    pieces: list[np.ndarray]
    decoding: Decoding
    duration: float
    language: str | None


class SpeechBackend(TranscriptionBackend):
    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.run: SpeechRun = context.run
        self.lock = threading.Lock()
        self.jobs: list[Job] = []
        self._sequences: dict[str, Any] = {}

    # -- requests (request threads) ----------------------------------------------------------------------------------
    def transcription_spec(
        self, audio: bytes, filename: str, adapter: AdapterVersion | None, language: str | None, prompt: str | None
    ) -> SpeechSpec:
        from .data import SAMPLE_RATE, AudioReadError, read_audio
        from .inference import split_long

        if not audio:
            raise RequestProblem("the uploaded file is empty", param="file")
        suffix = Path(filename).suffix.lower()
        with tempfile.NamedTemporaryFile(suffix=suffix if suffix in SUFFIXES else "") as handle:
            handle.write(audio)
            handle.flush()
            try:
                samples = read_audio(Path(handle.name))
            except AudioReadError as exc:
                raise RequestProblem(
                    f"the uploaded file is not audio polyadapt can decode: {exc}", param="file"
                ) from None
        if len(samples) == 0:
            raise RequestProblem("the uploaded audio has no samples", param="file")
        duration = len(samples) / SAMPLE_RATE
        if duration > self.limits.max_audio_seconds:
            raise RequestProblem(
                f"the audio is {duration:.1f} s long; this server transcribes at most "
                f"{self.limits.max_audio_seconds:g} s", status=413, param="file", code="request_too_large",
            )  # fmt: skip
        settings = self.settings_of(adapter)
        language = language or settings.language
        decoding = self.decoding(adapter, language, prompt)
        return SpeechSpec(pieces=split_long(samples), decoding=decoding, duration=duration, language=language)

    def settings_of(self, adapter: AdapterVersion | None) -> Any:
        return adapter.settings if adapter is not None else self.run.settings

    def decoding(self, adapter: AdapterVersion | None, language: str | None, prompt: str | None) -> Decoding:
        """The decoder start and budget for ``adapter``'s clips: as ``polyadapt infer`` of its run decodes them."""
        settings = self.settings_of(adapter)
        try:
            prefix = self.run.tokens.prefix(language, settings.task)
        except ConfigError as exc:
            raise RequestProblem(exc.problems[0], param="language") from None
        if prompt:
            room = self.run.model.config.max_target_positions // 2 - 1
            with self.lock:
                ids = self.run.tokenizer.encode(" " + prompt.strip(), add_special_tokens=False)
            start = [self.run.tokens.prev, *ids[-room:]]
        else:
            start = list(self.sequences_of(adapter).prompt)
        # never past the decoder's positions (a base entry's default budget may exceed a small model's)
        room = self.run.model.config.max_target_positions - len(start) - len(prefix)
        return Decoding(tuple(start), tuple(prefix), settings.num_beams, max(1, min(settings.max_new_tokens, room)))

    def sequences_of(self, adapter: AdapterVersion | None) -> Any:
        """The run's decoder sequences (its glossary prompt), built once per adapter version."""
        if adapter is None:
            return self.run.sequences
        with self.lock:
            found = self._sequences.get(adapter.slot)
            if found is None:
                from .batching import DecoderSequences
                from .data import dataset_glossary
                from .model import DecoderVocabulary

                run = self.run
                vocabulary = DecoderVocabulary(run.tokenizer, run.tokens, run.model.config.max_target_positions)
                glossary = dataset_glossary(Path(adapter.config.data.path))
                found = self._sequences[adapter.slot] = DecoderSequences(vocabulary, adapter.settings, glossary)
            return found

    # -- scheduling (worker thread) ----------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self.jobs)

    def rows(self) -> int:
        return sum(len(j.spec.pieces) for j in self.jobs)

    def admit(self, jobs: Sequence[Job]) -> None:
        self.jobs.extend(jobs)

    def step(self) -> None:
        from .inference import generate_ids

        jobs, self.jobs = self.jobs, []
        live = []
        for job in jobs:
            if job.cancelled.is_set():
                job.fail(ConnectionAbortedError("the client went away"))
            else:
                live.append(job)
        # every window of every job, grouped by how it is decoded, shortest first (less padding)
        groups: dict[Decoding, list[tuple[int, int]]] = {}
        for j, job in enumerate(live):
            for p in range(len(job.spec.pieces)):
                groups.setdefault(job.spec.decoding, []).append((j, p))
        texts: dict[tuple[int, int], str] = {}
        run = self.run
        try:
            for decoding, members in groups.items():
                members.sort(key=lambda m: len(live[m[0]].spec.pieces[m[1]]))
                for start in range(0, len(members), self.limits.max_batch):
                    chunk = members[start : start + self.limits.max_batch]
                    slots = [live[j].slot for j, _ in chunk]
                    rows = run.adapter_batch(slots) if hasattr(run.model, "peft_config") else nullcontext()
                    with rows:
                        ids = generate_ids(
                            run.model, [live[j].spec.pieces[p] for j, p in chunk], device=run.ctx.device,
                            prefix=list(decoding.prefix), prompt=list(decoding.prompt), num_beams=decoding.num_beams,
                            max_new_tokens=decoding.max_new_tokens, cache=None, decoder_rows=run._beam_rows,
                        )  # fmt: skip
                    with self.lock:
                        decoded = run.tokenizer.batch_decode(ids, skip_special_tokens=True)
                    for member, text in zip(chunk, decoded, strict=True):
                        texts[member] = text.strip()
        except Exception as exc:
            for job in live:
                job.fail(exc)
            raise
        for j, job in enumerate(live):
            parts = [texts[(j, p)] for p in range(len(job.spec.pieces)) if texts[(j, p)]]
            job.finish(Transcribed(text=" ".join(parts), language=job.spec.language, duration=job.spec.duration))

    def fail_all(self, error: BaseException) -> None:
        for job in self.jobs:
            job.fail(error)
        self.jobs = []


def make_backend(context: BackendContext) -> SpeechBackend:
    return SpeechBackend(context)
