"""The contract between the server's core and a modality plugin: jobs, the backend that runs them, and its spec.

A :class:`ServingBackend` owns one loaded base (``context.run``) and is only ever called from its base's worker thread
(:class:`polyadapt.serve.scheduler.BatchScheduler`), so it needs no locks around the model. The scheduler hands it
jobs whose adapters are attached already (``job.slot``: the adapter's name on the loaded base, ``None`` for the base),
then calls ``step()`` until it has no active job left. A one-shot backend (transcription, images) finishes every
admitted job in one ``step``; a token-by-token backend (text generation) advances each active job by one token per
``step`` and may admit new jobs between steps (continuous batching).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import AdaptConfig
    from ..manifest import Manifest
    from ..modality import ModalityRun
    from .config import Limits

#: the OpenAI endpoints a backend may answer
ENDPOINTS = ("completions", "chat", "transcriptions", "images")


@dataclass(frozen=True)
class AdapterVersion:
    """One servable version of a configured adapter: a verified run directory and what it records.

    ``label`` is what the ``x-polyadapt-adapter`` header says (``harbor-support@v3`` for a registry version,
    ``voice@run:1a2b3c4d5e6f`` for a run directory); ``digest`` identifies the adapter files, so a new version of the
    same adapter gets its own ``slot`` (its name on the loaded base) and the two never mix.
    """

    adapter: str
    label: str
    directory: Path
    digest: str
    config: AdaptConfig
    manifest: Manifest
    #: the registry version number, when it came from the registry
    version: int | None = None

    @property
    def slot(self) -> str:
        safe = "".join(c if c.isalnum() else "_" for c in self.adapter)
        return f"{safe}_{self.digest[:12]}"

    @property
    def settings(self) -> Any:
        """The run's own modality section (its decoding settings: system prompt, beams, resolution...)."""
        return self.config.settings


@dataclass(eq=False)
class Job:
    """One unit of work for a backend: a modality-specific ``spec``, the adapter version that answers it (``None``:
    the base) and the future its result goes to. ``on_event`` (streaming) is called from the worker thread with
    partial results; ``cancelled`` is set by the server when the client went away."""

    spec: Any
    adapter: AdapterVersion | None = None
    on_event: Callable[[Any], None] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    created: float = field(default_factory=time.monotonic)
    #: the adapter's name on the loaded base, set by the scheduler when the job is admitted (None: the base)
    slot: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self.future.done()

    def finish(self, result: Any) -> None:
        if not self.future.done():
            self.future.set_result(result)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def emit(self, event: Any) -> None:
        """Hand a partial result to the listener; a listener that is gone (its client disconnected, its event loop
        closed) cancels the job instead of breaking the batch."""
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001
                self.cancelled.set()


@dataclass(frozen=True)
class BackendContext:
    """What a backend factory gets: the configured base's name, its loaded run and config, and the server limits."""

    name: str
    run: ModalityRun
    config: AdaptConfig
    limits: Limits


class RequestProblem(Exception):
    """A request a backend cannot serve as asked (a prompt beyond the context, an unreadable file...): the server
    answers it with ``status`` (400, or 413 past a limit) in OpenAI's error shape, and goes on serving."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code


class ServingBackend(ABC):
    """Runs one base's batches. Subclasses implement the request preparation their endpoints need (called from
    request threads: keep it free of model calls, or lock) and the scheduling methods below (worker thread only)."""

    def __init__(self, context: BackendContext) -> None:
        self.context = context
        self.run = context.run
        self.limits = context.limits

    # -- adapters (worker thread) ------------------------------------------------------------------------------------
    def attach(self, version: AdapterVersion) -> None:
        """Attach ``version``'s adapter to the loaded base under ``version.slot``."""
        self.run.load_adapter(version.directory, version.slot)
        self.run.model.eval()

    def detach(self, slot: str) -> None:
        """Detach the adapter attached under ``slot`` and free its weights."""
        self.run.delete_adapter(slot)

    # -- scheduling (worker thread) ----------------------------------------------------------------------------------
    @abstractmethod
    def admit(self, jobs: Sequence[Job]) -> None:
        """Take ``jobs`` (their adapters attached, ``job.slot`` set) into the running batch."""

    @abstractmethod
    def step(self) -> None:
        """Advance every active job; finish (``job.finish`` / ``job.fail``) those that are done."""

    @property
    @abstractmethod
    def active(self) -> int:
        """Jobs admitted and not finished."""

    def room(self) -> int:
        """How many more jobs ``admit`` may take now (default: a full batch when idle, none while busy)."""
        return 0 if self.active else self.limits.max_batch

    def rows(self) -> int:
        """The rows of the next forward pass (the batch-size metric); default: the active jobs."""
        return self.active

    def fail_all(self, error: BaseException) -> None:
        """Fail every active job (a forward pass raised) and forget them."""
        return None

    def close(self) -> None:
        """Release what the backend holds (called once, on the worker thread, at shutdown)."""
        return None


