"""Loading bases (directory, GGUF file, bad references), adapter targets and the plugin's import cost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from polyadapt.errors import ConfigError
from tests.text.builders import CHAT_TEMPLATE, chat_records, make_config, open_run, write_jsonl

torch = pytest.importorskip("torch")


def llama_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's storage order of the rotary q/k rows (what transformers undoes when it reads a GGUF)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_llama_gguf(model_dir: Path, path: Path, quantized: bool = False) -> None:
    """Write the tiny LLaMA of ``model_dir`` (weights, config and BPE tokenizer) as a GGUF file: float32, or with the
    matrices in Q8_0 blocks (``quantized``), as published GGUF models are."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = model.config
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    add_tensor = writer.add_tensor
    if quantized:
        q8 = gguf.GGMLQuantizationType.Q8_0

        def add_tensor(name, array):
            if array.ndim == 2:
                writer.add_tensor(name, gguf.quants.quantize(array, q8), raw_dtype=q8)
            else:
                writer.add_tensor(name, array)

    add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    add_tensor("output_norm.weight", state["model.norm.weight"])
    add_tensor("output.weight", state["lm_head.weight"])
    names = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        add_tensor(
            f"blk.{i}.attn_q.weight",
            llama_permute(state[layer + "self_attn.q_proj.weight"], config.num_attention_heads),
        )
        add_tensor(
            f"blk.{i}.attn_k.weight",
            llama_permute(state[layer + "self_attn.k_proj.weight"], config.num_key_value_heads),
        )
        for gguf_name, hf_name in names.items():
            add_tensor(f"blk.{i}.{gguf_name}.weight", state[layer + hf_name + ".weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_bases, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf"
    write_llama_gguf(tiny_bases["llama"], path)
    return path


def test_gguf_file_loads_with_the_same_weights_and_tokenizer(tiny_gguf, tiny_bases, tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", chat_records(3))
    from_gguf = open_run(make_config(tiny_gguf, tmp_path / "data"))
    from_dir = open_run(make_config(tiny_bases["llama"], tmp_path / "data"))
    assert from_gguf.info["gguf_file"] == tiny_gguf.name
    text = "The Anchor Card daily ATM limit is $800."
    ids = from_dir.tokenizer(text, return_tensors="pt")["input_ids"]
    assert from_gguf.tokenizer(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        expected = from_dir.model(input_ids=ids).logits
        got = from_gguf.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert from_gguf.tokenizer.chat_template == CHAT_TEMPLATE


def test_directory_holding_one_gguf_loads_it(tiny_gguf, tmp_path):
    from polyadapt.config import ResolvedBase
    from polyadapt_text.model import base_location

    assert base_location(ResolvedBase(reference="x", path=tiny_gguf.parent)) == (
        str(tiny_gguf.parent),
        {"gguf_file": tiny_gguf.name},
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "weights.bin").write_bytes(b"x") and d / "weights.bin", "not a .gguf model"),
        (lambda d: d, "has no config.json"),
    ],
    ids=["non-gguf file", "empty directory"],
)
def test_bad_base_references_name_the_problem(tmp_path, make, message):
    from polyadapt.config import ResolvedBase
    from polyadapt_text.model import base_location

    directory = tmp_path / "base"
    directory.mkdir()
    with pytest.raises(ConfigError, match=message):
        base_location(ResolvedBase(reference="base", path=make(directory)))


def test_pickle_weights_are_refused(tiny_bases, tmp_path):
    from transformers import AutoModelForCausalLM

    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    # a pickle checkpoint (written here by the test itself) must never be unpickled by the loader
    torch.save(
        AutoModelForCausalLM.from_pretrained(str(tiny_bases["llama"])).state_dict(), unsafe / "pytorch_model.bin"
    )
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (unsafe / name).write_bytes((tiny_bases["llama"] / name).read_bytes())
    write_jsonl(tmp_path / "data" / "train.jsonl", chat_records(3))
    with pytest.raises(ConfigError, match="cannot load"):
        open_run(make_config(unsafe, tmp_path / "data"))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("gpt2", {"c_attn", "c_proj", "c_fc"}),
    ],
)
def test_auto_targets_are_the_linear_layers_of_the_blocks(tiny_bases, kind, expected):
    from transformers import AutoModelForCausalLM

    from polyadapt_text.model import auto_target_modules

    model = AutoModelForCausalLM.from_pretrained(str(tiny_bases[kind]))
    assert set(auto_target_modules(model)) == expected


def test_plugin_import_stays_light():
    code = "import sys, polyadapt_text.plugin; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("enabled", [True, False])
def test_gradient_checkpointing_follows_the_config(tiny_llama, chat_data, enabled):
    run = open_run(make_config(tiny_llama, chat_data, train={"grad_checkpointing": enabled}))
    run.add_adapter()
    assert bool(getattr(run.base_model, "is_activation_checkpointing", None)) is enabled
    # checkpointing cannot use the KV cache: it is off exactly when checkpointing is on
    assert run.base_model.config.use_cache is not enabled


def test_quantized_gguf_base_adapts_and_exports_merged(tiny_bases, tmp_path, chat_data):
    import polyadapt
    from polyadapt.export import export_run

    path = tmp_path / "gguf" / "tiny-llama.Q8_0.gguf"
    path.parent.mkdir()
    write_llama_gguf(tiny_bases["llama"], path, quantized=True)
    config = make_config(
        path, chat_data, tmp_path / "run", train={"max_steps": 3, "precision": "fp32"}, text={"generate_eval": False}
    )
    run = polyadapt.adapt(config)
    record = export_run(run, "merged", tmp_path / "merged")
    assert record["parity"]["max_abs_logit_gap"] <= record["parity"]["tolerance"]
    assert (tmp_path / "merged" / "model.safetensors").exists()
    # the model card's snippet loads the GGUF base dequantised, as polyadapt did, and the adapter on it
    from polyadapt.lifecycle import load_run
    from tests.text.test_adapter import usage_code

    namespace: dict = {}
    exec(usage_code(run), namespace)
    ids = namespace["tokenizer"]("What is the HarborFlex monthly fee?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = namespace["model"].eval()(input_ids=ids).logits
        ours = load_run(run).run.model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
