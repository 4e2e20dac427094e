"""Building peft configurations from the ``peft`` config section, and finding adapter targets in a model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

    from .config import PeftSection


def build_peft_config(section: PeftSection, target_modules: list[str], task_type: str | None = None) -> Any:
    """The peft config object for ``peft.method``.

    :param section: the validated ``peft`` section.
    :param target_modules: module names (suffixes) to adapt; ignored by prefix tuning.
    :param task_type: peft task type (``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``) or None for a bare model.
    """
    import peft

    if section.method in ("lora", "dora"):
        return peft.LoraConfig(
            r=section.r,
            lora_alpha=section.alpha,
            lora_dropout=section.dropout,
            target_modules=target_modules,
            use_dora=section.method == "dora",
            init_lora_weights=section.init_weights,
            task_type=task_type,
        )
    if section.method == "ia3":
        feedforward = [t for t in target_modules if _looks_feedforward(t)]
        return peft.IA3Config(
            target_modules=target_modules,
            feedforward_modules=feedforward,
            init_ia3_weights=section.init_weights,
            task_type=task_type,
        )
    if section.method == "prefix":
        if task_type is None:
            raise ConfigError("peft.method: 'prefix' is not supported by this modality (it needs a language model)")
        return peft.PrefixTuningConfig(num_virtual_tokens=section.num_virtual_tokens, task_type=task_type)
    raise ConfigError(f"peft.method: {section.method!r} is not supported")


def _looks_feedforward(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(word in last for word in ("mlp", "fc", "ff", "up_proj", "down_proj", "gate_proj", "dense_4h", "c_fc"))


def linear_module_names(model: torch.nn.Module, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> list[str]:
    """Distinct leaf names (the last dotted component) of the linear layers of ``model``.

    A layer counts when its full name contains one of ``include`` (all, if empty) and none of ``exclude``. Conv1D
    (GPT-2 style) layers count as linear.
    """
    import torch

    include, exclude = tuple(include), tuple(exclude)
    names: list[str] = []
    for full, module in model.named_modules():
        kind = type(module).__name__
        if not (isinstance(module, torch.nn.Linear) or kind == "Conv1D"):
            continue
        if include and not any(word in full for word in include):
            continue
        if any(word in full for word in exclude):
            continue
        leaf = full.rsplit(".", 1)[-1]
        if leaf not in names:
            names.append(leaf)
    return names


def count_parameters(modules: torch.nn.Module | list[torch.nn.Module]) -> dict[str, int]:
    """Trainable and total parameter counts (each shared parameter once)."""
    import torch

    modules = [modules] if isinstance(modules, torch.nn.Module) else modules
    unique = {id(p): p for m in modules for p in m.parameters()}.values()
    return {
        "trainable": sum(p.numel() for p in unique if p.requires_grad),
        "total": sum(p.numel() for p in unique),
    }
