"""Loading Whisper bases (transformers or CTranslate2 directories, hub ids), adapter targets, adapter save/load.

Every import of transformers/peft happens inside functions: this module sits on the import path of ``plugin.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyadapt.errors import ConfigError

from .ct2 import dequantized, is_ct2_directory, read_model_bin, whisper_state_dict

if TYPE_CHECKING:
    import torch

#: Whisper special tokens the plugin relies on (present in every Whisper tokenizer, English-only or multilingual)
SPECIAL_TOKENS = {
    "eot": "<|endoftext|>",
    "sot": "<|startoftranscript|>",
    "transcribe": "<|transcribe|>",
    "translate": "<|translate|>",
    "prev": "<|startofprev|>",
    "no_timestamps": "<|notimestamps|>",
}
_LANGUAGE_TOKEN = re.compile(r"^<\|([a-z]{2,3}|haw|yue)\|>$")


@dataclass(frozen=True)
class WhisperTokens:
    """Token ids and language table of one Whisper checkpoint.

    ``multilingual`` is False for ``.en`` checkpoints: their decoder prompt is ``<|startoftranscript|>`` then
    ``<|notimestamps|>`` with no language or task token.
    """

    eot: int
    sot: int
    transcribe: int
    translate: int
    prev: int
    no_timestamps: int
    multilingual: bool
    languages: dict[str, int]

    def prefix(self, language: str | None, task: str) -> list[int]:
        """The decoder prefix: ``<|startoftranscript|>`` [language, task] ``<|notimestamps|>``."""
        if not self.multilingual:
            if language not in (None, "en", "english"):
                raise ConfigError(f"language {language!r}: this is an English-only (.en) Whisper model")
            if task != "transcribe":
                raise ConfigError(
                    f"speech.task: {task!r} needs a multilingual Whisper model (this one is English-only)"
                )
            return [self.sot, self.no_timestamps]
        code = language or "en"
        if code not in self.languages:
            raise ConfigError(
                f"language {code!r} is not one of this model's languages ({', '.join(sorted(self.languages))})"
            )
        return [
            self.sot,
            self.languages[code],
            self.transcribe if task == "transcribe" else self.translate,
            self.no_timestamps,
        ]


def whisper_tokens(tokenizer: Any, vocab_size: int) -> WhisperTokens:
    """Read the special token ids from ``tokenizer``; multilingual checkpoints have 51865+ embeddings."""
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[k] for k, v in ids.items() if v is None or v == tokenizer.unk_token_id and k != "eot"]
    if missing:
        raise ConfigError(f"base: the tokenizer lacks Whisper special tokens {missing}")
    multilingual = vocab_size >= 51865
    languages: dict[str, int] = {}
    if multilingual:
        for token, index in tokenizer.get_vocab().items():
            match = _LANGUAGE_TOKEN.match(token)
            if match and ids["sot"] < index < ids["translate"]:
                languages[match.group(1)] = index
    return WhisperTokens(**ids, multilingual=multilingual, languages=languages)


def _generation_config(model_config: Any, tokens: WhisperTokens, extra: dict[str, Any]) -> Any:
    from transformers import GenerationConfig

    gen = GenerationConfig(
        decoder_start_token_id=tokens.sot,
        bos_token_id=tokens.sot,
        eos_token_id=tokens.eot,
        pad_token_id=tokens.eot,
        max_length=model_config.max_target_positions,
        no_timestamps_token_id=tokens.no_timestamps,
        prev_sot_token_id=tokens.prev,
        is_multilingual=tokens.multilingual,
        return_timestamps=False,
        max_initial_timestamp_index=50,
        suppress_tokens=list(extra.get("suppress_tokens") or []),
        begin_suppress_tokens=list(extra.get("begin_suppress_tokens") or [220, tokens.eot]),
    )
    if extra.get("alignment_heads"):
        gen.alignment_heads = [list(pair) for pair in extra["alignment_heads"]]
    if tokens.multilingual:
        gen.lang_to_id = {f"<|{code}|>": index for code, index in tokens.languages.items()}
        gen.task_to_id = {"transcribe": tokens.transcribe, "translate": tokens.translate}
    return gen


def load_tokenizer(directory: Path) -> Any:
    """The Whisper tokenizer of a local directory (``tokenizer.json`` or vocab/merges files); never downloads."""
    from transformers import WhisperTokenizer

    try:
        return WhisperTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base: cannot build the Whisper tokenizer from {directory}: {exc}") from None


def load_ct2_whisper(directory: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Convert a CTranslate2 Whisper directory into ``(WhisperForConditionalGeneration, WhisperProcessor, info)``.

    Weights are dequantized to float32; the tokenizer and processor are built from the directory's own files.
    """
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise ConfigError(f"base: {directory} is a CTranslate2 model without tokenizer.json (needed to decode)")
    raw = read_model_bin(directory / "model.bin")
    if raw.spec and raw.spec != "WhisperSpec":
        raise ConfigError(f"base: {directory} holds a CTranslate2 {raw.spec}, not a Whisper model")
    state, dims = whisper_state_dict(dequantized(raw))
    extra = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(directory)
    tokens = whisper_tokens(tokenizer, dims["vocab_size"])
    config = WhisperConfig(
        **dims,
        pad_token_id=tokens.eot,
        bos_token_id=tokens.eot,
        eos_token_id=tokens.eot,
        decoder_start_token_id=tokens.sot,
        suppress_tokens=list(extra.get("suppress_ids") or []),
        begin_suppress_tokens=list(extra.get("suppress_ids_begin") or [220, tokens.eot]),
        tie_word_embeddings=bool(
            (state["proj_out.weight"] is state["model.decoder.embed_tokens.weight"])
            or (state["proj_out.weight"] == state["model.decoder.embed_tokens.weight"]).all()
        ),
    )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {name: torch.from_numpy(array.copy()) for name, array in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [m for m in missing if m != "proj_out.weight"]
    if missing or unexpected:
        raise ConfigError(
            f"base: {directory}: CTranslate2 weights do not match Whisper (missing {missing}, unexpected {unexpected})"
        )
    model.config._name_or_path = str(directory)
    model.generation_config = _generation_config(
        config,
        tokens,
        {
            "suppress_tokens": extra.get("suppress_ids"),
            "begin_suppress_tokens": extra.get("suppress_ids_begin"),
            "alignment_heads": extra.get("alignment_heads"),
        },
    )
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=dims["num_mel_bins"]), tokenizer=tokenizer
    )
    info = {
        "format": "ctranslate2",
        "ct2_spec_revision": raw.revision,
        "ct2_dtypes": sorted({str(v.dtype) for v in raw.variables.values() if v.ndim > 1}),
    }
    return model.float().eval(), processor, info


