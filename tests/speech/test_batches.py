"""Labels, prefixes, prompts, packing and augmentation switches of the speech modality's batches."""

from __future__ import annotations

import pytest
import torch

from polyadapt.losses import IGNORE_INDEX
from polyadapt_speech.data import SAMPLE_RATE

from .conftest import open_speech_run, write_config, write_dataset


def _setup(tmp_path, tiny_whisper, config=None, **speech):
    data = write_dataset(tmp_path / "data", train=4, test=1)
    sections = {"speech": speech, **(config or {})}
    return open_speech_run(write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run", **sections))


def test_labels_learn_text_and_end_only(tmp_path, tiny_whisper):
    _, run, splits = _setup(tmp_path, tiny_whisper)
    tokens = run.tokens
    prepared = run.prepare(splits.train, training=True)
    assert prepared.lengths == [len(item["sequence"]) for item in prepared.items]
    batch = run.collate(prepared.items[:2], training=False)
    first = prepared.items[0]["sequence"]
    assert first[:2] == [tokens.sot, tokens.no_timestamps]  # English-only: no language or task token
    assert first[-1] == tokens.eot
    labels, inputs = batch["labels"][0], batch["decoder_input_ids"][0]
    assert inputs[: len(first) - 1].tolist() == first[:-1]
    # the given <|notimestamps|> is not a target; every text token and the end token are
    assert labels[0].item() == IGNORE_INDEX
    assert labels[1 : len(first) - 1].tolist() == first[2:]
    text = run.tokenizer.decode(first[2:-1])
    assert text == " " + splits.train[0].text
    assert batch["audio"].shape[0] == 2


def test_glossary_prompt_precedes_the_prefix_and_is_not_learned(tmp_path, tiny_whisper):
    _, run, splits = _setup(tmp_path, tiny_whisper, prompt_glossary=True)
    tokens = run.tokens
    assert "HarborFlex Checking" in run.glossary
    item = run.prepare(splits.train[:1], training=True).items[0]
    prompt_end = item["sequence"].index(tokens.sot)
    assert item["sequence"][0] == tokens.prev and prompt_end > 1
    assert "HarborFlex Checking" in run.tokenizer.decode(item["sequence"][1:prompt_end])
    labels = run.collate([item], training=False)["labels"][0]
    assert (labels[: item["first_target"] - 1] == IGNORE_INDEX).all()
    assert (labels[item["first_target"] - 1 :] != IGNORE_INDEX).any()


def test_packing_joins_clips_into_fewer_windows(tmp_path, tiny_whisper):
    _, run, splits = _setup(tmp_path, tiny_whisper, pack_clips=True)
    packed = run.prepare(splits.train, training=True)
    single = run.prepare(splits.train, training=False)
    assert len(single.items) == len(splits.train) == 4
    assert len(packed.items) == 1  # four 3-4 s clips fit one 30 s window
    words = run.tokenizer.decode(packed.items[0]["sequence"], skip_special_tokens=True).split()
    assert len(words) == sum(len(s.text.split()) for s in splits.train)
    gap = int(0.4 * SAMPLE_RATE)
    assert len(packed.items[0]["audio"]) == sum(len(s.audio) for s in splits.train) + 3 * gap


@pytest.mark.parametrize(
    "switch",
    [{"specaugment": True}, {"speed_perturb": True, "speed_factors": [0.9, 1.1]}],
    ids=["specaugment", "speed"],
)
def test_augmentation_changes_training_loss_only(tmp_path, tiny_whisper, switch):
    _, run, splits = _setup(tmp_path, tiny_whisper, **switch)
    items = run.prepare(splits.train[:2], training=True).items
    model = run.model
    model.eval()
    with torch.no_grad():
        plain = [run.loss(model, run.collate(items, training=False)) for _ in range(2)]
        assert plain[0].item() == plain[1].item()  # evaluation batches are deterministic
        model.train()
        torch.manual_seed(1)
        augmented = run.loss(model, run.collate(items, training=True))
    assert torch.isfinite(augmented) and augmented.item() != plain[0].item()


def test_features_on_the_cpu_give_the_same_loss(tmp_path, tiny_whisper):
    _, run, splits = _setup(tmp_path, tiny_whisper, features_on_device=False)
    items = run.prepare(splits.train[:2], training=False).items
    run.model.eval()
    cpu_batch = run.collate(items, training=False)
    assert "input_features" in cpu_batch and "audio" not in cpu_batch
    run.settings = run.settings.model_copy(update={"features_on_device": True})
    device_batch = run.collate(items, training=False)
    with torch.no_grad():
        a = run.loss(run.model, cpu_batch)
        b = run.loss(run.model, device_batch)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_encoder_cache_reuses_frozen_encoder_outputs_without_changing_the_loss(tmp_path, tiny_whisper):
    _, run, splits = _setup(tmp_path, tiny_whisper, adapter_scope="decoder")
    cache = run.encoder_cache
    items = run.prepare(splits.train[:3], training=True).items
    run.add_adapter()
    model = run.model
    model.train()
    batch = run.collate(items, training=True)
    uncached = dict(batch)
    del uncached["clip_keys"]
    first = run.loss(model, batch)
    second = run.loss(model, batch)
    reference = run.loss(model, uncached)
    assert (cache.misses, cache.hits) == (3, 3)
    assert first.item() == pytest.approx(reference.item(), abs=1e-5)
    assert second.item() == pytest.approx(reference.item(), abs=1e-5)
    second.backward()  # gradients reach the decoder adapter through cached encoder states
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_encoder_cache_is_bypassed_when_the_encoder_is_adapted(tmp_path, tiny_whisper):
    _, run, splits = _setup(tmp_path, tiny_whisper, adapter_scope="both")
    cache = run.encoder_cache
    items = run.prepare(splits.train[:2], training=True).items
    run.add_adapter()
    loss = run.loss(run.model, run.collate(items, training=True))
    loss.backward()
    assert cache.hits == cache.misses == 0
    encoder_lora = [p for n, p in run.model.named_parameters() if "lora_" in n and ".encoder." in n]
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


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_clips_that_reach_prepare_unmeasured_follow_the_bad_sample_policy(tmp_path, tiny_whisper, policy):
    """When the base's tokenizer could not be read with the data, prepare finds the clips the decoder cannot take:
    ``fail`` stops before anything trains, naming each; ``skip`` leaves them out and records them."""
    from polyadapt.errors import DataError

    _, run, splits = _setup(tmp_path, tiny_whisper, config={"data": {"on_bad_sample": policy}})
    splits.train[1].language = "de"
    splits.train[2].text = "word " * 120
    if policy == "fail":
        with pytest.raises(DataError) as caught:
            run.prepare(splits.train, training=True)
        problems = [p.as_dict() for p in caught.value.problems]
    else:
        prepared = run.prepare(splits.train, training=True)
        assert len(prepared.items) == 2
        problems = prepared.stats["bad_samples_skipped"]
    assert [(p["file"], p["line"]) for p in problems] == [(s.file, s.line) for s in splits.train[1:3]]
    assert "English-only" in problems[0]["reason"]
    # the tiny decoder holds 96 positions: <|startoftranscript|> <|notimestamps|>, 93 tokens, the end token
    assert "more than the decoder allows (93)" in problems[1]["reason"]


def test_packing_respects_the_label_budget(tmp_path, tiny_whisper):
    _, run, splits = _setup(tmp_path, tiny_whisper, pack_clips=True, max_label_length=45)
    packed = run.prepare(splits.train, training=True)
    assert 1 < len(packed.items) < len(splits.train)
    assert all(len(item["sequence"]) - 3 <= 45 for item in packed.items)  # minus <|sot|>, <|notimestamps|>, end


def test_decoder_loss_matches_the_models_own_logits_and_gradients(tmp_path, tiny_whisper):
    """The projection and loss computed together in chunks give the loss and adapter gradients of full logits."""
    from polyadapt_speech.batching import decoder_loss
    from polyadapt_speech.features import log_mel

    _, run, splits = _setup(tmp_path, tiny_whisper)
    items = run.prepare(splits.train[:3], training=True).items
    run.add_adapter()
    model = run.model.eval()  # no dropout, so both passes see the same network
    batch = run.collate(items, training=False)
    features = log_mel(batch["audio"], run.n_mels)
    inputs = {"input_features": features, "decoder_input_ids": batch["decoder_input_ids"]}
    assert (batch["labels"] == IGNORE_INDEX).any()  # padding positions are part of the case

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


def test_loss_weight_makes_the_held_out_loss_an_exact_per_token_mean(tmp_path, tiny_whisper):
    """A batch's loss is the loss_weight-weighted mean of its rows' losses, so polyadapt's held-out loss does not
    depend on how the clips are batched."""
    from polyadapt.lifecycle import make_accelerator
    from polyadapt.training import evaluate_loss

    _, run, splits = _setup(tmp_path, tiny_whisper)
    prepared = run.prepare(splits.train, training=False)
    lengths = {len(item["sequence"]) for item in prepared.items}
    assert len(lengths) > 1  # rows of different lengths: a per-row mean would weigh them wrongly
    run.model.eval()
    with torch.no_grad():
        whole = run.collate(prepared.items, training=False)
        rows = [run.collate([item], training=False) for item in prepared.items]
        weighted = sum(run.loss(run.model, r).item() * run.loss_weight(r) for r in rows)
        assert run.loss_weight(whole) == sum(run.loss_weight(r) for r in rows)
        assert run.loss(run.model, whole).item() == pytest.approx(weighted / run.loss_weight(whole), rel=1e-5)
    accelerator = make_accelerator(run.ctx.config, tmp_path / "run", trackers=False)
    by_one, by_three = (evaluate_loss(accelerator, run, run.model, prepared, size) for size in (1, 3))
    assert by_one == pytest.approx(by_three, rel=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, tiny_whisper):
    results = []
    for checkpointing in (False, True):
        _, run, splits = _setup(
            tmp_path / str(checkpointing), tiny_whisper, config={"train": {"grad_checkpointing": checkpointing}}
        )
        items = run.prepare(splits.train[:2], training=True).items
        torch.manual_seed(0)
        run.add_adapter()
        model = run.model.train()
        if checkpointing:
            assert run.base_model.is_gradient_checkpointing and not run.base_model.config.use_cache
        for module in model.modules():  # dropout off, so both runs see the same network
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        loss = run.loss(model, run.collate(items, training=False))
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    assert checkpointed == pytest.approx(plain, abs=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_prefix_tuning_is_refused_at_validation_before_any_model_loads(tmp_path, tiny_whisper, monkeypatch):
    import polyadapt
    import polyadapt_speech.model
    from polyadapt.errors import ConfigError

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(polyadapt_speech.model, "load_whisper", no_loading)
    monkeypatch.setattr(polyadapt_speech.model, "read_vocabulary", no_loading)
    data = write_dataset(tmp_path / "data", train=2, test=1)
    config = write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run", peft={"method": "prefix"})
    with pytest.raises(ConfigError) as caught:
        polyadapt.adapt(config)
    assert caught.value.problems == [
        "peft.method: 'prefix' is not supported by the speech modality (supported: lora, dora, ia3)"
    ]
    assert not (tmp_path / "run").exists()
