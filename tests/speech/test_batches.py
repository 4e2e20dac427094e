"""Labels, prefixes, prompts, packing and augmentation switches of the speech modality's batches."""

from __future__ import annotations

import pytest
import torch

from .conftest import write_config, write_dataset


def _setup(tmp_path, tiny_whisper, **speech):
    from polyadapt.config import load_config
    from polyadapt.lifecycle import resolve_base
    from polyadapt.modality import RunContext
    from polyadapt.plugins import get_plugin_manager

    data = write_dataset(tmp_path / "data", train=4, test=1)
    config = load_config(write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run", speech=speech))
    modality = get_plugin_manager().get_modality("speech")
    ctx = RunContext(config=config, base=resolve_base(config.base), device=torch.device("cpu"), dtype=torch.float32)
    bundle = modality.load_base(ctx)
    splits = modality.load_data(config, config.data.path)
    return modality, bundle, ctx, splits


def test_labels_learn_text_and_end_only(tmp_path, tiny_whisper):
    modality, bundle, ctx, splits = _setup(tmp_path, tiny_whisper)
    tokens = bundle.components["tokens"]
    prepared = modality.prepare(bundle, splits.train, ctx, training=True)
    assert prepared.lengths == [len(item["sequence"]) for item in prepared.items]
    batch = modality.collate(bundle, prepared.items[:2], training=False)
    first = prepared.items[0]["sequence"]
    assert first[:2] == [tokens.sot, tokens.no_timestamps]  # English-only: no language or task token
    assert first[-1] == tokens.eot
    labels, inputs = batch["labels"][0], batch["decoder_input_ids"][0]
    assert inputs[: len(first) - 1].tolist() == first[:-1]
    # the given <|notimestamps|> is not a target; every text token and the end token are
    assert labels[0].item() == -100
    assert labels[1 : len(first) - 1].tolist() == first[2:]
    text = bundle.processor.tokenizer.decode(first[2:-1])
    assert text == " " + splits.train[0].text
    assert batch["audio"].shape[0] == 2


def test_glossary_prompt_precedes_the_prefix_and_is_not_learned(tmp_path, tiny_whisper):
    modality, bundle, ctx, splits = _setup(tmp_path, tiny_whisper, prompt_glossary=True)
    tokens = bundle.components["tokens"]
    item = modality.prepare(bundle, splits.train[:1], ctx, training=True).items[0]
    prompt_end = item["sequence"].index(tokens.sot)
    assert item["sequence"][0] == tokens.prev and prompt_end > 1
    assert "HarborFlex Checking" in bundle.processor.tokenizer.decode(item["sequence"][1:prompt_end])
    labels = modality.collate(bundle, [item], training=False)["labels"][0]
    assert (labels[: item["first_target"] - 1] == -100).all()
    assert (labels[item["first_target"] - 1 :] != -100).any()


def test_packing_joins_clips_into_fewer_windows(tmp_path, tiny_whisper):
    modality, bundle, ctx, splits = _setup(tmp_path, tiny_whisper, pack_clips=True)
    packed = modality.prepare(bundle, splits.train, ctx, training=True)
    single = modality.prepare(bundle, splits.train, ctx, training=False)
    assert len(single.items) == len(splits.train) == 4
    assert len(packed.items) == 1  # four 3-4 s clips fit one 30 s window
    words = bundle.processor.tokenizer.decode(packed.items[0]["sequence"], skip_special_tokens=True).split()
    assert len(words) == sum(len(s.text.split()) for s in splits.train)
    gap = int(0.4 * 16_000)
    assert len(packed.items[0]["audio"]) == sum(len(s.audio) for s in splits.train) + 3 * gap


@pytest.mark.parametrize(
    "switch",
    [{"specaugment": True}, {"speed_perturb": True, "speed_factors": [0.9, 1.1]}],
    ids=["specaugment", "speed"],
)
def test_augmentation_changes_training_loss_only(tmp_path, tiny_whisper, switch):
    modality, bundle, ctx, splits = _setup(tmp_path, tiny_whisper, **switch)
    items = modality.prepare(bundle, splits.train[:2], ctx, training=True).items
    model = bundle.model
    model.eval()
    with torch.no_grad():
        plain = [
            modality.compute_loss(bundle, model, modality.collate(bundle, items, training=False)) for _ in range(2)
        ]
        assert plain[0].item() == plain[1].item()  # evaluation batches are deterministic
        model.train()
        torch.manual_seed(1)
        augmented = modality.compute_loss(bundle, model, modality.collate(bundle, items, training=True))
    assert torch.isfinite(augmented) and augmented.item() != plain[0].item()


def test_features_on_the_cpu_give_the_same_loss(tmp_path, tiny_whisper):
    modality, bundle, ctx, splits = _setup(tmp_path, tiny_whisper, features_on_device=False)
    items = modality.prepare(bundle, splits.train[:2], ctx, training=False).items
    bundle.model.eval()
    cpu_batch = modality.collate(bundle, items, training=False)
    assert "input_features" in cpu_batch and "audio" not in cpu_batch
    bundle.components["settings"] = bundle.components["settings"].model_copy(update={"features_on_device": True})
    device_batch = modality.collate(bundle, items, training=False)
    with torch.no_grad():
        a = modality.compute_loss(bundle, bundle.model, cpu_batch)
        b = modality.compute_loss(bundle, bundle.model, device_batch)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_encoder_cache_reuses_frozen_encoder_outputs_without_changing_the_loss(tmp_path, tiny_whisper):
    modality, bundle, ctx, splits = _setup(tmp_path, tiny_whisper, adapter_scope="decoder")
    cache = bundle.components["encoder_cache"]
    items = modality.prepare(bundle, splits.train[:3], ctx, training=True).items
    modality.add_adapter(bundle, ctx)
    model = bundle.model
    model.train()
    batch = modality.collate(bundle, items, training=True)
    uncached = dict(batch)
    del uncached["clip_keys"]
    first = modality.compute_loss(bundle, model, batch)
    second = modality.compute_loss(bundle, model, batch)
    reference = modality.compute_loss(bundle, model, uncached)
    assert (cache.misses, cache.hits) == (3, 3)
    assert first.item() == pytest.approx(reference.item(), abs=1e-5)
    assert second.item() == pytest.approx(reference.item(), abs=1e-5)
    second.backward()  # gradients reach the decoder adapter through cached encoder states
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_encoder_cache_is_bypassed_when_the_encoder_is_adapted(tmp_path, tiny_whisper):
    modality, bundle, ctx, splits = _setup(tmp_path, tiny_whisper, adapter_scope="both")
    cache = bundle.components["encoder_cache"]
    items = modality.prepare(bundle, splits.train[:2], ctx, training=True).items
    modality.add_adapter(bundle, ctx)
    loss = modality.compute_loss(bundle, bundle.model, modality.collate(bundle, items, training=True))
    loss.backward()
    assert cache.hits == cache.misses == 0
    encoder_lora = [p for n, p in bundle.model.named_parameters() if "lora_" in n and ".encoder." in n]
    assert encoder_lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder_lora)


