"""The LoRA adapter on a PEFT model as plain factors: read it, set it, freeze its ``A``, and merge earlier rounds'
updates into the base weights (``stack``), without touching anything peft does not expose on its LoRA layers."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..lora import LoraLayer

if TYPE_CHECKING:
    import torch

ADAPTER = "default"


def lora_modules(model: Any, adapter: str = ADAPTER) -> dict[str, Any]:
    """peft's LoRA layers of ``model`` holding ``adapter``, by module name (the key :mod:`polyadapt.lora` reads from
    a saved adapter: the tensor name without ``.lora_A.weight``)."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, PeftLoraLayer) and adapter in module.lora_A
    }
    return found


def read_layers(modules: dict[str, Any], adapter: str = ADAPTER) -> dict[str, LoraLayer]:
    """A float32 copy of each layer's ``(A, B, scale)``, on the CPU."""
    return {
        key: LoraLayer(
            module.lora_A[adapter].weight.detach().float().cpu().clone(),
            module.lora_B[adapter].weight.detach().float().cpu().clone(),
            float(module.scaling[adapter]),
        )
        for key, module in modules.items()
    }


def write_layers(modules: dict[str, Any], layers: dict[str, LoraLayer], adapter: str = ADAPTER) -> None:
    """Set each layer's factors to ``layers`` (whose scale must be the module's: the factors are copied as they are)."""
    import torch

    with torch.no_grad():
        for key, module in modules.items():
            layer = layers[key]
            for weight, value in ((module.lora_A[adapter].weight, layer.A), (module.lora_B[adapter].weight, layer.B)):
                if tuple(weight.shape) != tuple(value.shape):
                    raise ValueError(f"{key}: factor of shape {tuple(value.shape)} for a {tuple(weight.shape)} weight")
                weight.copy_(value.to(weight.device, weight.dtype))


def train_a(modules: dict[str, Any], trainable: bool, adapter: str = ADAPTER) -> None:
    """``ffa`` freezes every ``A`` (the optimizer then sees only ``B``); the other aggregators train both."""
    for module in modules.values():
        module.lora_A[adapter].weight.requires_grad_(trainable)
        module.lora_B[adapter].weight.requires_grad_(True)


def fresh_layers(template: dict[str, LoraLayer], seed: int) -> dict[str, LoraLayer]:
    """A new adapter shaped like ``template``: ``A`` drawn as peft draws it (Kaiming-uniform, ``a = sqrt(5)``) from
    ``seed``, ``B`` zero, so that every site given the same seed starts from the same adapter."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for key in sorted(template):
        layer = template[key]
        A = torch.empty_like(layer.A)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        layers[key] = LoraLayer(A, torch.zeros_like(layer.B), layer.scale)
    return layers


class BaseOffset:
    """Adds a dense update to the base weights under the LoRA layers, and takes it back: ``stack`` trains each
    round's fresh adapter on the base with the earlier rounds merged in. The original weights are kept."""

    def __init__(self, modules: dict[str, Any]) -> None:
        self.modules = modules
        self.original: dict[str, torch.Tensor] = {}

    def set(self, merged: dict[str, LoraLayer]) -> None:
        """Base weight = original + ``B @ A`` of ``merged`` (scale 1) for every layer in it; the others original."""
        import torch
        from peft.utils import transpose

        with torch.no_grad():
            for key, module in self.modules.items():
                weight = module.get_base_layer().weight
                if key not in self.original:
                    if key not in merged:
                        continue
                    self.original[key] = weight.detach().clone()
                value = self.original[key]
                if key in merged:
                    delta = transpose(merged[key].delta().to(value.device), module.fan_in_fan_out)
                    value = (value.float() + delta).to(value.dtype)
                weight.copy_(value)

    def clear(self) -> None:
        """Every base weight back to its original value."""
        self.set({})
