"""Shared fixtures of the speech tests: a Whisper tokenizer trained locally, a tiny random Whisper (2 layers, 64 wide)
built from a config, and small audiofolder datasets made from the committed sample clips. Nothing is downloaded."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_data" / "speech"

WHISPER_SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|de|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


def sample_rows(split: str) -> list[dict[str, str]]:
    with open(SAMPLES / split / "metadata.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def build_tokenizer(directory: Path) -> Any:
    """A byte-level BPE Whisper tokenizer trained on the sample transcripts, with Whisper's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = [" " + r["transcription"] for split in ("train", "test") for r in sample_rows(split)]
    core.train_from_iterator(corpus * 2, trainer=trainer)
    core.add_special_tokens(WHISPER_SPECIALS)
    directory.mkdir(parents=True, exist_ok=True)
    core.save(str(directory / "tokenizer.json"))
    return WhisperTokenizer.from_pretrained(str(directory), local_files_only=True)


def build_whisper(directory: Path, seed: int = 0) -> None:
    """Save a tiny random WhisperForConditionalGeneration + processor (transformers layout, safetensors)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    tokenizer = build_tokenizer(directory)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in WHISPER_SPECIALS}
    vocab = -(-len(tokenizer) // 8) * 8
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=96,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=[ids["<|endoftext|>"]],
        suppress_tokens=[],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config.no_timestamps_token_id = None
    model.save_pretrained(str(directory), safe_serialization=True)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer).save_pretrained(
        str(directory)
    )


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    """Directory of a tiny random Whisper in transformers layout."""
    directory = tmp_path_factory.mktemp("tiny-whisper")
    build_whisper(directory)
    return directory


def write_dataset(root: Path, train: int = 6, test: int = 3, glossary: bool = True) -> Path:
    """An audiofolder dataset of the first committed sample clips: train/ and test/ with metadata.csv."""
    for split, count in (("train", train), ("test", test)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = sample_rows(split)[:count]
        for row in rows:
            shutil.copy(SAMPLES / split / row["file_name"], folder / row["file_name"])
        with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file_name", "transcription"])
            writer.writeheader()
            writer.writerows(rows)
    if glossary:
        shutil.copy(SAMPLES / "glossary.txt", root / "glossary.txt")
    return root


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")


def open_speech_run(config_path: Path, load: bool = True) -> tuple[Any, Any, Any]:
    """``(modality, run, splits)`` of a config: the run opened on the CPU with its base loaded (unless ``load`` is
    false) and the dataset read with the base resolved, as ``polyadapt adapt`` does."""
    from polyadapt.config import load_config
    from polyadapt.lifecycle import resolve_base
    from polyadapt.modality import DataContext, RunContext
    from polyadapt.plugins import get_plugin_manager

    config = load_config(config_path)
    modality = get_plugin_manager().get_modality("speech")
    base = resolve_base(config.base)
    splits = modality.load_data(DataContext(config=config, path=Path(config.data.path), base=base))
    run = modality.open(RunContext(config=config, base=base, device=torch.device("cpu"), dtype=torch.float32))
    if load:
        run.load_base()
    return modality, run, splits


def write_config(path: Path, base: Path | str, data_dir: Path, output: Path, **sections: Any) -> Path:
    """A speech config YAML; ``sections`` override or add top-level sections (``train={...}``, ``speech={...}``)."""
    import yaml

    config: dict[str, Any] = {
        "modality": "speech",
        "base": str(base),
        "data": {"path": str(data_dir)},
        "output": str(output),
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 12, "lr": 3e-3, "batch_size": 3, "scheduler": "constant", "precision": "fp32"},
        "eval": {"batch_size": 3},
        "speech": {"max_new_tokens": 24},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path
