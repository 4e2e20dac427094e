"""prepare/collate/loss on tiny pipelines: caching equivalence, deterministic eval, min-SNR, targets, SDXL,
gradient checkpointing, text-encoder LoRA."""

from __future__ import annotations

import pytest
import torch

from polyadapt_image.denoisers import signal_to_noise

from .conftest import open_run


def test_caching_gives_the_same_loss_as_encoding_every_step(make_config):
    cached = open_run(make_config(image={"cache_latents": True, "cache_text_embeddings": True}))
    fresh = open_run(make_config(image={"cache_latents": False, "cache_text_embeddings": False}))
    losses = {}
    for name, (run, splits) in {"cached": cached, "fresh": fresh}.items():
        prepared = run.prepare(splits.train, training=True)
        assert ("latents" in prepared.items[0]) == (name == "cached")
        assert ("cond" in prepared.items[0]) == (name == "cached")
        torch.manual_seed(123)
        train_batch = run.collate(prepared.items[:4], training=True)
        eval_batch = run.collate(prepared.items[:4], training=False)
        with torch.no_grad():
            losses[name] = (run.loss(run.model, train_batch), run.loss(run.model, eval_batch))
    for cached_loss, fresh_loss in zip(losses["cached"], losses["fresh"], strict=True):
        torch.testing.assert_close(cached_loss, fresh_loss, rtol=1e-4, atol=1e-5)


def test_eval_batches_are_deterministic_and_training_batches_are_not(make_config):
    run, splits = open_run(make_config())
    prepared = run.prepare(splits.validation, training=False)
    first = run.collate(prepared.items, training=False)
    torch.manual_seed(999)
    second = run.collate(prepared.items, training=False)
    for key in ("timesteps", "noise", "latent_noise", "latent_mean"):
        assert torch.equal(first[key], second[key]), key
    assert len(set(first["timesteps"].tolist())) > 1, "each item has its own timestep"
    one = run.collate(prepared.items, training=True)
    two = run.collate(prepared.items, training=True)
    assert not torch.equal(one["noise"], two["noise"])


def test_loss_falls_when_training_the_lora(make_config):
    torch.manual_seed(0)
    run, splits = open_run(make_config(peft={"r": 8, "alpha": 8, "dropout": 0.0}), adapter=True)
    prepared = run.prepare(splits.train, training=True)
    batch = run.collate(prepared.items[:4], training=False)
    params = [p for p in run.model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in run.model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    run.model.train()
    losses = []
    for _ in range(25):
        loss = run.loss(run.model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [None, 1.0, 5.0])
def test_min_snr_weights(prediction, gamma):
    from diffusers import DDPMScheduler

    from polyadapt_image.denoisers import Denoiser
    from polyadapt_image.tiny import tiny_scheduler_config

    scheduler = DDPMScheduler.from_config(tiny_scheduler_config(prediction))
    strategy = Denoiser(pipeline=None, prediction_type=prediction)
    timesteps = torch.tensor([0, 10, 100, 400, 800, 999])
    weights = strategy.loss_weights(scheduler, timesteps, gamma)
    if gamma is None:
        assert weights is None
        return
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    expected = expected / (snr + 1) if prediction == "v_prediction" else expected / snr
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=1e-6)
    # nearly clean steps (high SNR) are weighted down the most
    assert weights[0] == weights.min()
    if prediction == "epsilon":
        assert weights[-1] == pytest.approx(1.0)
    torch.testing.assert_close(signal_to_noise(scheduler, timesteps).double(), snr, rtol=1e-4, atol=0)


def test_v_prediction_target_is_the_velocity(make_config, tiny_base_v):
    run, _ = open_run(make_config(base=tiny_base_v))
    assert run.info["prediction_type"] == "v_prediction"
    strategy, scheduler = run.strategy, run.noise_scheduler
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    timesteps = torch.tensor([100, 700])
    _, target = strategy.noisy_and_target(scheduler, latents, noise, timesteps)
    a = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * latents)


def test_noise_offset_adds_a_per_channel_constant(make_config):
    plain = open_run(make_config())
    offset = open_run(make_config(image={"noise_offset": 0.1}))
    batches = []
    for run, splits in (plain, offset):
        prepared = run.prepare(splits.validation, training=False)
        batches.append(run.collate(prepared.items, training=False))
    difference = batches[1]["noise"] - batches[0]["noise"]
    assert difference.abs().max() > 0
    torch.testing.assert_close(difference, difference.mean(dim=(2, 3), keepdim=True).expand_as(difference))


def test_sdxl_uses_both_encoders_and_time_ids(make_config, tiny_base_xl):
    run, splits = open_run(make_config(base=tiny_base_xl), adapter=True)
    assert run.info["pipeline"] == "StableDiffusionXLPipeline"
    prepared = run.prepare(splits.train, training=True)
    batch = run.collate(prepared.items[:2], training=False)
    assert batch["encoder_hidden_states"].shape[-1] == 128  # two 64-wide encoders, concatenated
    assert batch["text_embeds"].shape == (2, 64) and batch["time_ids"].shape == (2, 6)
    loss = run.loss(run.model, batch)
    loss.backward()
    assert any(p.grad is not None for n, p in run.model.named_parameters() if "lora_" in n)