@dataclass(frozen=True)
class BackendSpec:
    """What a plugin registers (``register_serving_backends``): the modality it serves, the endpoints it answers and
    ``factory(context) -> ServingBackend`` (imports heavy libraries when called). A run whose PEFT method is not in
    ``peft_methods`` is refused when the server starts (mixed-adapter batches need plain LoRA)."""

    modality: str
    endpoints: frozenset[str]
    factory: Callable[[BackendContext], ServingBackend]
    #: the PEFT methods (``peft.method`` of a run) it can serve; None: any
    peft_methods: frozenset[str] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.endpoints) - set(ENDPOINTS)
        if unknown:
            raise ValueError(f"unknown endpoints {sorted(unknown)} (known: {', '.join(ENDPOINTS)})")


# -- what the endpoints ask of a backend, and what they get back ----------------------------------------------------
@dataclass(frozen=True)
class GenerationOptions:
    """Decoding options of one completion (``max_tokens`` None: the backend's default)."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: retrieved chunks (best first) to ground the prompt in (``retrieve:`` of the adapter or route); none: as asked
    excerpts: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Generated:
    """One finished completion; ``finish_reason`` is ``stop`` (end token or stop sequence) or ``length``."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class TextDelta:
    """Streaming: text added to a completion since the last delta."""

    text: str


@dataclass(frozen=True)
class Transcribed:
    text: str
    language: str | None
    duration: float


@dataclass(frozen=True)
class ImageOptions:
    n: int = 1
    size: tuple[int, int] | None = None
    seed: int | None = None
    lora_scale: float | None = None


@dataclass(frozen=True)
class Images:
    """Generated images as PNG bytes, with the seed of each."""

    png: list[bytes]
    seeds: list[int]


class GenerationBackend(ServingBackend):
    """A backend answering ``completions`` and ``chat``: it turns requests into job specs (request threads)."""

    @abstractmethod
    def completion_spec(self, prompt: str, adapter: AdapterVersion | None, options: GenerationOptions) -> Any:
        """The job spec of a raw-prompt completion; :class:`RequestProblem` if it cannot be served."""

    @abstractmethod
    def chat_spec(
        self, messages: list[tuple[str, str]], adapter: AdapterVersion | None, options: GenerationOptions
    ) -> Any:
        """The job spec of a chat completion of ``(role, content)`` messages (the run's system prompt added when
        there is none, as in training)."""

    def sources(self, spec: Any, text: str) -> tuple[str, list[dict[str, Any]]]:
        """A grounded completion's text with its sources listed after it, and the sources (``index``: the number
        the prompt gave the chunk, ``citation``, ``source``, ``score``, ``cited``); an ungrounded one unchanged."""
        return text, []


class TranscriptionBackend(ServingBackend):
    """A backend answering ``transcriptions``."""

    @abstractmethod
    def transcription_spec(
        self, audio: bytes, filename: str, adapter: AdapterVersion | None, language: str | None, prompt: str | None
    ) -> Any:
        """The job spec of one uploaded file; :class:`RequestProblem` (400) for empty or corrupt audio, 413 past
        ``limits.max_audio_seconds``."""


class ImageBackend(ServingBackend):
    """A backend answering ``images``."""

    @abstractmethod
    def image_spec(self, prompt: str, adapter: AdapterVersion | None, options: ImageOptions) -> Any:
        """The job spec of one generation request (``n`` images)."""
