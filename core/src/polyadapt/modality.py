"""The modality interface: what a plugin supplies so that the shared lifecycle can adapt, evaluate and serve a model.

A modality is a small class, registered through the ``register_modalities`` hook. polyadapt calls it in this order
during ``polyadapt adapt``::

    load_data(config, path)            read and validate the dataset (no model needed; ``doctor`` stops here)
    load_base(ctx)                     the base model bundle
    prepare(bundle, samples, ctx, ...) tokenise / featurise / cache, per split
    evaluate(...)                      "before" metrics on the held-out split (base model)
    add_adapter(bundle, ctx)           attach the PEFT adapter to ``bundle.model``
    collate + compute_loss             inside the shared training loop
    evaluate(...)                      "after" metrics
    save_adapter(bundle, run_dir)      the adapter in the modality's standard format

``evaluate``, ``infer`` and ``export`` on a finished run call ``load_base`` then ``load_adapter``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import click
    import torch

    from .config import AdaptConfig, ResolvedBase
    from .data import Problem


class ModalitySettings(BaseModel):
    """Base for a modality's own config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class ModelBundle:
    """What ``load_base`` returns.

    ``model`` is the module polyadapt trains (the adapter is attached to it; for diffusion, the denoiser).
    ``processor`` is the tokenizer/processor; ``components`` holds frozen parts (VAE, text encoder, scheduler...);
    ``info`` is recorded in the manifest under ``base`` (for example the hub revision or architecture).
    """

    model: Any
    processor: Any = None
    components: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetSplits:
    """What ``load_data`` returns: raw samples per split and everything the manifest records about them.

    ``problems`` are bad samples (file, line, reason). polyadapt applies ``data.on_bad_sample``: ``fail`` stops and
    lists them all; ``skip`` trains without them and records each. A modality must not include a bad sample in
    ``train``/``validation``. ``dropped`` counts samples left out by design (duplicates...) by reason. ``files`` are
    every file the samples came from (fingerprinted into the manifest). ``details`` is free-form manifest information
    (for example how the held-out split was cut). A directory with only a held-out split gives an empty ``train``.
    """

    train: Sequence[Any]
    validation: Sequence[Any]
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
class RunContext:
    """Everything a modality needs to know about the run, passed as one frozen object.

    ``device`` is where the trained model lives; ``dtype`` the mixed-precision compute dtype (``torch.float32`` when
    none); ``run_dir`` the run directory (``None`` during ``doctor``); ``is_main_process`` False on the other ranks of a
    distributed run.
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
    """Base class of a modality. Subclasses set the class attributes and implement the abstract methods."""

    #: the modality's name: what ``modality:`` selects and the name of its config section
    name: ClassVar[str]
    #: one line for ``polyadapt plugins``
    description: ClassVar[str] = ""
    #: pydantic model (subclass of :class:`ModalitySettings`) of the config section the modality owns
    settings_model: ClassVar[type[BaseModel]] = ModalitySettings
    #: the metric that sums up "better", and whether higher is better for each metric the modality reports
    primary_metric: ClassVar[str] = "eval_loss"
    metric_directions: ClassVar[dict[str, bool]] = {}

    # -- model -------------------------------------------------------------------------------------------------------
    @abstractmethod
    def load_base(self, ctx: RunContext) -> ModelBundle:
        """Load the base model and its processor from ``ctx.base``. Frozen components go to ``ctx.device``;
        ``bundle.model`` is moved by polyadapt. Honour ``ctx.config.trust_remote_code`` and ``base_revision``.
        The bundle is the modality's state for the run: keep in ``components`` what ``collate`` and
        ``compute_loss`` need later (the settings, a feature extractor, caches)."""

    @abstractmethod
    def default_target_modules(self, bundle: ModelBundle, ctx: RunContext) -> list[str]:
        """Module names the adapter targets when ``peft.target_modules`` is ``auto``, found from the model."""

    def add_adapter(self, bundle: ModelBundle, ctx: RunContext) -> None:
        """Attach a fresh adapter (``ctx.config.peft``) to ``bundle.model``; only adapter parameters stay trainable.

        The default wraps the model with ``peft.get_peft_model``; modalities override it for a task type, gradient
        checkpointing, or a different attachment (diffusers' ``add_adapter``).
        """
        from peft import get_peft_model

        from .adapters import build_peft_config

        targets = self.resolve_target_modules(bundle, ctx)
        bundle.model = get_peft_model(bundle.model, build_peft_config(ctx.config.peft, targets))

    def resolve_target_modules(self, bundle: ModelBundle, ctx: RunContext) -> list[str]:
        """``peft.target_modules`` from the config, or the modality's ``auto`` choice."""
        chosen = ctx.config.peft.target_modules
        return self.default_target_modules(bundle, ctx) if chosen == "auto" else list(chosen)

    @abstractmethod
    def save_adapter(self, bundle: ModelBundle, directory: Path) -> None:
        """Write the adapter to ``directory`` in the modality's standard format (safetensors)."""

    @abstractmethod
    def load_adapter(self, bundle: ModelBundle, directory: Path, ctx: RunContext) -> None:
        """Attach the adapter saved in ``directory`` to a freshly loaded base ``bundle`` (for inference)."""

    # -- data --------------------------------------------------------------------------------------------------------
    @abstractmethod
    def load_data(self, config: AdaptConfig, path: Path) -> DatasetSplits:
        """Read and validate the dataset at ``path``. Must not load a model (``doctor`` calls it alone)."""

    @abstractmethod
    def prepare(self, bundle: ModelBundle, samples: Sequence[Any], ctx: RunContext, training: bool) -> PreparedSplit:
        """Turn raw samples into model-ready items (tokenise, featurise, pack, cache latents...)."""

    @abstractmethod
    def collate(self, bundle: ModelBundle, items: Sequence[Any], training: bool) -> dict[str, Any]:
        """Stack items into a batch of CPU tensors. With ``training=False`` any randomness must be deterministic
        (seeded per item) so evaluation losses are comparable before and after."""

    @abstractmethod
    def compute_loss(self, bundle: ModelBundle, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The mean loss of ``batch`` (already on the device). Call ``model`` (possibly wrapped for distributed
        training), not ``bundle.model``. polyadapt puts the model in ``train()`` mode for training steps and in
        ``eval()`` mode for held-out losses, so ``model.training`` tells them apart (for augmentation, say)."""

    def loss_weight(self, batch: dict[str, Any]) -> float:
        """How much ``batch`` counts in the held-out loss, which is the weighted mean of batch losses.

        The default is the number of samples. Language models return the number of target tokens, which makes the
        held-out loss an exact per-token mean (and its exponential an exact perplexity).
        """
        from .training import batch_size_of

        return float(batch_size_of(batch))

    # -- evaluation and serving --------------------------------------------------------------------------------------
    @abstractmethod
    def evaluate(
        self, bundle: ModelBundle, samples: Sequence[Any], ctx: RunContext, eval_loss: float | None
    ) -> EvalResult:
        """Held-out metrics of the current ``bundle.model`` on raw ``samples``. ``eval_loss`` is the mean loss
        polyadapt measured on the same samples (None if it could not)."""

    def on_evaluate(self, bundle: ModelBundle, ctx: RunContext, step: int, metrics: dict[str, float]) -> None:
        """Called on the main process after each periodic evaluation during training (``train.eval_every``), with the
        bundle being trained and the metrics just measured: the place for progress artefacts such as sample images
        under ``ctx.run_dir``. It must leave the model as it found it (mode and weights). Default: nothing."""
        return None

    def infer_params(self) -> list[click.Parameter]:
        """Options and arguments of ``polyadapt infer RUN_DIR ...`` for this modality."""
        return []

    def infer(self, bundle: ModelBundle, ctx: RunContext, options: dict[str, Any]) -> list[str]:
        """Run inference with the options parsed from ``infer_params``; return lines to print."""
        raise NotImplementedError(f"modality {self.name!r} has no inference")

    def report_sections(self, before: EvalResult | None, after: EvalResult, run_dir: Path) -> list[tuple[str, str]]:
        """Extra ``(title, html)`` sections for report.html (sample outputs, image grids...)."""
        return []

    def higher_is_better(self, metric: str) -> bool:
        """Direction of ``metric``: from ``metric_directions``; losses, error rates and distances are lower-better."""
        if metric in self.metric_directions:
            return self.metric_directions[metric]
        return not any(word in metric for word in ("loss", "perplexity", "wer", "cer", "distance", "error"))
