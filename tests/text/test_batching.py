"""Tokenisation, loss masks, truncation and packing."""

from __future__ import annotations

import pytest

from polyadapt.errors import ConfigError
from polyadapt.losses import IGNORE_INDEX
from polyadapt.peft_run import plain_linear_head
from polyadapt_text.batching import (
    collate_items,
    fused_loss_matches,
    mean_loss,
    pack,
    packing_isolated,
    target_logits,
)
from polyadapt_text.data import read_text_dataset
from tests.text.builders import (
    chat_records,
    make_config,
    open_run,
    prompt_records,
    text_records,
    with_settings,
    write_jsonl,
)

torch = pytest.importorskip("torch")


@pytest.fixture
def loaded(tmp_path, tiny_bases):
    """A function: (records, architecture, text settings) -> (run with its base loaded, samples)."""

    def load(records, kind="llama", **text):
        data = tmp_path / "data"
        write_jsonl(data / "train.jsonl", records)
        run = open_run(make_config(tiny_bases[kind], data, text={"max_length": 64, **text}))
        return run, read_text_dataset(data).splits["train"]

    return load


def decoded_targets(tokenizer, item):
    return tokenizer.decode(
        [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != IGNORE_INDEX]
    )


def test_chat_loss_only_on_assistant_replies(loaded):
    run, samples = loaded(chat_records(4))
    prepared = run.prepare(samples, training=True)
    for sample, item in zip(samples, prepared.items, strict=True):
        reply = sample.messages[-1][1]
        # the reply and its end-of-turn token are learned; nothing of the user turn is
        assert decoded_targets(run.tokenizer, item).startswith(reply + "<|im_end|>")
        assert sample.messages[0][1] not in decoded_targets(run.tokenizer, item)
        assert item["labels"][0] == IGNORE_INDEX


def test_multi_turn_chat_learns_every_assistant_turn(loaded):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "second answer"},
        ]
    }
    run, samples = loaded([record, *chat_records(2)])
    item = run.prepare(samples[:1], training=True).items[0]
    learned = decoded_targets(run.tokenizer, item)
    assert "first answer" in learned and "second answer" in learned
    assert "hello" not in learned and "Be brief" not in learned


def test_prompt_completion_masks_the_prompt(loaded):
    run, samples = loaded(prompt_records(3))
    item = run.prepare(samples, training=True).items[0]
    assert decoded_targets(run.tokenizer, item).strip().startswith(samples[0].completion.strip())
    assert samples[0].prompt.strip() not in decoded_targets(run.tokenizer, item)


@pytest.mark.parametrize("records", [chat_records(3), prompt_records(3)], ids=["chat", "prompt_completion"])
def test_completion_only_loss_can_be_switched_off(loaded, records):
    run, samples = loaded(records, completion_only_loss=False)
    item = run.prepare(samples, training=True).items[0]
    assert all(label != IGNORE_INDEX for label in item["labels"])


def test_plain_text_learns_every_token_and_ends_with_eos(loaded):
    run, samples = loaded(text_records(3))
    item = run.prepare(samples, training=True).items[0]
    assert item["labels"] == item["input_ids"]
    assert item["input_ids"][-1] == run.tokenizer.eos_token_id


def test_system_prompt_is_added_to_chats_without_one(loaded):
    run, samples = loaded(chat_records(3), system_prompt="You work at Harbor Bank.")
    item = run.prepare(samples, training=True).items[0]
    assert run.tokenizer.decode(item["input_ids"]).startswith("<|im_start|>system\nYou work at Harbor Bank.")


def test_truncation_is_counted(loaded):
    long = [{"text": "word " * 200}, *text_records(3)]
    run, samples = loaded(long, max_length=32)
    prepared = run.prepare(samples, training=True)
    assert prepared.stats["truncated"] >= 1
    assert max(len(i["input_ids"]) for i in prepared.items) <= 32


def test_sample_whose_reply_is_cut_away_is_dropped_and_counted(loaded):
    record = {"messages": [{"role": "user", "content": "tell me " * 60}, {"role": "assistant", "content": "ok"}]}
    run, samples = loaded([record, *chat_records(3)], max_length=56)
    prepared = run.prepare(samples, training=True)
    assert prepared.stats["dropped_no_target"] == 1
    assert prepared.stats["items"] == len(samples) - 1


def test_pack_fills_rows_without_splitting_samples():
    items = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (5, 3, 7, 2, 6)]
    rows = pack(items, max_length=10)
    # first fit by decreasing length: [7, 3], [6, 2], [5]
    assert sorted(len(r["input_ids"]) for r in rows) == [5, 8, 10]
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][s] == IGNORE_INDEX for s in starts)
    assert sum(r["position_ids"].count(0) for r in rows) == 5


