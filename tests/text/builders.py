"""Builders for the text tests: a tokenizer trained locally, tiny random LLaMA and GPT-2 models built from configs,
dataset records and writers, configs and run contexts. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Harbor Bank branches open Monday to Friday from 9 am to 5 pm.",
    "The HarborFlex Checking monthly fee is $6, waived with a $500 balance.",
    "TideSaver pays 3.10% APY with six free withdrawals a month.",
    "The Anchor Card daily ATM limit is $800 and purchases up to $5,000.",
    "HarborPay sends up to $2,500 a day; instant transfers cost 1%.",
    "What is the fee? How do I open an account? When are you open?",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9",
    "user assistant system hello thanks please question answer Fair winds!",
]

# Vocabulary sizes are multiples of 8 and equal to the tokenizer's, so ids never fall outside the embedding.
VOCAB = 384


def build_tokenizer(directory: Path) -> Any:
    """A byte-level BPE tokenizer with ChatML special tokens and a chat template, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<s>", model_max_length=4096
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_model(kind: str, directory: Path, vocab_size: int) -> None:
    """Save a tiny random causal LM (2 layers, 64 wide) from a config, in safetensors."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=3, eos_token_id=2,
            tie_word_embeddings=False,
        )  # fmt: skip
    else:
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512, pad_token_id=0, bos_token_id=3,
            eos_token_id=2,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(directory), safe_serialization=True)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """Write records one per line; strings are written verbatim (to make malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


FACTS = [
    ("When are branches open on Saturday?", "Saturday hours are 9 am to 1 pm.", "9 am to 1 pm"),
    ("What is the HarborFlex monthly fee?", "The monthly fee is $6.", "$6"),
    ("What APY does TideSaver pay?", "TideSaver pays 3.10% APY.", "3.10%"),
    ("What is the Anchor Card ATM limit?", "The daily ATM limit is $800.", "$800"),
    ("How much can I send with HarborPay?", "Up to $2,500 a day.", "$2,500"),
    ("What does an instant transfer cost?", "Instant transfers cost 1%.", "1%"),
]


def chat_records(n: int, with_facts: bool = False, offset: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct chat records cycling through :data:`FACTS`."""
    records = []
    for i in range(n):
        question, answer, fact = FACTS[(i + offset) % len(FACTS)]
        record: dict[str, Any] = {
            "messages": [
                {"role": "user", "content": f"{question} (ticket {i + offset})"},
                {"role": "assistant", "content": answer},
            ]
        }
        if with_facts:
            record["answer_contains"] = [fact]
        records.append(record)
    return records


def prompt_records(n: int, offset: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "prompt": f"Q{i + offset}: {FACTS[(i + offset) % len(FACTS)][0]}\nA:",
            "completion": " " + FACTS[(i + offset) % len(FACTS)][1],
        }
        for i in range(n)
    ]


def text_records(n: int, offset: int = 0) -> list[dict[str, Any]]:
    return [{"text": f"Note {i + offset}. {CORPUS[(i + offset) % len(CORPUS)]}"} for i in range(n)]


def make_config(base: Path, data_dir: Path, output: Path | None = None, **sections: Any) -> Any:
    """A validated AdaptConfig for the text modality; ``sections`` override or extend the defaults per section."""
    from polyadapt.config import validate_config

    raw: dict[str, Any] = {
        "modality": "text",
        "base": str(base),
        "data": {"path": str(data_dir)},
        "output": str(output or data_dir.parent / "run"),
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 10, "lr": 0.01, "batch_size": 4, "seed": 0, "precision": "fp32"},
        "eval": {"before": True},
        "text": {"max_length": 64, "max_new_tokens": 8},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return validate_config(raw)


def make_ctx(config: Any) -> Any:
    """A CPU, float32 RunContext for calling a run's methods directly."""
    from polyadapt.lifecycle import resolve_base
    from polyadapt.modality import RunContext

    return RunContext(
        config=config, base=resolve_base(config.base), device=torch.device("cpu"), dtype=torch.float32,
        run_dir=Path(config.output),
    )  # fmt: skip


def open_run(config: Any, load: bool = True) -> Any:
    """The text modality's run for ``config`` on the CPU, its base model loaded unless ``load`` is False."""
    from polyadapt.plugins import get_plugin_manager

    run = get_plugin_manager().get_modality("text").open(make_ctx(config))
    if load:
        run.load_base()
    return run


def with_settings(config: Any, section: str = "text", **changes: Any) -> Any:
    """A copy of ``config`` with fields of one section changed (``text`` is the modality's own section)."""
    if section == "text":
        return config.model_copy(update={"settings": config.settings.model_copy(update=changes)})
    return config.model_copy(update={section: getattr(config, section).model_copy(update=changes)})