def load_whisper(
    location: str | Path, *, revision: str | None = None, trust_remote_code: bool = False
) -> tuple[Any, Any, dict[str, Any]]:
    """Load a Whisper base from a local transformers or CTranslate2 directory, or a hub id.

    :return: ``(model, processor, info)``; ``info`` is recorded in the manifest.
    """
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    path = Path(location)
    if path.exists() and is_ct2_directory(path):
        model, processor, info = load_ct2_whisper(path)
    else:
        if path.exists() and not (path / "config.json").is_file():
            raise ConfigError(
                f"base: {path} is neither a transformers model directory nor a CTranslate2 model directory"
            )
        kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        try:
            model = WhisperForConditionalGeneration.from_pretrained(str(location), **kwargs)
            processor = WhisperProcessor.from_pretrained(str(location), **kwargs)
        except OSError as exc:
            raise ConfigError(f"base: cannot load Whisper from {str(location)!r}: {exc}") from None
        info = {"format": "transformers"}
        if revision:
            info["revision"] = revision
        if getattr(model.generation_config, "no_timestamps_token_id", None) is None:
            tokens = whisper_tokens(processor.tokenizer, model.config.vocab_size)
            model.generation_config = _generation_config(model.config, tokens, model.generation_config.to_dict())
    tokens = whisper_tokens(processor.tokenizer, model.config.vocab_size)
    info.update(
        {
            "architecture": type(model).__name__,
            "multilingual": tokens.multilingual,
            "layers": [model.config.encoder_layers, model.config.decoder_layers],
            "d_model": model.config.d_model,
        }
    )
    return model.eval(), processor, info


