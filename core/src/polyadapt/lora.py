"""LoRA adapters on disk as factors per layer, in either of the two layouts polyadapt writes: a PEFT directory
(``adapter_config.json`` + ``adapter_model.safetensors``: text and speech) and a diffusers LoRA file
(``pytorch_lora_weights.safetensors`` with per-component ``lora_adapter_metadata``: images).

Every layer is read as ``(A, B, scale)`` with the update it makes to the base weight ``delta = scale * B @ A``, the
scale being ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA, per-layer ``alpha_pattern`` honoured). Composition works
on these updates, so it never depends on how a parent scaled its factors. What is not a plain LoRA on linear layers
(DoRA's magnitude vectors, IA3 scaling vectors, prefix tuning, embedding or convolution LoRA, ``modules_to_save``) is
refused naming the adapter, the type and the key, because a sum of updates does not describe it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
#: factor suffixes: (A, B) in PEFT's names and in diffusers' older ``lora.down``/``lora.up`` names
SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"))


@dataclass
class LoraLayer:
    """One adapted linear layer: ``A`` (r x in), ``B`` (out x r) and the scale of ``B @ A``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """The update to the base weight, in float32."""
        return self.scale * (self.B.float() @ self.A.float())


@dataclass
class LoraAdapter:
    """An adapter's layers by key (the tensor name without the factor suffix), its layout and its own config."""

    source: str
    layout: Literal["peft", "diffusers"]
    layers: dict[str, LoraLayer]
    #: PEFT: adapter_config.json; diffusers: the metadata mapping (``"<component>.<field>": value``)
    config: dict[str, Any]
    suffixes: tuple[str, str] = SUFFIXES[0]
    dtype: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ranks(self) -> set[int]:
        return {layer.rank for layer in self.layers.values()}


def read_adapter(directory: Path, label: str | None = None) -> LoraAdapter:
    """Read the LoRA in a run or adapter directory; anything composition cannot describe exactly is a
    :class:`ConfigError` naming ``label`` and why."""
    directory = Path(directory)
    label = label or str(directory)
    if (directory / PEFT_CONFIG).is_file() and (directory / PEFT_WEIGHTS).is_file():
        return _read_peft(directory, label)
    if (directory / DIFFUSERS_WEIGHTS).is_file():
        return _read_diffusers(directory, label)
    raise ConfigError(f"{label}: no LoRA adapter found ({PEFT_CONFIG} + {PEFT_WEIGHTS}, or {DIFFUSERS_WEIGHTS})")


def _read_peft(directory: Path, label: str) -> LoraAdapter:
    from safetensors.torch import load_file

    config = json.loads((directory / PEFT_CONFIG).read_text(encoding="utf-8"))
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        raise ConfigError(f"{label}: a {kind.lower() or 'non-LoRA'} adapter; composition needs LoRA (its updates add)")
    _refuse_unsupported(config, label)
    tensors = load_file(str(directory / PEFT_WEIGHTS))
    layers, suffixes = _pairs(tensors, label)
    for key, (a, b) in layers.items():
        layers[key] = LoraLayer(a, b, _scale(config, key, a.shape[0]))
    dtype = next(iter(tensors.values())).dtype if tensors else None
    return LoraAdapter(label, "peft", layers, config, suffixes, dtype)


def _read_diffusers(directory: Path, label: str) -> LoraAdapter:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = directory / DIFFUSERS_WEIGHTS
    with safe_open(str(path), "pt") as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
    metadata = json.loads(raw) if raw else {}
    tensors = load_file(str(path))
    alphas = [k for k in tensors if k.endswith(".alpha")]
    if alphas:
        raise ConfigError(f"{label}: network-alpha tensors ({alphas[0]}...) are not a layout compose reads")
    components = sorted({key.split(".", 1)[0] for key in tensors})
    for component in components:
        _refuse_unsupported(_component_config(metadata, component), f"{label} ({component})")
    layers, suffixes = _pairs(tensors, label)
    for key, (a, b) in layers.items():
        component, _, inner = key.partition(".")
        own = _component_config(metadata, component)
        layers[key] = LoraLayer(a, b, _scale(own, inner, a.shape[0]) if own else 1.0)
    dtype = next(iter(tensors.values())).dtype if tensors else None
    return LoraAdapter(label, "diffusers", layers, metadata, suffixes, dtype)


