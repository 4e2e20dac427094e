"""The modality interface: a stateless factory that declares what it supports and opens one stateful run at a time.

A plugin registers a :class:`Modality` subclass through ``register_modalities``. The modality is made once per process
and holds no per-run state: it declares its config section, metrics, PEFT methods and capabilities, reads data, and
opens a :class:`ModalityRun` for each run (``modality.open(ctx)``). Everything a run needs later (settings, processor,
token ids, caches) lives on that run object as typed attributes.

``polyadapt adapt`` calls, in this order (:class:`polyadapt.recipe.AdaptRecipe`)::

    modality.check_config(config)       cross-section checks, with the core's own, before anything loads
    modality.read_data(DataContext)     read and validate the dataset (no model; ``doctor`` stops here)
    run = modality.open(ctx)
    run.load_base()                     the base model -> run.model (the module that is trained), run.info
    run.prepare(samples, training)      tokenise / featurise / cache, per split
    run.evaluate(samples, eval_loss)    "before" metrics on the held-out split, inside ``evaluating(run)``
    run.add_adapter()                   attach the PEFT adapter to ``run.model``
    run.collate + run.loss              inside the shared training loop
    run.on_evaluate(step, metrics)      after each periodic evaluation, inside ``evaluating(run)``
    run.evaluate(samples, eval_loss)    "after" metrics
    run.evaluate_general(...)           before and after, on ``eval.general_data`` (the forgetting check), if any
    run.save_adapter(run_dir)           the adapter in the modality's standard format

``evaluate``, ``infer`` and ``export`` on a finished run call ``open``, ``load_base`` then ``load_adapter``.

Optional capabilities are small protocols a run class implements and the modality declares in ``capabilities``
(checked up front and by :mod:`polyadapt.testing`): :class:`Inference`, :class:`ReportSections`,
:class:`MultiAdapter` (attach several adapters to one base and switch between them) and :class:`BatchedAdapters`
(one forward pass in which each row uses its own adapter).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from .defaults import TrainingRule

if TYPE_CHECKING:
    import click
    import torch

    from .config import AdaptConfig, ResolvedBase
    from .data import Problem

#: the capabilities a modality can declare, and the protocol its run class must implement for each
CAPABILITIES = ("inference", "report", "multi_adapter", "batched_adapters")


class ModalitySettings(BaseModel):
    """Base for a modality's own config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class DataFound:
    """What ``read_data`` returns: the samples of every split found on disk, and what the manifest records of them.

    ``splits`` maps the split names found (``"train"``, ``"validation"``, ``"test"``) to their samples; polyadapt picks
    the held-out split by one rule for every modality (validation, then test, then a ``data.holdout`` cut of train).
    ``problems`` are bad samples (file, line, reason): a modality reports them, it never raises on one, and leaves
    them out of ``splits``; polyadapt applies ``data.on_bad_sample``. ``dropped`` counts samples left out by design
    (duplicates...) by reason; ``files`` are every file the samples came from (fingerprinted into the manifest);
    ``details`` is free-form manifest information.
    """

    splits: dict[str, Sequence[Any]]
    files: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetSplits:
    """The dataset as the lifecycle uses it: ``train`` and the chosen ``validation`` (held-out) samples.

    ``heldout`` records where the held-out split came from: ``{"source": "validation"}``, ``{"source": "test"}`` or
    ``{"source": "holdout", "fraction": f, "seed": s, "indices": [...]}`` (indices into the train samples read).
    """

    train: Sequence[Any]
    validation: Sequence[Any]
    heldout: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedSplit:
    """What ``prepare`` returns: model-ready items (indexable), optional per-item lengths, and statistics."""

    items: Sequence[Any]
    lengths: Sequence[int] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    """What ``evaluate`` returns: metric values, per-sample ``examples`` (for reports and metric plugins), and
    ``artifacts`` (files the report links or embeds, for example image grids)."""

    metrics: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class DataContext:
    """What ``read_data`` gets: the run's config, the dataset directory to read, and the resolved base when it could
    be resolved without loading anything (``None`` otherwise): a reader may use the base's tokenizer files to measure
    label lengths exactly, never its weights.

    ``general`` is True when the directory is ``eval.general_data``, the forgetting check's data from outside the
    domain: a reader takes it as written, adding nothing of the domain's (the image modality's trigger phrase)."""

    config: AdaptConfig
    path: Path
    base: ResolvedBase | None = None
    general: bool = False

    @property
    def settings(self) -> Any:
        """The modality's own config section."""
        return self.config.settings