def test_multilingual_prefix_has_language_and_task_tokens(tiny_whisper):
    from polyadapt.errors import ConfigError
    from polyadapt_speech.model import load_tokenizer, whisper_tokens

    tokenizer = load_tokenizer(tiny_whisper)
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ("<|startoftranscript|>", "<|de|>", "<|en|>", "<|translate|>", "<|transcribe|>", "<|notimestamps|>")
    }
    multilingual = whisper_tokens(tokenizer, vocab_size=51_865)
    assert set(multilingual.languages) == {"en", "de"}
    assert multilingual.prefix("de", "transcribe") == [
        ids["<|startoftranscript|>"],
        ids["<|de|>"],
        ids["<|transcribe|>"],
        ids["<|notimestamps|>"],
    ]
    assert multilingual.prefix(None, "translate")[1:3] == [ids["<|en|>"], ids["<|translate|>"]]
    with pytest.raises(ConfigError, match="'fr' is not one of this model's languages"):
        multilingual.prefix("fr", "transcribe")
    english_only = whisper_tokens(tokenizer, vocab_size=416)
    assert english_only.prefix("en", "transcribe") == [ids["<|startoftranscript|>"], ids["<|notimestamps|>"]]
    with pytest.raises(ConfigError, match="English-only"):
        english_only.prefix("de", "transcribe")


def test_a_clip_in_a_language_the_model_lacks_is_named(tmp_path, tiny_whisper):
    from polyadapt.errors import DataError

    modality, bundle, ctx, splits = _setup(tmp_path, tiny_whisper)
    splits.train[1].language = "de"
    with pytest.raises(DataError) as caught:
        modality.prepare(bundle, splits.train, ctx, training=True)
    assert len(caught.value.problems) == 1
    problem = caught.value.problems[0]
    assert problem.file == splits.train[1].file and problem.line == splits.train[1].line
    assert "English-only" in problem.reason


def test_packing_respects_the_label_budget(tmp_path, tiny_whisper):
    modality, bundle, ctx, splits = _setup(tmp_path, tiny_whisper, pack_clips=True, max_label_length=45)
    packed = modality.prepare(bundle, splits.train, ctx, training=True)
    assert 1 < len(packed.items) < len(splits.train)
    assert all(len(item["sequence"]) - 3 <= 45 for item in packed.items)  # minus <|sot|>, <|notimestamps|>, end


def test_decoder_loss_matches_the_models_own_logits_and_gradients(tmp_path, tiny_whisper):
    """The projection and loss computed together in chunks give the loss and adapter gradients of full logits."""
    from polyadapt_speech.features import log_mel
    from polyadapt_speech.model import decoder_loss

    modality, bundle, ctx, splits = _setup(tmp_path, tiny_whisper)
    items = modality.prepare(bundle, splits.train[:3], ctx, training=True).items
    modality.add_adapter(bundle, ctx)
    model = bundle.model.eval()  # no dropout, so both passes see the same network
    batch = modality.collate(bundle, items, training=False)
    features = log_mel(batch["audio"], bundle.processor.feature_extractor.feature_size)
    inputs = {"input_features": features, "decoder_input_ids": batch["decoder_input_ids"]}
    assert (batch["labels"] == -100).any()  # padding positions are part of the case

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def plain():
        logits = model(**inputs).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))

    expected, expected_grads = loss_and_grads(plain)
    got, got_grads = loss_and_grads(lambda: decoder_loss(model, batch["labels"], **inputs))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected_grads.keys() == got_grads.keys() and expected_grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
