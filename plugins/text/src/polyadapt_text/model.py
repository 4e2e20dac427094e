"""Loading causal language models (hub id, local directory, local GGUF file) and choosing adapter targets. Adapters
are attached, saved and loaded by :class:`polyadapt.peft_run.PeftRun`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyadapt.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from polyadapt.config import ResolvedBase
    from polyadapt.modality import RunContext


def base_location(base: ResolvedBase) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` should look, and the extra keyword arguments that location needs.

    A ``.gguf`` file is loaded (and dequantised) by transformers from its directory with ``gguf_file``. A directory
    that holds no ``config.json`` but exactly one GGUF file is treated as that file.
    """
    if base.path is None:
        return str(base.hub_id), {}
    path = Path(base.path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(
                f"base: {base.reference!r} is a file but not a .gguf model; give a model directory instead"
            )
        return str(path.parent), {"gguf_file": path.name}
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), {"gguf_file": ggufs[0].name}
        hint = f"; it holds {len(ggufs)} .gguf files, name one of them" if ggufs else ""
        raise ConfigError(f"base: {base.reference!r} has no config.json{hint}")
    return str(path), {}


def load_causal_lm(ctx: RunContext) -> tuple[Any, Any, dict[str, Any]]:
    """The base causal LM, its tokenizer and what the manifest records of them. Weights load in float32: mixed
    precision is the training loop's job, and adapter training and merging stay exact in full precision."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, extra = base_location(ctx.base)
    common: dict[str, Any] = {"trust_remote_code": ctx.config.trust_remote_code, **extra}
    if ctx.base.hub_id is not None and ctx.config.base_revision:
        common["revision"] = ctx.config.base_revision
    settings = ctx.settings
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **common)
        model_kwargs: dict[str, Any] = {"dtype": torch.float32}
        if "gguf_file" in extra:
            from transformers import GgufConfig

            # dense weights: trainable, mergeable and savable (kept-quantized GGUF blocks are none of these)
            model_kwargs["quantization_config"] = GgufConfig(gguf_file=extra["gguf_file"], dequantize=True)
        else:
            # pickle checkpoints (pytorch_model.bin) can run code when read; only safetensors are accepted
            model_kwargs["use_safetensors"] = True
        if settings.attn_implementation:
            model_kwargs["attn_implementation"] = settings.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(location, **common, **model_kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base: cannot load {ctx.base.reference!r} as a causal language model: {exc}") from exc
    configure_tokenizer(tokenizer, settings)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    info = {
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "chat_template": bool(tokenizer.chat_template),
        **({"gguf_file": extra["gguf_file"]} if "gguf_file" in extra else {}),
    }
    return model, tokenizer, info


def configure_tokenizer(tokenizer: Any, settings: Any) -> None:
    """Padding token, and the chat template override from ``text.chat_template`` (a Jinja string or a file)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("base: the tokenizer has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    template = settings.chat_template
    if template:
        candidate = Path(template)
        if "{" not in template and candidate.suffix in (".jinja", ".j2", ".txt"):
            if not candidate.is_file():
                raise ConfigError(f"text.chat_template: file {template!r} does not exist")
            template = candidate.read_text(encoding="utf-8")
        tokenizer.chat_template = template


def decoder_blocks_prefix(model: torch.nn.Module) -> str:
    """Dotted name of the model's stack of repeated decoder blocks: the longest ``ModuleList`` of same-typed modules."""
    import torch

    best, best_len = "", 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > best_len:
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                best, best_len = name, len(module)
    if not best_len:
        raise ConfigError(
            f"peft.target_modules: cannot find the decoder blocks of {type(model).__name__}; list target_modules"
        )
    return best


def auto_target_modules(model: torch.nn.Module) -> list[str]:
    """Every linear projection inside the decoder blocks (attention and MLP), as peft name suffixes.

    Found from the module tree, not from a list of names per architecture: embeddings and the output head live outside
    the blocks and are never chosen.
    """
    from polyadapt.adapters import linear_module_names

    prefix = decoder_blocks_prefix(model) + "."
    names = linear_module_names(model, include=[prefix])
    if not names:
        raise ConfigError(f"peft.target_modules: {type(model).__name__} has no linear layers in its decoder blocks")
    return names
