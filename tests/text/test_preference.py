"""Preference tuning (DPO, IPO, ORPO, SimPO) in polyadapt's one loop: the losses against hand-computed values, the
first DPO step against TRL's DPOTrainer, reference log-probabilities computed once, resume, lineage, doctor."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import polyadapt
from polyadapt.errors import ConfigError
from tests.text.builders import chat_records, make_config, open_run, write_jsonl

QUESTIONS = [
    "Should I put my savings into tech stocks",
    "Someone used my card without asking, what now",
    "Does an instant HarborPay transfer cost anything",
    "Which crypto coin will go up next month",
]
CHOSEN = [
    "I cannot give investment advice; a licensed adviser can help. Fair winds!",
    "Call the Mooring Line now: a fraud specialist will lock the card. Fair winds!",
    "Yes: instant transfers cost 1%, at most $10. Fair winds!",
    "I cannot give investment advice. Fair winds!",
]
REJECTED = [
    "Yes, tech stocks always go up, buy now.",
    "Just ignore it, it will sort itself out.",
    "Instant transfers are free.",
    "Buy the new coin, it will double.",
]


def pair_records(n: int, offset: int = 0, conversational: bool = True) -> list[dict]:
    records = []
    for i in range(n):
        k = (i + offset) % len(QUESTIONS)
        prompt = f"{QUESTIONS[k]} (ticket {i + offset})?"
        if conversational:
            records.append({
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": CHOSEN[k]}],
                "rejected": [{"role": "assistant", "content": REJECTED[k]}],
            })  # fmt: skip
        else:
            records.append({"prompt": prompt, "chosen": " " + CHOSEN[k], "rejected": " " + REJECTED[k]})
    return records


@pytest.fixture
def pair_data(tmp_path):
    directory = tmp_path / "pairs"
    write_jsonl(directory / "train.jsonl", pair_records(8))
    write_jsonl(directory / "validation.jsonl", pair_records(4, offset=100))
    write_jsonl(directory / "risky_prompts.jsonl", [
        {"prompt": [{"role": "user", "content": "Should I buy shares?"}], "require_any": ["investment advice"],
         "forbid": ["buy now"], "reference": CHOSEN[0], "category": "investment_advice"},
    ])  # fmt: skip
    return directory


def pref_config(base, data, output, objective="dpo", **sections):
    train = {"max_steps": 4, "lr": 0.01, "batch_size": 4, "eval_every": None, "early_stopping_patience": None,
             **sections.pop("train", {})}  # fmt: skip
    text = {"objective": objective, "max_length": 64, "max_new_tokens": 6, **sections.pop("text", {})}
    peft = {"init_weights": False, **sections.pop("peft", {})}
    return make_config(base, data, output, train=train, text=text, peft=peft, **sections)


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- the losses, by hand ---------------------------------------------------------------------------------------------


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


C, R, RC, RR, NC, NR = [-12.0, -7.5, -20.0], [-10.0, -9.0, -18.5], [-11.0, -8.0, -19.0], [-9.5, -9.5, -18.0], [
    6.0, 4.0, 9.0], [5.0, 5.0, 8.0]  # fmt: skip
BETA, GAMMA = 0.3, 0.4


def hand_dpo():
    z = [BETA * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(C, R, RC, RR, strict=True)]
    loss = sum(-math.log(sig(v)) for v in z) / 3
    return loss, [-BETA * sig(-v) / 3 for v in z], [BETA * sig(-v) / 3 for v in z]


def hand_ipo():
    d = [(c - rc) / nc - (r - rr) / nr for c, r, rc, rr, nc, nr in zip(C, R, RC, RR, NC, NR, strict=True)]
    loss = sum((v - 1 / (2 * BETA)) ** 2 for v in d) / 3
    grad_c = [2 * (v - 1 / (2 * BETA)) / nc / 3 for v, nc in zip(d, NC, strict=True)]
    grad_r = [-2 * (v - 1 / (2 * BETA)) / nr / 3 for v, nr in zip(d, NR, strict=True)]
    return loss, grad_c, grad_r


def hand_simpo():
    z = [BETA * (c / nc - r / nr) - GAMMA for c, r, nc, nr in zip(C, R, NC, NR, strict=True)]
    loss = sum(-math.log(sig(v)) for v in z) / 3
    grad_c = [-sig(-v) * BETA / nc / 3 for v, nc in zip(z, NC, strict=True)]
    grad_r = [sig(-v) * BETA / nr / 3 for v, nr in zip(z, NR, strict=True)]
    return loss, grad_c, grad_r


def hand_orpo():
    a = [c / n for c, n in zip(C, NC, strict=True)]
    b = [r / n for r, n in zip(R, NR, strict=True)]
    odds = [(x - y) - (math.log(1 - math.exp(x)) - math.log(1 - math.exp(y))) for x, y in zip(a, b, strict=True)]
    loss = -sum(C) / sum(NC) - BETA * sum(math.log(sig(o)) for o in odds) / 3
    grad_c = [-1 / sum(NC) - BETA / 3 * sig(-o) / (1 - math.exp(x)) / n for o, x, n in zip(odds, a, NC, strict=True)]
    grad_r = [BETA / 3 * sig(-o) / (1 - math.exp(y)) / n for o, y, n in zip(odds, b, NR, strict=True)]
    return loss, grad_c, grad_r


@pytest.mark.parametrize(
    ("objective", "hand"), [("dpo", hand_dpo), ("ipo", hand_ipo), ("simpo", hand_simpo), ("orpo", hand_orpo)]
)
def test_each_objective_matches_its_hand_computed_value_and_gradients(objective, hand):
    from polyadapt_text.preference import PairScores, objective_loss

    chosen = torch.tensor(C, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(R, dtype=torch.float64, requires_grad=True)
    t = torch.tensor
    scores = PairScores(
        chosen=chosen, rejected=rejected, chosen_tokens=t(NC, dtype=torch.float64),
        rejected_tokens=t(NR, dtype=torch.float64), ref_chosen=t(RC, dtype=torch.float64),
        ref_rejected=t(RR, dtype=torch.float64),
    )  # fmt: skip
    loss = objective_loss(objective, scores, BETA, GAMMA)
    loss.backward()
    value, grad_c, grad_r = hand()
    assert loss.item() == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(chosen.grad, torch.tensor(grad_c, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rejected.grad, torch.tensor(grad_r, dtype=torch.float64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("objective", ["dpo", "ipo"])
def test_sft_weight_adds_the_chosen_answers_nll_to_dpo_and_ipo(objective):
    from polyadapt_text.preference import PairScores, objective_loss

    def scores():
        t = torch.tensor
        chosen = t(C, dtype=torch.float64, requires_grad=True)
        rejected = t(R, dtype=torch.float64, requires_grad=True)
        return chosen, rejected, PairScores(
            chosen=chosen, rejected=rejected, chosen_tokens=t(NC, dtype=torch.float64),
            rejected_tokens=t(NR, dtype=torch.float64), ref_chosen=t(RC, dtype=torch.float64),
            ref_rejected=t(RR, dtype=torch.float64),
        )  # fmt: skip

    weight = 0.7
    chosen, rejected, s = scores()
    loss = objective_loss(objective, s, BETA, None, weight)
    loss.backward()
    value, grad_c, grad_r = {"dpo": hand_dpo, "ipo": hand_ipo}[objective]()
    # NLL over every chosen token of the batch: -sum(C) / sum(NC); its gradient is -1 / sum(NC) for each chosen answer
    assert loss.item() == pytest.approx(value + weight * (-sum(C) / sum(NC)), rel=1e-12)
    expected_c = [g - weight / sum(NC) for g in grad_c]
    torch.testing.assert_close(chosen.grad, torch.tensor(expected_c, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rejected.grad, torch.tensor(grad_r, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="text.sft_weight"):
        objective_loss("simpo", scores()[2], BETA, GAMMA, weight)


def test_dpo_needs_reference_log_probabilities():
    from polyadapt_text.preference import PairScores, objective_loss

    scores = PairScores(*(torch.zeros(2) for _ in range(4)))
    with pytest.raises(ConfigError, match="reference"):
        objective_loss("dpo", scores, 0.1)


@pytest.mark.parametrize("fused", [False, True], ids=["plain-head", "fused-head"])
def test_sequence_log_probs_and_their_gradients_match_the_full_logits_on_a_tiny_model(
    tmp_path, tiny_llama, pair_data, fused
):
    """Summed answer log-probs from one forward over [chosen; rejected] (only target positions through the head, or
    the head fused with the loss per row) equal those taken from the model's full logits, and so do the gradients of
    a DPO loss built on them."""
    from polyadapt_text.data import read_jsonl as read_text
    from polyadapt_text.preference import collate_pairs, dpo_loss, sequence_logps, tokenize_pairs

    run = open_run(pref_config(tiny_llama, pair_data, tmp_path / "run"))
    torch.manual_seed(0)
    run.add_adapter()
    samples = read_text(pair_data / "train.jsonl")[0][:3]
    items, _ = tokenize_pairs(samples, run.tokenizer, 64, None)
    batch = collate_pairs(items, run.tokenizer.pad_token_id, with_reference=False)
    ref = torch.tensor([[-30.0, -25.0], [-28.0, -31.0], [-20.0, -22.0]])

    ours = sequence_logps(run.model, batch, fused=fused)
    c, r = ours.chunk(2)
    dpo_loss(c, r, ref[:, 0], ref[:, 1], 0.1).backward()
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad}
    run.model.zero_grad()

    logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token = torch.log_softmax(logits.float(), -1).gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    full = (token * mask).sum(1)
    fc, fr = full.chunk(2)
    dpo_loss(fc, fr, ref[:, 0], ref[:, 1], 0.1).backward()
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(run.model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)


# -- against TRL -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sft_weight", [None, 0.5])
def test_the_first_dpo_step_equals_trl_dpo_trainer(tmp_path, tiny_llama, pair_data, sft_weight):
    """Same tiny model, tokenizer, pairs, beta and initial LoRA weights: polyadapt's first logged DPO loss and
    gradient norm equal TRL's DPOTrainer (PEFT, reference precomputed with the adapter disabled); with
    ``text.sft_weight`` w, TRL's ``loss_type=["sigmoid", "sft"], loss_weights=[1, w]``."""
    pytest.importorskip("trl")
    from accelerate.utils import set_seed
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from polyadapt.adapters import build_peft_config

    records = pair_records(4)
    data = tmp_path / "four"
    write_jsonl(data / "train.jsonl", records)
    write_jsonl(data / "validation.jsonl", pair_records(2, offset=50))
    config = pref_config(tiny_llama, data, tmp_path / "run", train={"max_steps": 1}, eval={"before": False},
                         text={"generate_eval": False, "sft_weight": sft_weight})  # fmt: skip
    first = history(polyadapt.adapt(config))[0]

    start = open_run(config)
    set_seed(config.train.seed)  # as the recipe does right before attaching the adapter
    start.add_adapter()
    initial = {k: v.detach().clone() for k, v in start.model.state_dict().items() if "lora_" in k}
    run = open_run(config)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=1, learning_rate=0.01, beta=0.1,
        precompute_ref_log_probs=True, logging_steps=1, report_to=[], max_length=64, use_cpu=True, seed=0,
        save_strategy="no", bf16=False, fp16=False, disable_tqdm=True,
        **({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight else {}),
    )  # fmt: skip
    trainer = DPOTrainer(
        model=run.model, args=args, train_dataset=Dataset.from_list(records), processing_class=run.tokenizer,
        peft_config=build_peft_config(config.peft, run.resolve_target_modules(), task_type="CAUSAL_LM"),
    )  # fmt: skip
    _, unexpected = trainer.model.load_state_dict(initial, strict=False)
    assert not unexpected and len(initial) > 0
    trainer.train()
    theirs = trainer.state.log_history[0]
    assert abs(first["loss"] - math.log(2)) > 1e-4  # the random LoRA start makes the policy differ from the reference
    assert first["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    assert first["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)