def test_text_encoder_lora_trains_and_reloads_with_the_same_outputs(make_config, tmp_path):
    from polyadapt_image.model import transformers_peft_usable

    config = make_config(image={"train_text_encoder": True}, peft={"r": 4, "alpha": 16})
    run, splits = open_run(config, adapter=True)
    assert run.trainable_modules() == [run.denoiser, *run.text_encoders]
    prepared = run.prepare(splits.train, training=True)
    assert "tokens" in prepared.items[0], "text embeddings are not cached when the text encoder trains"
    batch = run.collate(prepared.items[:2], training=True)
    run.loss(run.model, batch).backward()
    trained = {n.split(".")[0] for n, p in run.model.named_parameters() if p.requires_grad and p.grad is not None}
    assert trained == {"denoiser", "text_encoders"}

    with torch.no_grad():  # a trained-looking adapter: LoRA B is zero at initialisation
        for name, parameter in run.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    run.save_adapter(tmp_path / "lora")
    ids = run.strategy.tokenize(["a red circle"])["input_ids"]

    def encoded(r):
        encoder = r.text_encoders[0].eval()
        with torch.no_grad():
            return encoder(ids)[0]

    trained_out = encoded(run)
    fresh, _ = open_run(config)
    base_out = encoded(fresh)
    fresh.load_adapter(tmp_path / "lora")
    # denoiser and text encoder come back with the trained scale alpha / r = 16 / 4
    scales = {v for m in fresh.model.modules() for v in (getattr(m, "scaling", None) or {}).values()}
    scales |= {v for m in fresh.text_encoders[0].modules() for v in (getattr(m, "scaling", None) or {}).values()}
    assert scales == {4.0}
    assert (trained_out - base_out).abs().max() > 1e-3
    torch.testing.assert_close(encoded(fresh), trained_out, rtol=0, atol=1e-6)
    # the kohya layout names the text-encoder modules as A1111 does; diffusers' kohya reader maps them back
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    from polyadapt_image.export import read_lora, to_kohya

    tensors, configs = read_lora(tmp_path / "lora")
    kohya = to_kohya(tensors, configs, "StableDiffusionPipeline")
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in kohya)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(kohya)

    def text_encoder_part(state):
        state = {k: v for k, v in state.items() if k.startswith("text_encoder.")}
        state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
        return {k.replace("text_model.", ""): v for k, v in state.items()}

    ours, back = text_encoder_part(tensors), text_encoder_part(converted)
    assert ours.keys() == back.keys() and ours
    assert all(torch.equal(ours[k], back[k]) for k in ours)
    assert {v for k, v in alphas.items() if k.startswith("text_encoder.")} == {
        float(configs["text_encoder"]["lora_alpha"])
    }
    if transformers_peft_usable():  # plain diffusers loads the text-encoder part itself only with a recent peft
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(run.ctx.config.base), use_safetensors=True)
        pipe.load_lora_weights(str(tmp_path / "lora"))
        with torch.no_grad():
            torch.testing.assert_close(pipe.text_encoder.eval()(ids)[0], trained_out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sample", [True, False])
def test_training_latents_are_posterior_samples_or_the_mean(make_config, sample):
    run, splits = open_run(make_config(image={"sample_latents": sample}))
    prepared = run.prepare(splits.train, training=True)
    batch = run.collate(prepared.items[:4], training=True)
    assert bool(batch["latent_noise"].abs().sum() > 0) is sample


@pytest.mark.parametrize("text_encoder", [False, True])
def test_gradient_checkpointing_recomputes_activations_with_the_same_gradients(make_config, text_encoder):
    def backward(checkpointing: bool) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        config = make_config(train={"grad_checkpointing": checkpointing}, image={"train_text_encoder": text_encoder})
        run, splits = open_run(config, adapter=True)
        with torch.no_grad():  # LoRA B is zero at initialisation, which would leave LoRA A without a gradient
            for name, parameter in run.model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        batch = run.collate(run.prepare(splits.train, training=True).items[:2], training=False)
        calls = {"denoiser": 0, "text_encoder": 0}

        def count(part):
            def hook(module, args, output):
                calls[part] += 1

            return hook

        for part, module, leaf in (
            ("denoiser", run.denoiser, "to_q"),
            ("text_encoder", run.text_encoders[0], "q_proj"),
        ):
            for name, layer in module.named_modules():
                if name.endswith(leaf):
                    layer.register_forward_hook(count(part))
        run.model.train()
        run.loss(run.model, batch).backward()
        return calls, {n: p.grad for n, p in run.model.named_parameters() if p.requires_grad}

    plain_calls, plain = backward(False)
    calls, checkpointed = backward(True)
    # the checkpointed layers run again in the backward pass: their activations were not kept
    assert calls["denoiser"] > plain_calls["denoiser"] > 0
    if text_encoder:
        assert calls["text_encoder"] > plain_calls["text_encoder"] > 0
        assert any(n.startswith("text_encoders.") for n in checkpointed)
    assert checkpointed.keys() == plain.keys() and all(g is not None for g in checkpointed.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)
