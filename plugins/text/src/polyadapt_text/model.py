"""Loading causal language models (hub id, local directory, local GGUF file), choosing adapter targets, and saving
and loading the adapter as a standard PEFT directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyadapt.errors import ConfigError
from polyadapt.modality import ModelBundle

if TYPE_CHECKING:
    import torch

    from polyadapt.config import ResolvedBase
    from polyadapt.modality import RunContext

# Files that make up a PEFT adapter directory; nothing else in the run directory is read back by peft.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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


def load_base_bundle(ctx: RunContext) -> ModelBundle:
    """The base causal LM and its tokenizer. Weights load in float32: mixed precision is the training loop's job, and
    adapter training and merging stay exact in full precision."""
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
    return ModelBundle(model=model, processor=tokenizer, info=info)


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


def attach_adapter(bundle: ModelBundle, ctx: RunContext, targets: list[str]) -> None:
    """Wrap ``bundle.model`` with a fresh causal-LM adapter; turn on gradient checkpointing when asked."""
    from peft import get_peft_model

    from polyadapt.adapters import build_peft_config

    model = bundle.model
    if ctx.config.train.grad_checkpointing:
        # transformers 5 renamed the switch; the old name still works but warns
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    peft_config = build_peft_config(ctx.config.peft, targets, task_type="CAUSAL_LM")
    bundle.model = get_peft_model(model, peft_config)


def save_adapter_dir(model: Any, directory: Path) -> None:
    """The adapter as a PEFT directory: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)


def load_adapter_dir(bundle: ModelBundle, directory: Path) -> None:
    """Attach the adapter saved in ``directory`` to the freshly loaded base model, for inference."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).exists() or not (directory / ADAPTER_WEIGHTS).exists():
        raise ConfigError(f"{directory}: no PEFT adapter here ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} expected)")
    bundle.model = PeftModel.from_pretrained(bundle.model, str(directory), is_trainable=False)
    bundle.model.eval()
