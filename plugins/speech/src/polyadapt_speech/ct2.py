"""Reading CTranslate2 (faster-whisper) Whisper models back into transformers weights.

A CTranslate2 model directory holds ``model.bin`` (every variable of the model spec, in CTranslate2's own binary
layout), ``config.json`` (decoding settings: suppressed tokens, language ids, alignment heads), ``tokenizer.json`` and
usually ``vocabulary.txt``/``vocabulary.json``. Only data is read: nothing in the directory is executed.

``model.bin`` layout (little endian), as written by ``ctranslate2.specs.model_spec.ModelSpec._serialize``::

    u32 binary version | str spec name | u32 spec revision | u32 variable count
    per variable: str name | u8 rank | u32 dim * rank | u8 dtype id | u32 byte count | raw bytes
    u32 alias count | per alias: str alias name | str target name

where ``str`` is a u16 length (including a trailing NUL) followed by UTF-8 bytes. dtype ids are float32, int8,
int16, int32, float16, bfloat16 in that order. Quantized linear weights come with a ``<name>_scale`` variable:
CTranslate2 multiplies float weights by the scale before rounding, so dividing by it dequantizes.

The name mapping is the inverse of CTranslate2's ``WhisperLoader`` (converters/transformers.py): attention q/k/v are
fused (self-attention ``linear_0`` = q|k|v, cross-attention ``linear_0`` = q and ``linear_1`` = k|v, the missing k bias
filled with zeros), ``linear_{-1}`` is ``out_proj``, the FFN is ``linear_0``/``linear_1`` = ``fc1``/``fc2`` and layer
norms are ``gamma``/``beta``.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyadapt.errors import ConfigError

_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
SUPPORTED_BINARY_VERSIONS = range(1, 7)


@dataclass
class CT2Model:
    """The raw content of a CTranslate2 ``model.bin``: spec name, revision and every variable (aliases resolved)."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)


def is_ct2_directory(path: Path) -> bool:
    """True for a CTranslate2 model directory (``model.bin`` + a ``config.json`` that is not a transformers config)."""
    path = Path(path)
    if not (path.is_dir() and (path / "model.bin").is_file() and (path / "config.json").is_file()):
        return False
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" not in config


class _Reader:
    def __init__(self, data: memoryview, source: Path):
        self.data, self.pos, self.source = data, 0, source

    def take(self, size: int) -> memoryview:
        if self.pos + size > len(self.data):
            raise ConfigError(f"{self.source}: truncated CTranslate2 model (needs {size} bytes at offset {self.pos})")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.u16()))
        return raw.rstrip(b"\0").decode("utf-8")