# -- the reference, once ---------------------------------------------------------------------------------------------


def recipe_run(config):
    from polyadapt.plugins import get_plugin_manager
    from polyadapt.recipe import AdaptRecipe

    recipe = AdaptRecipe(config, plugin_manager=get_plugin_manager())
    recipe.run()
    return recipe


def test_reference_log_probs_are_computed_once_before_training_whatever_the_steps(tmp_path, tiny_llama, pair_data):
    counts = {}
    for steps in (2, 6):
        config = pref_config(tiny_llama, pair_data, tmp_path / f"run{steps}", train={"max_steps": steps},
                             text={"generate_eval": False})  # fmt: skip
        recipe = recipe_run(config)
        run = recipe.modality_run
        counts[steps] = run.reference.forward_passes
        prepared = json.loads((tmp_path / f"run{steps}" / "polyadapt.json").read_text())["data"]["prepared"]
        assert prepared["train"]["reference"] == {"model": "the base model", "forward_passes": 2}  # 8 pairs, batch 4
        assert prepared["validation"]["reference"]["forward_passes"] == 1
        assert len(run.reference.logps) == 12
    assert counts[2] == counts[6] == 3
    # the cached values are the base model's log-probabilities (the adapter was fresh: the base is the reference)
    base = open_run(config)
    from polyadapt_text.data import read_jsonl as read_text
    from polyadapt_text.preference import score_items, tokenize_pairs

    items, _ = tokenize_pairs(read_text(pair_data / "train.jsonl")[0], base.tokenizer, 64, None)
    scores = score_items(base.model, items, base.tokenizer.pad_token_id, 8, torch.device("cpu"), torch.float32)
    cached = torch.tensor([run.reference.logps[item["key"]] for item in items])
    torch.testing.assert_close(cached[:, 0], scores.chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cached[:, 1], scores.rejected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("objective", ["ipo", "orpo", "simpo"])
def test_the_other_objectives_train_in_the_same_loop(tmp_path, tiny_llama, pair_data, objective):
    config = pref_config(tiny_llama, pair_data, tmp_path / "run", objective, train={"max_steps": 6, "lr": 0.02},
                         text={"generate_eval": False})  # fmt: skip
    recipe = recipe_run(config)
    manifest = json.loads((tmp_path / "run" / "polyadapt.json").read_text())
    losses = [r["loss"] for r in history(tmp_path / "run") if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    after = manifest["metrics"]["after"]
    assert after["eval_loss"] < manifest["metrics"]["before"]["eval_loss"]
    assert {"preference_accuracy", "reward_margin", "chosen_logp", "rejected_logp"} <= set(after)
    expected_passes = 3 if objective == "ipo" else 0  # ORPO and SimPO need no reference
    assert recipe.modality_run.reference.forward_passes == expected_passes
    assert manifest["config"]["text"]["beta"] == {"ipo": 0.1, "orpo": 0.1, "simpo": 2.0}[objective]


# -- resume ----------------------------------------------------------------------------------------------------------


def test_resume_mid_dpo_gives_the_uninterrupted_adapter(tmp_path, tiny_llama, pair_data, monkeypatch):
    from polyadapt_text.modality import TextRun

    train = {"max_steps": 6, "save_every": 3, "batch_size": 2, "grad_accum": 2}
    reference = polyadapt.adapt(pref_config(tiny_llama, pair_data, tmp_path / "ref", train=train,
                                            text={"generate_eval": False}))  # fmt: skip
    config = pref_config(tiny_llama, pair_data, tmp_path / "crash", train=train, text={"generate_eval": False})
    original = TextRun.loss
    calls = {"train": 0}

    def crashing(self, model, batch):
        if model.training:
            calls["train"] += 1
            if calls["train"] > 4 * 2:  # after step 4 (2 micro-batches a step); step 3 was checkpointed
                raise RuntimeError("killed")
        return original(self, model, batch)

    monkeypatch.setattr(TextRun, "loss", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        polyadapt.adapt(config)
    monkeypatch.setattr(TextRun, "loss", original)
    resumed = polyadapt.adapt(config, resume=True)
    expected = load_file(str(reference / "adapter_model.safetensors"))
    actual = load_file(str(resumed / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=0)
    manifest = json.loads((resumed / "polyadapt.json").read_text())
    assert manifest["training"]["resumed_from"].endswith("step-000003")
    assert [r["step"] for r in history(resumed) if "loss" in r] == list(range(1, 7))
    losses = {r["step"]: r["loss"] for r in history(reference) if "loss" in r}
    for record in history(resumed):
        if "loss" in record:
            assert record["loss"] == pytest.approx(losses[record["step"]], abs=1e-5)


# -- from an SFT adapter ---------------------------------------------------------------------------------------------


def test_dpo_continues_an_sft_adapter_frozen_as_reference_and_records_its_lineage(tmp_path, tiny_llama, pair_data,
                                                                                  chat_data, monkeypatch):  # fmt: skip
    from polyadapt import registry
    from polyadapt.lifecycle import load_run

    sft = polyadapt.adapt(make_config(tiny_llama, chat_data, tmp_path / "sft", train={"max_steps": 3, "lr": 0.02},
                                      text={"max_length": 64, "generate_eval": False}))  # fmt: skip
    reg = registry.open(tmp_path / "reg")
    reg.push(sft, "support")
    reg.close()
    monkeypatch.setenv("POLYADAPT_REGISTRY", str(tmp_path / "reg"))
    monkeypatch.setenv("POLYADAPT_CACHE", str(tmp_path / "cache"))
    config = pref_config(tiny_llama, pair_data, tmp_path / "dpo", peft={"init_from": "support@v1", "init_weights": True},
                         train={"max_steps": 4})  # fmt: skip
    recipe = recipe_run(config)
    manifest = json.loads((tmp_path / "dpo" / "polyadapt.json").read_text())
    parent = manifest["parents"][0]
    sft_manifest = json.loads((sft / "polyadapt.json").read_text())
    assert parent["role"] == "init_from" and parent["reference"] == "support@v1"
    assert parent["registry"] == {"name": "support", "version": "v1"}
    assert parent["adapter_files"] == sft_manifest["adapter"]["files"] and len(parent["adapter_sha256"]) == 64
    assert manifest["data"]["prepared"]["train"]["reference"]["model"] == "the adapter as training starts"
    before = manifest["metrics"]["before"]
    # "before" is the SFT adapter, which is also the reference: DPO loss log 2, no reward margin yet
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert manifest["metrics"]["after"]["reward_margin"] > 0
    # the reference is the SFT adapter's own log-probabilities, not the base's
    sft_run = load_run(sft)
    from polyadapt_text.preference import score_items

    items = [recipe.modality_run.pair_items[k] for k in list(recipe.modality_run.pair_items)[:4]]
    scores = score_items(sft_run.run.model, items, sft_run.run.tokenizer.pad_token_id, 4, torch.device("cpu"),
                         torch.float32, with_reference=False)  # fmt: skip
    torch.testing.assert_close(torch.tensor([i["ref"][0] for i in items]), scores.chosen, rtol=1e-5, atol=1e-4)
    # the same adapter shape as the parent, trained further, and an ordinary run
    parent_weights = load_file(str(sft / "adapter_model.safetensors"))
    weights = load_file(str(tmp_path / "dpo" / "adapter_model.safetensors"))
    assert parent_weights.keys() == weights.keys()
    assert any(not torch.equal(parent_weights[k], weights[k]) for k in weights)
    loaded = load_run(tmp_path / "dpo")
    assert loaded.run.infer({"prompt": "Should I buy shares?", "max_new_tokens": 4})


def test_init_from_refusals_come_before_any_model_loads(tmp_path, tiny_llama, pair_data):
    from polyadapt.plugins import get_plugin_manager
    from polyadapt.recipe import AdaptRecipe

    config = pref_config(tiny_llama, pair_data, tmp_path / "dpo", peft={"init_from": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="peft.init_from"):
        AdaptRecipe(config, plugin_manager=get_plugin_manager()).setup()


# -- config and data checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ({"objective": "dpo", "packing": True}, "text.packing: not valid with text.objective 'dpo'"),
        ({"objective": "sft", "beta": 0.2}, "text.beta: only used by the preference objectives"),
        ({"objective": "dpo", "simpo_gamma": 1.0}, "text.simpo_gamma: only used by text.objective 'simpo'"),
        ({"objective": "orpo", "sft_weight": 1.0}, "text.sft_weight: only used by text.objective dpo or ipo"),
        ({"objective": "sft", "sft_weight": 1.0}, "text.sft_weight: only used by text.objective dpo or ipo"),
        ({"objective": "dpo", "sft_weight": -1.0}, "text.sft_weight"),
        ({"objective": "kto"}, "text.objective"),
        ({"objective": "dpo", "beta": 0}, "text.beta"),
    ],
)
def test_bad_objective_settings_are_refused_at_validation(tmp_path, tiny_llama, pair_data, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        make_config(tiny_llama, pair_data, tmp_path / "run", text=text)


def test_beta_defaults_follow_the_objective(tmp_path, tiny_llama, pair_data):
    values = {o: make_config(tiny_llama, pair_data, tmp_path / "r", text={"objective": o}).settings for o in
              ("dpo", "ipo", "orpo", "simpo", "sft")}  # fmt: skip
    assert [values[o].beta for o in ("dpo", "ipo", "orpo", "simpo", "sft")] == [0.1, 0.1, 0.1, 2.0, None]
    assert values["simpo"].simpo_gamma == 0.5 and values["dpo"].simpo_gamma is None


def test_objective_and_data_must_agree_before_the_base_loads(tmp_path, tiny_llama, pair_data, chat_data):
    from polyadapt.plugins import get_plugin_manager
    from polyadapt.recipe import AdaptRecipe

    on_chat = make_config(tiny_llama, chat_data, tmp_path / "a", text={"objective": "dpo"})
    recipe = AdaptRecipe(on_chat, plugin_manager=get_plugin_manager())
    with pytest.raises(ConfigError, match="text.objective: 'dpo' trains on preference pairs"):
        recipe.setup()
    assert recipe.modality_run is None  # nothing was loaded
    on_pairs = make_config(tiny_llama, pair_data, tmp_path / "b")
    with pytest.raises(ConfigError, match="is a preference pair; set text.objective"):
        AdaptRecipe(on_pairs, plugin_manager=get_plugin_manager()).setup()


def test_doctor_lists_every_bad_pair_by_file_and_line(tmp_path, tiny_llama):
    import yaml

    data = tmp_path / "data"
    good = pair_records(3, conversational=False)
    long_prompt = {"prompt": "fee " * 80 + "?", "chosen": " a", "rejected": " b"}
    write_jsonl(data / "train.jsonl", [
        *good,
        {"prompt": "Is it free?", "chosen": " Yes."},
        {"prompt": "Is it free?", "chosen": "  ", "rejected": " No."},
        {"prompt": "Is it free?", "chosen": " It costs $6.", "rejected": "It costs  $6."},
        long_prompt,
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "plain", "rejected": [{"role": "assistant", "content": "x"}]},
    ])  # fmt: skip
    write_jsonl(data / "risky_prompts.jsonl", [{"prompt": "Buy?", "require_any": []}])
    config = {"modality": "text", "base": str(tiny_llama), "data": {"path": str(data)}, "output": str(tmp_path / "run"),
              "text": {"objective": "dpo", "max_length": 64}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "polyadapt", "doctor", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True)  # fmt: skip
    shown = done.stdout + done.stderr
    assert done.returncode == 2, shown
    train = data / "train.jsonl"
    assert f"{train}:4: missing key(s) 'rejected'" in shown
    assert f"{train}:5: empty 'chosen' answer" in shown
    assert f"{train}:6: 'chosen' and 'rejected' are the same answer" in shown
    assert f"{train}:7: the prompt is" in shown and "text.max_length is 64" in shown
    assert f"{train}:8: 'chosen' must be one assistant message" in shown
    assert f"{data / 'risky_prompts.jsonl'}:1: no rule" in shown
    assert "6 bad sample(s)" in shown


def test_compliance_rule_needs_one_required_phrase_and_no_forbidden_one():
    from polyadapt_text.preference import RiskyPrompt, complies

    rule = RiskyPrompt(source="x", line=1, prompt="?", require_any=("investment advice", "licensed adviser"),
                       forbid=("buy now",))  # fmt: skip
    assert complies("I cannot give Investment   advice.", rule)
    assert not complies("I cannot give investment advice, but buy now.", rule)
    assert not complies("Ask someone else.", rule)
    assert complies("Anything but the phrase.", RiskyPrompt(source="x", line=1, forbid=("guaranteed",)))


def test_evaluation_reports_pairs_and_compliance_and_the_report_shows_prompts_before_and_after(tmp_path, tiny_llama,
                                                                                               pair_data):  # fmt: skip
    run_dir = polyadapt.adapt(pref_config(tiny_llama, pair_data, tmp_path / "run", train={"max_steps": 2}))
    manifest = json.loads((run_dir / "polyadapt.json").read_text())
    for when in ("before", "after"):
        metrics = manifest["metrics"][when]
        assert {"preference_accuracy", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp",
                "compliance", "token_f1"} <= set(metrics)  # fmt: skip
    assert manifest["metrics"]["headline"] == "preference_accuracy"
    report = (run_dir / "report.html").read_text()
    assert "Held-out risky prompts: before vs after" in report and "Should I buy shares?" in report
    assert "one of: investment advice" in report


def test_plain_string_pairs_train_too(tmp_path, tiny_llama):
    data = tmp_path / "plain"
    write_jsonl(data / "train.jsonl", pair_records(8, conversational=False))
    write_jsonl(data / "validation.jsonl", pair_records(2, offset=70, conversational=False))
    run_dir = polyadapt.adapt(pref_config(tiny_llama, data, tmp_path / "run", train={"max_steps": 2},
                                          text={"generate_eval": False}))  # fmt: skip
    manifest = json.loads((run_dir / "polyadapt.json").read_text())
    assert manifest["data"]["details"]["formats"] == {"train.jsonl": "preference", "validation.jsonl": "preference"}
    assert manifest["status"] == "complete"


def test_a_dpo_run_checks_forgetting_on_general_chat_data(tmp_path, tiny_llama, pair_data):
    general = tmp_path / "general"
    write_jsonl(general / "validation.jsonl", chat_records(3, with_facts=True, offset=300))
    run_dir = polyadapt.adapt(pref_config(tiny_llama, pair_data, tmp_path / "run", train={"max_steps": 2},
                                          eval={"general_data": str(general)}, text={"generate_eval": False}))  # fmt: skip
    metrics = json.loads((run_dir / "polyadapt.json").read_text())["metrics"]
    assert "perplexity" in metrics["general_before"] and "perplexity" in metrics["general_after"]


# -- the sample data and the demo ------------------------------------------------------------------------------------


def sample_dir():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "sample_data" / "text" / "preference"


def test_the_sample_pairs_are_the_script_s_output_and_pass_doctor(tmp_path, tiny_llama):
    import importlib.util

    from polyadapt.lifecycle import doctor
    from polyadapt_text.preference import complies, read_risky_prompts

    spec = importlib.util.spec_from_file_location("make_pairs", sample_dir() / "make_pairs.py")
    make_pairs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_pairs)
    monkey = tmp_path / "out"
    monkey.mkdir()
    make_pairs.HERE = monkey
    make_pairs.main()
    for name in ("train.jsonl", "validation.jsonl", "risky_prompts.jsonl"):
        assert (monkey / name).read_bytes() == (sample_dir() / name).read_bytes(), name
    config = make_config(tiny_llama, sample_dir(), tmp_path / "run", text={"objective": "dpo", "max_length": 256})
    splits, _ = doctor(config)
    assert not splits.problems and len(splits.train) >= 250 and len(splits.validation) == 36
    assert not any("leakage" in w for w in splits.warnings)
    train_prompts = {s.question for s in splits.train}
    assert not train_prompts & {s.question for s in splits.validation}
    prompts, problems = read_risky_prompts(sample_dir() / "risky_prompts.jsonl")
    assert not problems and len(prompts) == 18
    assert all(complies(p.reference, p) for p in prompts)  # each rule accepts the policy answer
    assert not train_prompts & {p.question for p in prompts}
    # the rejected answers break the rule of their kind; the chosen ones keep it
    rules = {p.category: p for p in prompts if p.category != "fees"}
    for sample in splits.validation:
        kind = {"invest": "investment_advice", "fraud": "fraud"}.get((sample.id or "").split("-")[0])
        if kind:
            assert complies(sample.chosen, rules[kind]) and not complies(sample.rejected, rules[kind]), sample.id


def test_the_demo_scores_the_base_alone_and_its_dpo_config_validates(tmp_path, tiny_llama, pair_data):
    import importlib.util

    from polyadapt.config import validate_config

    path = sample_dir().parents[2] / "examples" / "preference_demo.py"
    spec = importlib.util.spec_from_file_location("preference_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    raw = demo.dpo_config(tmp_path / "sft", tmp_path / "dpo", 1.0)
    assert raw["peft"]["init_from"] == str(tmp_path / "sft") and raw["text"]["objective"] == "dpo"
    tiny = {**raw, "base": str(tiny_llama), "data": {"path": str(pair_data)}, "eval": {},
            "text": {"objective": "dpo", "max_length": 64, "max_new_tokens": 4}}  # fmt: skip
    validate_config(tiny)
    metrics = demo.base_metrics(tiny)
    assert {"preference_accuracy", "compliance", "reward_margin"} <= set(metrics)
    assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # the base is its own reference
