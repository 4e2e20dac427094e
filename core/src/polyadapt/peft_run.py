"""The shared base of modalities whose model is a transformers model adapted with PEFT (text and speech).

:class:`PeftRun` does, once for every such modality: attaching a fresh adapter (with gradient checkpointing done the
transformers-5 way and the KV cache off), saving and loading adapters in vanilla PEFT format, several named adapters on
one base (switch, delete) and mixed-adapter batches, unwrapping distributed and PEFT wrappers, and the output head's
loss fused with the head. A subclass supplies ``load_base``, ``target_modules`` and the data/loss/evaluation methods.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigError
from .modality import ModalityRun

if TYPE_CHECKING:
    import torch

#: the files of a PEFT adapter directory; nothing else in a run directory is read back by peft
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: the name the trained adapter has (and a run's adapter is loaded under unless told otherwise)
DEFAULT_ADAPTER = "default"
#: the row name peft's mixed-adapter batches use for "no adapter"
BASE_ROW = "__base__"

# Library warnings a user cannot act on: peft looks for the base's config.json next to a GGUF file, and transformers
# announces a renamed gradient-checkpointing attribute.
QUIET_WARNINGS = (
    r".*[Cc]ould not find a config file.*",
    r".*is_gradient_checkpointing.*",
    r".*Unable to fetch remote file.*",
)


@contextmanager
def quiet_library_warnings() -> Iterator[None]:
    """Hide the library warnings listed in :data:`QUIET_WARNINGS` inside the block."""
    with warnings.catch_warnings():
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def unwrap(model: Any) -> Any:
    """The plain model inside distributed (``.module``) and PEFT (``get_base_model()``) wrappers."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass (non-reentrant, so frozen inputs need no gradient) and turn the
    KV cache off, which checkpointing cannot use. transformers 5 renamed the switch; the old name still works."""
    with quiet_library_warnings():
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ConfigError(f"train.grad_checkpointing: {type(model).__name__} does not support it")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False


def plain_linear_head(model: Any) -> Any:
    """The model's output head when it is a plain ``torch.nn.Linear`` (so its loss can be fused), else None."""
    import torch

    core = unwrap(model)
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    return head if type(head) is torch.nn.Linear else None


