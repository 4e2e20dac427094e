"""Several adapters on one Whisper: switching between them, and mixed-adapter batches that decode every clip exactly
as its own adapter alone does."""

from __future__ import annotations

import pytest
import torch

from polyadapt.evaluation import evaluating

from .conftest import open_speech_run, write_config, write_dataset

NAMES = ["one", "two", None]


def _two_adapters(tmp_path, tiny_whisper, scope):
    """A run with two different random LoRA adapters attached ("one", "two") and three held-out clips."""
    data = write_dataset(tmp_path / "data", train=2, test=3)
    config = write_config(
        tmp_path / "c.yaml",
        tiny_whisper,
        data,
        tmp_path / "run",
        peft={"init_weights": False},  # random, not identity, so each adapter decodes differently
        speech={"adapter_scope": scope, "max_new_tokens": 12},
    )
    for seed, name in enumerate(NAMES[:2]):
        _, run, _ = open_speech_run(config)
        torch.manual_seed(seed)
        run.add_adapter()
        run.save_adapter(tmp_path / name)
    _, run, splits = open_speech_run(config)
    for name in NAMES[:2]:
        run.load_adapter(tmp_path / name, name)
    return run, [s.audio for s in splits.validation]


def _until_end(rows, eot):
    """Each row up to and including its end token (batches pad finished rows to their longest row)."""
    return [row[: row.index(eot) + 1] if eot in row else row for row in rows]


def test_the_run_declares_and_has_every_capability():
    from polyadapt.modality import BatchedAdapters, Inference, MultiAdapter, ReportSections, capability_problems
    from polyadapt.plugins import get_plugin_manager

    modality = get_plugin_manager().get_modality("speech")
    assert modality.capabilities == {"inference", "report", "multi_adapter", "batched_adapters"}
    assert capability_problems(modality) == []
    for protocol in (Inference, ReportSections, MultiAdapter, BatchedAdapters):
        assert issubclass(modality.run_class, protocol)


def test_adapters_switch_and_delete_without_reloading_the_base(tmp_path, tiny_whisper):
    run, clips = _two_adapters(tmp_path, tiny_whisper, "both")
    assert run.adapter_names() == ["one", "two"]
    prefix = run.sequences.prefix(None)
    with evaluating(run):
        ids = {}
        for name in NAMES:
            run.set_adapter(name)
            ids[name] = _until_end(run.generate_ids(clips, prefix, 1).tolist(), run.tokens.eot)
        run.set_adapter("one")
        run.delete_adapter("one")  # the active one: "two" takes over
        assert run.adapter_names() == ["two"]
        assert _until_end(run.generate_ids(clips, prefix, 1).tolist(), run.tokens.eot) == ids["two"]
    assert ids["one"] != ids["two"] and ids["one"] != ids[None] and ids["two"] != ids[None]


@pytest.mark.parametrize(
    ("scope", "beams"),
    [("both", 1), ("both", 2), ("decoder", 1), ("decoder", 2)],
    ids=["greedy", "beams", "decoder-greedy", "decoder-beams"],
)
def test_a_mixed_adapter_batch_decodes_each_clip_as_its_adapter_alone(tmp_path, tiny_whisper, scope, beams):
    """Row i under run.adapter_batch(names) gives the tokens adapter names[i] gives alone, greedy and with beams;
    decoder-only adapters share the frozen encoder's cached outputs."""
    run, clips = _two_adapters(tmp_path, tiny_whisper, scope)
    prefix = run.sequences.prefix(None)
    eot = run.tokens.eot
    with evaluating(run):
        alone, alone_texts = {}, {}
        for name in NAMES:
            run.set_adapter(name)
            alone[name] = _until_end(run.generate_ids(clips, prefix, beams).tolist(), eot)
            alone_texts[name] = run.transcribe(clips, num_beams=beams)
        # the last adapter set is None (the base alone): the mixed batch still uses every row's adapter
        with run.adapter_batch(NAMES):
            mixed = _until_end(run.generate_ids(clips, prefix, beams).tolist(), eot)
        # the transcription loop reorders and batches clips; it gives each batch its own rows
        texts = run.transcribe(clips, adapters=NAMES, num_beams=beams)
        assert run.row_adapters is None
        # and afterwards the base alone again, as set
        assert _until_end(run.generate_ids(clips, prefix, beams).tolist(), eot) == alone[None]
    assert len({tuple(map(tuple, rows)) for rows in alone.values()}) == 3  # the three really decode differently
    assert mixed == [alone[name][row] for row, name in enumerate(NAMES)]
    assert texts == [alone_texts[name][row] for row, name in enumerate(NAMES)]
    if scope == "decoder":
        assert run.encoder_cache.hits > 0


def test_a_mixed_batch_naming_an_unknown_adapter_is_refused(tmp_path, tiny_whisper):
    from polyadapt.errors import ConfigError

    run, clips = _two_adapters(tmp_path, tiny_whisper, "both")
    with evaluating(run), pytest.raises(ConfigError, match="no adapter named three"):
        run.transcribe(clips, adapters=["one", "three", None])