def read_model_bin(path: Path) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` into numpy arrays (stored dtypes kept; bfloat16 widened to float32)."""
    path = Path(path)
    data = memoryview(path.read_bytes())
    reader = _Reader(data, path)
    version = reader.u32()
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ConfigError(f"{path}: CTranslate2 binary version {version} is not supported (1 to 6 are)")
    spec = reader.string() if version >= 2 else ""
    revision = reader.u32() if version >= 2 else 1
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.u32()):
        name = reader.string()
        shape = tuple(reader.u32() for _ in range(reader.u8()))
        type_id = reader.u8()
        if type_id >= len(_DTYPES):
            raise ConfigError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
        size = reader.u32()
        raw = reader.take(size)
        dtype = _DTYPES[type_id]
        if dtype == "bfloat16":
            # numpy has no bfloat16: the 16 stored bits are the top half of a float32
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).copy()
        expected = int(np.prod(shape)) if shape else 1
        if array.size != expected:
            raise ConfigError(
                f"{path}: variable {name!r} holds {array.size} values, its shape {shape} needs {expected}"
            )
        variables[name] = array.reshape(shape)
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(reader.u32()):
            alias, target = reader.string(), reader.string()
            aliases[alias] = target
    for alias, target in aliases.items():
        if target not in variables:
            raise ConfigError(f"{path}: alias {alias!r} points to the missing variable {target!r}")
        variables[alias] = variables[target]
    return CT2Model(spec=spec, revision=revision, variables=variables, aliases=aliases)


def variable_shapes(path: Path, names: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The shapes of the variables ``names`` of a ``model.bin``, read from the headers alone (the tensor bytes are
    skipped, not read): enough to know a model's vocabulary and decoder length without loading it."""
    path = Path(path)
    wanted, shapes = set(names), {}
    with open(path, "rb") as handle:

        def take(size: int) -> bytes:
            chunk = handle.read(size)
            if len(chunk) != size:
                raise ConfigError(f"{path}: truncated CTranslate2 model (needs {size} bytes at offset {handle.tell()})")
            return chunk

        def u32() -> int:
            return struct.unpack("<I", take(4))[0]

        def string() -> str:
            return take(struct.unpack("<H", take(2))[0]).rstrip(b"\0").decode("utf-8")

        version = u32()
        if version not in SUPPORTED_BINARY_VERSIONS:
            raise ConfigError(f"{path}: CTranslate2 binary version {version} is not supported (1 to 6 are)")
        if version >= 2:
            string(), u32()
        for _ in range(u32()):
            name = string()
            shape = tuple(u32() for _ in range(take(1)[0]))
            take(1)  # dtype id
            handle.seek(u32(), 1)
            if name in wanted:
                shapes[name] = shape
                if len(shapes) == len(wanted):
                    return shapes
    missing = sorted(wanted - set(shapes))
    raise ConfigError(f"{path}: CTranslate2 model has no variable {', '.join(missing)}")


def dequantized(model: CT2Model) -> dict[str, np.ndarray]:
    """Every weight as float32: int8/int16 weights divided by their ``*_scale``, float16/bfloat16 widened."""
    out: dict[str, np.ndarray] = {}
    for name, value in model.variables.items():
        if name.endswith("_scale"):
            continue
        scale = model.variables.get(f"{name}_scale")
        if scale is None and name in model.aliases:
            # aliases are made before quantization, so an alias's scale is its target's
            scale = model.variables.get(f"{model.aliases[name]}_scale")
        if scale is not None and value.dtype in (np.int8, np.int16):
            values = value.astype(np.float32)
            scale = scale.astype(np.float32)
            if scale.ndim == 0 or scale.size == 1:
                values = values / scale.reshape(())
            else:
                values = values / scale.reshape((-1,) + (1,) * (values.ndim - 1))
            out[name] = values
        elif value.dtype in (np.float16, np.float32) and value.ndim > 0:
            out[name] = value.astype(np.float32)
        else:
            out[name] = value
    return out


def _layer_count(variables: dict[str, Any], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    return max(indices) + 1 if indices else 0


def whisper_state_dict(weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Map CTranslate2 Whisper variables to ``WhisperForConditionalGeneration`` parameter names.

    :return: ``(state_dict, dims)`` where ``dims`` holds the architecture sizes read from the tensors.
    """
    state: dict[str, np.ndarray] = {}

    def put(target: str, source: str) -> None:
        if source not in weights:
            raise ConfigError(f"CTranslate2 model: variable {source!r} is missing")
        state[target] = weights[source]

    def norm(target: str, source: str) -> None:
        put(f"{target}.weight", f"{source}/gamma")
        put(f"{target}.bias", f"{source}/beta")

    def linear(target: str, source: str, bias: bool = True) -> None:
        put(f"{target}.weight", f"{source}/weight")
        if bias:
            put(f"{target}.bias", f"{source}/bias")

    def split(targets: list[str], source: str, biased: list[bool]) -> None:
        weight = weights[f"{source}/weight"]
        bias = weights.get(f"{source}/bias")
        parts = len(targets)
        rows = weight.shape[0] // parts
        for i, (target, has_bias) in enumerate(zip(targets, biased, strict=True)):
            state[f"{target}.weight"] = weight[i * rows : (i + 1) * rows]
            if has_bias:
                if bias is None:
                    raise ConfigError(f"CTranslate2 model: {source}/bias is missing")
                state[f"{target}.bias"] = bias[i * rows : (i + 1) * rows]

    def self_attention_and_ffn(src: str, dst: str) -> None:
        """The parts encoder and decoder layers share: self-attention (fused q/k/v) and the feed-forward block."""
        attn = f"{dst}.self_attn"
        split(
            [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"],
            f"{src}/self_attention/linear_0",
            [True, False, True],
        )
        linear(f"{attn}.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")

    enc_layers = _layer_count(weights, "encoder")
    dec_layers = _layer_count(weights, "decoder")
    if not enc_layers or not dec_layers:
        raise ConfigError("CTranslate2 model: no encoder/decoder layers found (is it a Whisper model?)")

    put("model.encoder.conv1.weight", "encoder/conv1/weight")
    put("model.encoder.conv1.bias", "encoder/conv1/bias")
    put("model.encoder.conv2.weight", "encoder/conv2/weight")
    put("model.encoder.conv2.bias", "encoder/conv2/bias")
    put("model.encoder.embed_positions.weight", "encoder/position_encodings/encodings")
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    for i in range(enc_layers):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        self_attention_and_ffn(src, dst)

    put("model.decoder.embed_tokens.weight", "decoder/embeddings/weight")
    put("model.decoder.embed_positions.weight", "decoder/position_encodings/encodings")
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(dec_layers):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        self_attention_and_ffn(src, dst)
        cross = f"{dst}.encoder_attn"
        linear(f"{cross}.q_proj", f"{src}/attention/linear_0")
        split([f"{cross}.k_proj", f"{cross}.v_proj"], f"{src}/attention/linear_1", [False, True])
        linear(f"{cross}.out_proj", f"{src}/attention/linear_2")
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
    projection = "decoder/projection/weight"
    state["proj_out.weight"] = weights[projection] if projection in weights else weights["decoder/embeddings/weight"]

    embeddings = weights["decoder/embeddings/weight"]
    dims = {
        "vocab_size": int(embeddings.shape[0]),
        "d_model": int(embeddings.shape[1]),
        "num_mel_bins": int(weights["encoder/conv1/weight"].shape[1]),
        "encoder_layers": enc_layers,
        "decoder_layers": dec_layers,
        "encoder_attention_heads": int(weights["encoder/num_heads"]),
        "decoder_attention_heads": int(weights["decoder/num_heads"]),
        "encoder_ffn_dim": int(weights["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(weights["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(weights["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(weights["decoder/position_encodings/encodings"].shape[0]),
    }
    return state, dims