def fused_head_loss(
    model: Any, head: Any, labels: torch.Tensor, select: torch.Tensor | None = None, **inputs: Any
) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` against ``labels`` (``-100`` left out), the head and the loss computed
    together chunk by chunk (:func:`polyadapt.losses.linear_cross_entropy`), so the vocabulary logits of all positions
    are never held at once. ``model`` still runs through its own ``forward`` (and any wrapper), up to the head;
    ``select`` (a boolean mask over the hidden states' leading dimensions) keeps only the positions with a target."""
    from .losses import bypass_head, linear_cross_entropy

    with bypass_head(head):
        hidden = model(**inputs).logits
    if select is not None:
        hidden = hidden[select]
    return linear_cross_entropy(hidden, head.weight, labels, head.bias)


class PeftRun(ModalityRun):
    """A run whose ``model`` is a transformers model, adapted with ``peft.get_peft_model`` and saved as a vanilla PEFT
    directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""

    #: peft's task type for ``get_peft_model`` (``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``) or None for a bare model
    peft_task_type: ClassVar[str | None] = None

    # -- targets -----------------------------------------------------------------------------------------------------
    def target_modules(self) -> list[str]:
        """Module names the adapter targets when ``peft.target_modules`` is ``auto``, found from the model."""
        raise NotImplementedError

    def resolve_target_modules(self) -> list[str]:
        """``peft.target_modules`` from the config, or the run's ``auto`` choice."""
        chosen = self.ctx.config.peft.target_modules
        return self.target_modules() if chosen == "auto" else list(chosen)

    @property
    def base_model(self) -> Any:
        """The transformers model inside any PEFT wrapper."""
        return unwrap(self.model)

    # -- adapters ----------------------------------------------------------------------------------------------------
    def add_adapter(self) -> None:
        from peft import get_peft_model

        from .adapters import build_peft_config

        if self.ctx.config.train.grad_checkpointing:
            enable_gradient_checkpointing(unwrap(self.model))
        if self.ctx.config.peft.init_from is not None and DEFAULT_ADAPTER in self.adapter_names():
            # peft.init_from: the parent adapter, attached frozen by load_adapter, is the one trained on
            self.model.set_adapter(DEFAULT_ADAPTER, inference_mode=False)
            self.model.peft_config[DEFAULT_ADAPTER].inference_mode = False
            return
        config = build_peft_config(self.ctx.config.peft, self.resolve_target_modules(), task_type=self.peft_task_type)
        with quiet_library_warnings():
            self.model = get_peft_model(self.model, config, adapter_name=DEFAULT_ADAPTER)

    def save_adapter(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = self.model.active_adapter
        with quiet_library_warnings():
            self.model.save_pretrained(str(directory), safe_serialization=True, selected_adapters=[name])
        if name != DEFAULT_ADAPTER:  # peft writes other adapters into a subfolder named after them
            for file in (directory / name).iterdir():
                file.replace(directory / file.name)
            (directory / name).rmdir()

    def load_adapter(self, directory: Path, name: str = DEFAULT_ADAPTER) -> None:
        from peft import PeftModel

        directory = Path(directory)
        if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
            raise ConfigError(f"{directory}: no PEFT adapter here ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} expected)")
        with quiet_library_warnings():
            if hasattr(self.model, "peft_config"):
                if name in self.model.peft_config:
                    raise ConfigError(f"an adapter named {name!r} is already attached; delete it first")
                self.model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(
                    self.model, str(directory), adapter_name=name, is_trainable=False
                )
        self.model.to(self.ctx.device)
        self.set_adapter(name)

    def adapter_names(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}))

    def set_adapter(self, name: str | None) -> None:
        if name is None:
            self._base_only(True)
            return
        if name not in self.adapter_names():
            raise ConfigError(f"no adapter named {name!r} (attached: {', '.join(self.adapter_names()) or 'none'})")
        self._base_only(False)
        # the adapter being trained stays trainable; a loaded one stays frozen (peft's set_adapter unfreezes by default)
        trainable = any(p.requires_grad for n, p in self.model.named_parameters() if f".{name}." in n)
        self.model.set_adapter(name, inference_mode=not trainable)

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapter_names():
            raise ConfigError(f"no adapter named {name!r}")
        remaining = [n for n in self.adapter_names() if n != name]
        if not remaining:
            self.model = self.model.unload()
            return
        if self.model.active_adapter == name:
            self.model.set_adapter(remaining[0])
        self.model.delete_adapter(name)

    def _base_only(self, on: bool) -> None:
        # peft has no persistent "adapters off" switch on PeftModel; the tuner layers have one
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(not on)

    @contextmanager
    def adapter_batch(self, names: Sequence[str | None]) -> Iterator[None]:
        """Row ``i`` of every forward pass in the block uses adapter ``names[i]`` (None: the base alone); LoRA only.

        This is peft's mixed-adapter batch (the ``adapter_names`` forward argument), held for a whole block so that a
        modality's own generation loop needs no change."""
        self.check_adapter_batch(names)
        rows = [BASE_ROW if n is None else n for n in names]
        base_only = self._adapters_off()
        self._base_only(False)  # rows that want the base say so themselves
        try:
            with self.model.base_model._enable_peft_forward_hooks(adapter_names=rows):
                yield
        finally:
            self._base_only(base_only)

    def check_adapter_batch(self, names: Sequence[str | None]) -> None:
        """Refuse names that are not attached, and adapters peft cannot mix in one batch (anything but plain LoRA),
        with a :class:`ConfigError` naming them."""
        attached = self.adapter_names()
        unknown = sorted({n for n in names if n is not None and n not in attached})
        if unknown:
            raise ConfigError(f"no adapter named {', '.join(unknown)} (attached: {', '.join(attached) or 'none'})")
        for name in sorted({n for n in names if n is not None}):
            config = self.model.peft_config[name]
            kind = str(getattr(config.peft_type, "value", config.peft_type))
            if kind != "LORA" or getattr(config, "use_dora", False):
                method = "dora" if kind == "LORA" else kind.lower()
                raise ConfigError(
                    f"adapter {name!r} ({method}): only LoRA adapters can answer different rows of one batch"
                )

    def _adapters_off(self) -> bool:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return any(isinstance(m, BaseTunerLayer) and m.disable_adapters for m in self.model.modules())