@dataclass(frozen=True)
class RunContext:
    """Everything a run needs to know about where it runs, passed as one frozen object.

    ``device`` is where the trained model lives; ``dtype`` the mixed-precision compute dtype (``torch.float32`` when
    none); ``run_dir`` the run directory (``None`` during ``doctor`` and in tests); ``is_main_process`` False on the
    other ranks of a distributed run.
    """

    config: AdaptConfig
    base: ResolvedBase
    device: torch.device
    dtype: torch.dtype
    run_dir: Path | None = None
    is_main_process: bool = True
    num_processes: int = 1

    @property
    def settings(self) -> Any:
        """The modality's own config section."""
        return self.config.settings


class Modality(ABC):
    """A modality: stateless, made once per process. Subclasses set the class attributes and implement ``read_data``.

    ``open(ctx)`` makes a fresh ``run_class(modality, ctx)`` for each run.
    """

    #: the modality's name: what ``modality:`` selects and the name of its config section
    name: ClassVar[str]
    #: one line for ``polyadapt plugins``
    description: ClassVar[str] = ""
    #: pydantic model (subclass of :class:`ModalitySettings`) of the config section the modality owns
    settings_model: ClassVar[type[BaseModel]] = ModalitySettings
    #: the metric that sums up "better"
    primary_metric: ClassVar[str] = "eval_loss"
    #: metrics that sum up "better", in order of preference, for data that reports them (text data with
    #: ``answer_contains`` reports fact accuracy; other text data only the loss); default: ``(primary_metric,)``
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    #: every metric ``evaluate`` may report, with whether higher is better (``eval_loss`` is always reported)
    metrics: ClassVar[dict[str, bool]] = {}
    #: the ``peft.method`` values this modality can train
    peft_methods: ClassVar[tuple[str, ...]] = ("lora", "dora", "ia3")
    #: optional capabilities (see :data:`CAPABILITIES`); each needs its protocol on ``run_class``
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: the dataset layout, for the message when a directory holds none
    data_layout: ClassVar[str] = "train and validation splits"
    #: the per-run class ``open`` makes
    run_class: ClassVar[type[ModalityRun]]
    #: how ``auto`` training values are chosen (:mod:`polyadapt.defaults`); a modality sets its reference values
    training_rule: ClassVar[TrainingRule] = TrainingRule(reference_lr=1e-3, reference_params=1e8, min_steps=100)

    # -- before any model loads --------------------------------------------------------------------------------------
    @abstractmethod
    def read_data(self, ctx: DataContext) -> DataFound:
        """Read and validate the dataset at ``ctx.path``: the samples of every split found, and every bad sample as a
        :class:`polyadapt.data.Problem` (never raised). Must not load a model (``doctor`` calls it alone)."""

    def load_data(self, ctx: DataContext) -> DatasetSplits:
        """``read_data`` followed by the core's held-out rule (:func:`polyadapt.data.choose_heldout`)."""
        from .data import choose_heldout

        return choose_heldout(self.read_data(ctx), ctx.config, ctx.path, self.data_layout)

    def check_config(self, config: AdaptConfig) -> list[str]:
        """Problems of combinations the section schemas cannot see alone (one line each, key first). Called at
        validation, before any model loads. Default: none."""
        return []

    def auto_stop_metric(self, config: AdaptConfig, heldout: Sequence[Any]) -> str:
        """The metric ``train.early_stopping_metric: auto`` ranks periodic evaluations by, for these held-out
        samples. Default: the rule's ``stop_metric``."""
        return self.training_rule.stop_metric

    def reported_metrics(self, config: AdaptConfig) -> set[str]:
        """The metrics a run with ``config`` reports (what ``train.early_stopping_metric`` may name)."""
        return {"eval_loss", *self.metrics}

    def infer_params(self) -> list[click.Parameter]:
        """Options and arguments of ``polyadapt infer RUN_DIR ...`` (modalities with the ``inference`` capability)."""
        return []

    def higher_is_better(self, metric: str) -> bool:
        """Direction of ``metric``: from ``metrics``; losses, error rates and distances are lower-better."""
        if metric in self.metrics:
            return self.metrics[metric]
        return not any(word in metric for word in ("loss", "perplexity", "wer", "cer", "distance", "error"))

    def headline_metric(self, metrics: dict[str, float]) -> str | None:
        """The metric that decides "better" among ``metrics``: the first of ``headline_metrics`` (else
        ``primary_metric``) that they hold, then ``eval_loss``; None when they hold none of these."""
        for name in (*(self.headline_metrics or (self.primary_metric,)), "eval_loss"):
            if name in metrics:
                return name
        return None

    def usage(self, run_dir: Path, base: str) -> str:
        """Markdown telling how to load a run's adapter without polyadapt (the last section of its model card)."""
        return (
            "```python\nfrom peft import PeftModel\n\n"
            f"# base_model: {base}, loaded with its own library\n"
            f"model = PeftModel.from_pretrained(base_model, {str(run_dir)!r})\n```"
        )

    # -- the run -----------------------------------------------------------------------------------------------------
    def open(self, ctx: RunContext) -> ModalityRun:
        """A fresh run object for ``ctx`` (nothing loaded yet)."""
        return self.run_class(self, ctx)