def per_sample_losses(model, batch):
    """Loss of each sample: a row, or a segment of a packed row (positions restart at 0)."""
    import torch.nn.functional as F

    with torch.no_grad():
        logits, targets, where = target_logits(model, batch)
        token_losses = F.cross_entropy(logits.float(), targets, reduction="none")
    if "position_ids" in batch:
        segment = (batch["position_ids"] == 0).long().cumsum(dim=1)
        keys = [(int(r), int(segment[r, c])) for r, c in where]
    else:
        keys = [(int(r), 0) for r, _ in where]
    sums: dict[tuple[int, int], list[float]] = {}
    for key, value in zip(keys, token_losses.tolist(), strict=True):
        sums.setdefault(key, []).append(value)
    return sorted(sum(v) / len(v) for v in sums.values())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_batch_gives_the_same_per_sample_losses(loaded, kind):
    records = chat_records(6) + prompt_records(0)
    run, samples = loaded(records, kind=kind, max_length=128, packing=True)
    model = run.model.eval()
    plain = run.prepare(samples, training=False)  # held-out splits are never packed
    packed = run.prepare(samples, training=True)
    assert len(packed.items) < len(plain.items)
    unpacked_losses = per_sample_losses(model, collate_items(plain.items, run.tokenizer.pad_token_id))
    packed_losses = per_sample_losses(model, collate_items(packed.items, run.tokenizer.pad_token_id))
    assert len(unpacked_losses) == len(packed_losses) == len(samples)
    assert packed_losses == pytest.approx(unpacked_losses, abs=1e-4)


def test_packing_probe_detects_contamination(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    assert packing_isolated(model, 384)[0]

    class Leaky(torch.nn.Module):
        """Ignores position ids and attends across the whole row, as a model without packing support would."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, use_cache=True)

    isolated, gap = packing_isolated(Leaky(model), 384)
    assert not isolated and gap > 1e-3


def test_packing_refused_for_a_model_that_would_mix_samples(loaded, monkeypatch):
    run, samples = loaded(chat_records(4), packing=True)
    monkeypatch.setattr("polyadapt_text.batching.packing_isolated", lambda model, vocab: (False, 0.5))
    with pytest.raises(ConfigError, match="text.packing"):
        run.prepare(samples, training=True)


def test_collate_pads_right_and_marks_padding(loaded):
    run, samples = loaded(chat_records(3))
    items = run.prepare(samples, training=False).items
    batch = run.collate(items, training=False)
    lengths = [len(i["input_ids"]) for i in items]
    assert batch["input_ids"].shape == (len(items), max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_held_out_loss_is_a_per_token_mean(loaded):
    """Batches with different numbers of target tokens: the core's held-out loss equals the mean over all tokens."""
    from accelerate import Accelerator

    from polyadapt.training import evaluate_loss

    records = [{"prompt": f"Question {i}?", "completion": " answer" * (1 + 6 * i)} for i in range(4)]
    run, samples = loaded(records)
    prepared = run.prepare(samples, False)
    token_losses = []
    with torch.no_grad():
        for item in prepared.items:
            batch = collate_items([item], run.tokenizer.pad_token_id)
            logits, targets, _ = target_logits(run.model, batch)
            token_losses.append(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none"))
    expected = float(torch.cat(token_losses).mean())
    measured = evaluate_loss(Accelerator(cpu=True), run, run.model, prepared, batch_size=2)
    assert abs(measured - expected) < 1e-5
    by_sample = sum(float(t.mean()) for t in token_losses) / len(token_losses)
    assert abs(by_sample - expected) > 1e-3  # the case where a per-sample mean would be wrong


def lora_gradients(model, batch, fused):
    model.zero_grad()
    loss = mean_loss(model, batch, fused=fused)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("packing", [False, True])
def test_fused_loss_gives_the_same_loss_and_adapter_gradients(loaded, kind, packing):
    run, samples = loaded(chat_records(6) + prompt_records(3), kind=kind, max_length=128, packing=packing)
    run.add_adapter()
    prepared = run.prepare(samples, training=True)
    assert run.fused_loss is True and prepared.stats["fused_loss"] is True
    assert plain_linear_head(run.model) is not None
    batch = run.collate(prepared.items, training=True)
    run.model.eval()  # GPT-2's dropout would make two passes differ
    plain_loss, plain = lora_gradients(run.model, batch, fused=False)
    fused_loss, fused = lora_gradients(run.model, batch, fused=True)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert plain.keys() == fused.keys() and plain
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    # the run's own loss takes the fused path and still gives the plain value
    torch.testing.assert_close(run.loss(run.model, batch).detach(), plain_loss)


def test_fused_loss_is_not_used_for_a_model_that_transforms_its_logits(tmp_path):
    """Gemma 2 soft-caps its logits after the head: the check finds the gap and the plain loss is kept."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config)
    matches, gap = fused_loss_matches(model, 384)
    assert not matches and gap > 1e-3
    model.config.final_logit_softcapping = None
    assert fused_loss_matches(model, 384)[0]


def test_fused_loss_switch_and_adapted_heads(loaded):
    run, samples = loaded(chat_records(3), fused_loss=False)
    assert run.prepare(samples, training=True).stats["fused_loss"] is False
    assert run.fused_loss is False
    # a LoRA on the output head itself replaces the plain linear layer: nothing to fuse
    adapted_head = open_run(with_settings(run.ctx.config, "peft", target_modules=["lm_head"]))
    adapted_head.add_adapter()
    assert plain_linear_head(adapted_head.model) is None
    assert not fused_loss_matches(adapted_head.model, 384)[0]