def target_modules(model: Any, scope: str = "both") -> list[str]:
    """Adapter targets: the attention and MLP linear layers of the encoder and/or decoder blocks.

    ``scope="both"`` gives leaf names (``q_proj``, ``fc1``...); ``encoder``/``decoder`` give full module names so that
    only that half of the model is adapted.
    """
    import torch

    wanted = {
        "both": (".encoder.layers.", ".decoder.layers."),
        "encoder": (".encoder.layers.",),
        "decoder": (".decoder.layers.",),
    }[scope]
    full: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(part in f".{name}" for part in wanted):
            full.append(name)
    if scope == "both":
        leaves: list[str] = []
        for name in full:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in leaves:
                leaves.append(leaf)
        return leaves
    return full


def save_adapter(model: Any, directory: Path) -> None:
    """Write the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into ``directory``."""
    model.save_pretrained(str(directory), safe_serialization=True)


def load_adapter(model: Any, directory: Path) -> Any:
    """Wrap a freshly loaded base with the adapter saved in ``directory`` (the standard PEFT loader)."""
    from peft import PeftModel

    if not (Path(directory) / "adapter_config.json").is_file():
        raise ConfigError(f"{directory}: no adapter_config.json (not a speech run directory?)")
    return PeftModel.from_pretrained(model, str(directory), is_trainable=False)


def whisper_core(model: Any) -> Any:
    """The ``WhisperForConditionalGeneration`` inside distributed and PEFT wrappers."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def decoder_loss(model: Any, labels: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """Mean cross-entropy of the decoder's predictions against ``labels`` (``-100`` left out).

    The output projection and the loss are computed together, chunk by chunk
    (:func:`polyadapt.losses.linear_cross_entropy`): Whisper's 51,865-way logits for every decoder position are never
    held at once. The model still runs through its own ``forward`` (and any wrapper around it), up to the projection.
    """
    import torch

    from polyadapt.losses import bypass_head, linear_cross_entropy

    head = whisper_core(model).get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # an adapted projection: the model computes its logits itself
        logits = model(**inputs).logits
        return torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
    with bypass_head(head):
        hidden = model(**inputs).logits
    return linear_cross_entropy(hidden, head.weight, labels, head.bias)


def encoder_is_frozen(model: Any) -> bool:
    """True when the encoder's output is a fixed function of its input: no trainable or adapter parameters in it and
    no dropout or layer drop active. Only then may its outputs be cached."""
    core = whisper_core(model)
    encoder = core.model.encoder
    for name, parameter in encoder.named_parameters():
        if parameter.requires_grad or "lora_" in name or "ia3_" in name:
            return False
    if core.training:
        config = core.config
        if any(
            getattr(config, key, 0)
            for key in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop")
        ):
            return False
    return True


class EncoderCache:
    """Encoder outputs of clips, keyed by a hash of the clip's audio, within a byte budget.

    With a frozen encoder (decoder-only adaptation, no audio augmentation) every epoch, the evaluation loss and
    decoding would otherwise run the same 30 s encoder passes again; they are the bulk of the compute.
    """

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self.store: dict[int, Any] = {}
        self.hits = self.misses = 0

    def encode(self, model: Any, audio: Any, keys: list[int], n_mels: int) -> Any:
        """Encoder hidden states ``(batch, frames, width)`` of a padded ``(batch, samples)`` audio tensor; only valid
        while :func:`encoder_is_frozen` holds (the caller checks)."""
        import torch

        from .features import log_mel

        core = whisper_core(model)
        dtype = next(p.dtype for p in core.parameters() if p.is_floating_point())
        missing = [row for row, key in enumerate(keys) if key not in self.store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[int, Any] = {}
        if missing:
            with torch.no_grad():
                hidden = core.model.encoder(log_mel(audio[missing], n_mels).to(dtype)).last_hidden_state
            for row, state in zip(missing, hidden, strict=True):
                fresh[keys[row]] = state
                size = state.numel() * state.element_size()
                if self.used + size <= self.budget:
                    self.store[keys[row]] = state
                    self.used += size
        return torch.stack([self.store[key] if key in self.store else fresh[key] for key in keys])


def clip_key(audio: Any) -> int:
    """A 63-bit content hash of a clip's samples (the encoder cache key)."""
    import hashlib

    import numpy as np

    data = np.ascontiguousarray(audio.numpy() if hasattr(audio, "numpy") else audio, dtype=np.float32).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1