class ModalityRun(ABC):
    """One run of a modality: the base model, its processor and every cache, as attributes of this object.

    ``model`` is the module polyadapt trains (the adapter is attached to it; for diffusion, the denoiser) and moves to
    the device; ``info`` is recorded in the manifest under ``base``. Subclasses add their own typed attributes.
    """

    def __init__(self, modality: Modality, ctx: RunContext) -> None:
        self.modality = modality
        self.ctx = ctx
        self.settings: Any = ctx.settings
        self.model: Any = None
        self.info: dict[str, Any] = {}
        #: values of ``settings`` that ``load_base`` chose from the base (``settings`` holds them), as the manifest's
        #: ``auto`` records them: ``{"image.resolution": {"value": 32, "rule": "..."}}``
        self.auto: dict[str, dict[str, Any]] = {}

    # -- model -------------------------------------------------------------------------------------------------------
    @abstractmethod
    def load_base(self) -> None:
        """Load the base model and its processor from ``self.ctx.base`` into ``self.model`` and friends. Frozen parts
        go to ``ctx.device``; ``self.model`` is moved by polyadapt. Honour ``trust_remote_code`` and
        ``base_revision``."""

    @abstractmethod
    def add_adapter(self) -> None:
        """Attach a fresh adapter (``ctx.config.peft``) to ``self.model``; only adapter parameters stay trainable."""

    @abstractmethod
    def save_adapter(self, directory: Path) -> None:
        """Write the trained adapter into ``directory`` in the modality's standard format (safetensors)."""

    @abstractmethod
    def load_adapter(self, directory: Path, name: str = "default") -> None:
        """Attach the adapter saved in ``directory`` to the loaded base under ``name`` and make it the active one."""

    def trainable_modules(self) -> list[torch.nn.Module]:
        """The modules whose mode and trainable weights :func:`polyadapt.evaluation.evaluating` saves and restores."""
        return [self.model]

    # -- data --------------------------------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, samples: Sequence[Any], training: bool) -> PreparedSplit:
        """Turn raw samples into model-ready items (tokenise, featurise, pack, cache latents...)."""

    @abstractmethod
    def collate(self, items: Sequence[Any], training: bool) -> dict[str, Any]:
        """Stack items into a batch of CPU tensors. With ``training=False`` any randomness must be deterministic
        (seeded per item) so held-out losses are comparable before and after."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The mean loss of ``batch`` (already on the device). Call ``model`` (possibly wrapped for distributed
        training), not ``self.model``. polyadapt puts the model in ``train()`` mode for training steps and in
        ``eval()`` mode for held-out losses, so ``model.training`` tells them apart (for augmentation, say)."""

    def loss_weight(self, batch: dict[str, Any]) -> float:
        """How much ``batch`` counts in the held-out loss, which is the weighted mean of batch losses: the loss of a
        batch must equal the ``loss_weight``-weighted mean of the losses of its rows.

        The default is the number of samples. Language models return the number of target tokens, which makes the
        held-out loss an exact per-token mean (and its exponential an exact perplexity).
        """
        from .training import batch_size_of

        return float(batch_size_of(batch))

    # -- evaluation --------------------------------------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, samples: Sequence[Any], eval_loss: float | None) -> EvalResult:
        """Held-out metrics of the current ``self.model`` on raw ``samples`` (polyadapt calls it inside
        :func:`polyadapt.evaluation.evaluating`). ``eval_loss`` is the mean loss polyadapt measured on the same
        samples (None if it could not)."""

    def evaluate_general(self, samples: Sequence[Any], eval_loss: float | None) -> EvalResult:
        """Metrics of the current ``self.model`` on general data (``eval.general_data``), measured before and after
        training: the forgetting check. Called like :meth:`evaluate`, on the samples of the general set.

        Default: :meth:`evaluate`'s metrics, which suit modalities whose held-out metrics score outputs against
        references (loss, WER, answers). A modality whose held-out metrics score closeness to the domain (image: the
        brand's palette) overrides it to score how far the outputs moved from the base's own."""
        return self.evaluate(samples, eval_loss)

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """Called on the main process after each periodic evaluation during training (``train.eval_every``), inside
        :func:`polyadapt.evaluation.evaluating`: the place for progress artefacts such as sample images under
        ``ctx.run_dir``. Default: nothing."""
        return None


