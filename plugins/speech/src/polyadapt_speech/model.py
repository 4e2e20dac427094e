"""Loading Whisper bases (transformers or CTranslate2 directories, hub ids), their tokens, adapter targets and the
frozen-encoder cache. Adapters are saved and loaded by :class:`polyadapt.peft_run.PeftRun`.

Every import of transformers/peft happens inside functions: this module sits on the import path of ``plugin.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyadapt.errors import ConfigError
from polyadapt.peft_run import unwrap

from .ct2 import dequantized, is_ct2_directory, read_model_bin, variable_shapes, whisper_state_dict

if TYPE_CHECKING:
    from polyadapt.config import ResolvedBase

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


@dataclass(frozen=True)
class DecoderVocabulary:
    """What measuring a clip's decoder sequence needs: the tokenizer, the special tokens and the decoder's length."""

    tokenizer: Any
    tokens: WhisperTokens
    max_target_positions: int


def read_vocabulary(base: ResolvedBase | None, revision: str | None = None) -> DecoderVocabulary | None:
    """The base's :class:`DecoderVocabulary` read from its files, never its weights (``doctor`` loads no model):
    ``config.json`` of a transformers directory, the tensor shapes in a CTranslate2 ``model.bin`` header, or a hub
    id's files already in the local cache. None when they are not available without a download."""
    if base is None:
        return None
    try:
        if base.path is not None:
            return _local_vocabulary(Path(base.path))
        return _cached_hub_vocabulary(str(base.hub_id), revision)
    except (ConfigError, OSError, ValueError, KeyError):
        return None


def _local_vocabulary(path: Path) -> DecoderVocabulary | None:
    if not path.is_dir() or not any((path / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        return None
    if is_ct2_directory(path):
        shapes = variable_shapes(
            path / "model.bin", ("decoder/embeddings/weight", "decoder/position_encodings/encodings")
        )
        vocab_size = shapes["decoder/embeddings/weight"][0]
        positions = shapes["decoder/position_encodings/encodings"][0]
    else:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        vocab_size, positions = int(config["vocab_size"]), int(config["max_target_positions"])
    tokenizer = load_tokenizer(path)
    return DecoderVocabulary(tokenizer, whisper_tokens(tokenizer, vocab_size), positions)


def _cached_hub_vocabulary(hub_id: str, revision: str | None) -> DecoderVocabulary:
    from transformers import WhisperConfig, WhisperTokenizer

    config = WhisperConfig.from_pretrained(hub_id, revision=revision, local_files_only=True)
    tokenizer = WhisperTokenizer.from_pretrained(hub_id, revision=revision, local_files_only=True)
    tokens = whisper_tokens(tokenizer, config.vocab_size)
    return DecoderVocabulary(tokenizer, tokens, config.max_target_positions)


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


def encoder_is_frozen(model: Any) -> bool:
    """True when the encoder's output is a fixed function of its input: no trainable or adapter parameters in it and
    no dropout or layer drop active. Only then may its outputs be cached."""
    core = unwrap(model)
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

        core = unwrap(model)
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