def _component_config(metadata: dict[str, Any], component: str) -> dict[str, Any]:
    prefix = f"{component}."
    return {k[len(prefix) :]: v for k, v in metadata.items() if k.startswith(prefix)}


def _refuse_unsupported(config: dict[str, Any], label: str) -> None:
    if config.get("use_dora"):
        raise ConfigError(
            f"{label}: a DoRA adapter; its magnitude vectors rescale the merged weight, so no sum of updates equals "
            "a composition of DoRA adapters"
        )
    if config.get("modules_to_save"):
        raise ConfigError(f"{label}: modules_to_save {config['modules_to_save']} are full copies, not LoRA updates")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise ConfigError(f"{label}: a {kind.lower()} adapter; composition needs LoRA")


def _pairs(tensors: dict[str, torch.Tensor], label: str) -> tuple[dict[str, Any], tuple[str, str]]:
    layers: dict[str, Any] = {}
    used: tuple[str, str] | None = None
    for key in sorted(tensors):
        for down, up in SUFFIXES:
            if key.endswith(down):
                prefix = key[: -len(down)]
                if prefix + up not in tensors:
                    raise ConfigError(f"{label}: {key} has no matching {prefix + up}")
                a, b = tensors[key], tensors[prefix + up]
                if a.dim() != 2 or b.dim() != 2:
                    raise ConfigError(f"{label}: {key} is a {a.dim()}-d LoRA factor; compose handles linear layers")
                layers[prefix] = (a, b)
                used = (down, up)
                break
        else:
            if not any(key.endswith(up) for _, up in SUFFIXES):
                raise ConfigError(f"{label}: {key} is not a LoRA factor of a linear layer; compose cannot describe it")
    if not layers:
        raise ConfigError(f"{label}: the adapter holds no LoRA layers")
    return layers, used or SUFFIXES[0]


def _pattern_value(patterns: dict[str, Any], key: str) -> Any:
    """peft's rule for ``rank_pattern``/``alpha_pattern``: a pattern matches a module name ending in it."""
    module = key
    for marker in ("base_model.model.",):
        module = module.removeprefix(marker)
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _scale(config: dict[str, Any], key: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, key)
    if alpha is None:
        alpha = config.get("lora_alpha", rank)
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def write_adapter(directory: Path, like: LoraAdapter, layers: dict[str, LoraLayer], rank: int) -> list[str]:
    """Write ``layers`` (each of rank ``rank`` with scale 1 folded into ``B``) in ``like``'s layout; return the file
    names written. The config says ``r = lora_alpha = rank`` (scale 1), without rank or alpha patterns."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    down, up = like.suffixes
    dtype = like.dtype if like.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    tensors = {}
    for key, layer in sorted(layers.items()):
        if abs(layer.scale - 1.0) > 1e-12:
            raise ValueError("write_adapter expects scale 1 layers")
        tensors[key + down] = layer.A.to(dtype).contiguous()
        tensors[key + up] = layer.B.to(dtype).contiguous()
    modules = sorted({_module_leaf(key) for key in layers})
    if like.layout == "peft":
        config = dict(like.config)
        config.update(
            r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={}, target_modules=modules,
            use_dora=False, lora_dropout=0.0,
        )  # fmt: skip
        save_file(tensors, str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})
        (directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return [PEFT_CONFIG, PEFT_WEIGHTS]
    metadata = dict(like.config)
    for component in sorted({key.split(".", 1)[0] for key in layers}):
        inner = sorted({_module_leaf(k.split(".", 1)[1]) for k in layers if k.startswith(component + ".")})
        metadata.update({
            f"{component}.r": rank, f"{component}.lora_alpha": rank, f"{component}.use_rslora": False,
            f"{component}.rank_pattern": {}, f"{component}.alpha_pattern": {}, f"{component}.use_dora": False,
            f"{component}.target_modules": inner, f"{component}.peft_type": "LORA",
        })  # fmt: skip
    save_file(
        tensors, str(directory / DIFFUSERS_WEIGHTS), metadata={"format": "pt", METADATA_KEY: json.dumps(metadata)}
    )
    return [DIFFUSERS_WEIGHTS]


def _module_leaf(key: str) -> str:
    """The target-module name peft matches: the last component, or the last two for ``to_out.0``-style names."""
    parts = key.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