# -- optional capabilities ------------------------------------------------------------------------------------------


@runtime_checkable
class Inference(Protocol):
    """``inference``: ``polyadapt infer`` with the options the modality's ``infer_params`` declares."""

    def infer(self, options: dict[str, Any]) -> list[str]:
        """Run inference with the parsed options; return lines to print."""
        ...


@runtime_checkable
class ReportSections(Protocol):
    """``report``: extra sections of report.html."""

    def report_sections(self, before: EvalResult | None, after: EvalResult, run_dir: Path) -> list[tuple[str, str]]:
        """``(title, html)`` sections: sample outputs, image grids..."""
        ...


@runtime_checkable
class MultiAdapter(Protocol):
    """``multi_adapter``: one loaded base, several adapters attached by name, switched without reloading."""

    def load_adapter(self, directory: Path, name: str = "default") -> None: ...

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter; ``None`` runs the base model alone."""
        ...

    def adapter_names(self) -> list[str]:
        """The names of the attached adapters, in the order they were attached."""
        ...

    def delete_adapter(self, name: str) -> None:
        """Detach ``name`` and free its weights."""
        ...


@runtime_checkable
class BatchedAdapters(Protocol):
    """``batched_adapters``: one forward pass over a batch whose rows use different adapters (or the base)."""

    def adapter_batch(self, names: Sequence[str | None]) -> AbstractContextManager[None]:
        """Within the block, row ``i`` of every batch the model sees uses adapter ``names[i]`` (``None``: the base)."""
        ...


PROTOCOLS: dict[str, type] = {
    "inference": Inference,
    "report": ReportSections,
    "multi_adapter": MultiAdapter,
    "batched_adapters": BatchedAdapters,
}


def capability_problems(modality: Modality) -> list[str]:
    """What is wrong with a modality's declarations (unknown capabilities, missing protocols, missing run class)."""
    problems = []
    run_class = getattr(modality, "run_class", None)
    if not (isinstance(run_class, type) and issubclass(run_class, ModalityRun)):
        return [f"modality {modality.name!r}: run_class must be a ModalityRun subclass, not {run_class!r}"]
    for capability in sorted(modality.capabilities):
        protocol = PROTOCOLS.get(capability)
        if protocol is None:
            problems.append(f"modality {modality.name!r}: unknown capability {capability!r} (known: {CAPABILITIES})")
            continue
        missing = [m for m in _protocol_methods(protocol) if not callable(getattr(run_class, m, None))]
        if missing:
            problems.append(
                f"modality {modality.name!r} declares {capability!r} but {run_class.__name__} lacks {', '.join(missing)}"
            )
    return problems


def _protocol_methods(protocol: type) -> Iterator[str]:
    for name, value in vars(protocol).items():
        if callable(value) and not name.startswith("_"):
            yield name


def has_capability(run: ModalityRun, capability: str) -> bool:
    """Whether ``run``'s modality declares ``capability``."""
    return capability in run.modality.capabilities
