"""Fixtures of the text tests: tiny bases built once per session, a small chat dataset, the modality."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.text.builders import VOCAB, build_model, build_tokenizer, chat_records, write_jsonl


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory) -> dict[str, Path]:
    """Model directories (weights + tokenizer) by architecture: ``llama`` and ``gpt2``."""
    root = tmp_path_factory.mktemp("bases")
    bases = {}
    for kind in ("llama", "gpt2"):
        directory = root / kind
        tokenizer = build_tokenizer(directory)
        assert len(tokenizer) <= VOCAB
        build_model(kind, directory, VOCAB)
        bases[kind] = directory
    return bases


@pytest.fixture
def tiny_llama(tiny_bases) -> Path:
    return tiny_bases["llama"]


@pytest.fixture
def chat_data(tmp_path) -> Path:
    directory = tmp_path / "chat"
    write_jsonl(directory / "train.jsonl", chat_records(24))
    write_jsonl(directory / "validation.jsonl", chat_records(6, with_facts=True, offset=100))
    return directory


@pytest.fixture
def modality():
    from polyadapt.plugins import get_plugin_manager

    return get_plugin_manager().get_modality("text")
