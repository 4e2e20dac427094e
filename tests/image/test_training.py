"""prepare/collate/compute_loss on tiny pipelines: caching equivalence, deterministic eval, min-SNR, targets, SDXL."""

from __future__ import annotations

import pytest
import torch

from polyadapt_image.denoisers import signal_to_noise
from polyadapt_image.modality import ImageModality

from .conftest import context_for


def setup(config_path, adapter: bool = False):
    modality = ImageModality()
    ctx = context_for(config_path)
    splits = modality.load_data(ctx.config, ctx.config.data.path)
    bundle = modality.load_base(ctx)
    if adapter:
        modality.add_adapter(bundle, ctx)
    return modality, ctx, splits, bundle


def test_caching_gives_the_same_loss_as_encoding_every_step(make_config):
    cached = setup(make_config(image={"cache_latents": True, "cache_text_embeddings": True}))
    fresh = setup(make_config(image={"cache_latents": False, "cache_text_embeddings": False}))
    losses = {}
    for name, (modality, ctx, splits, bundle) in {"cached": cached, "fresh": fresh}.items():
        prepared = modality.prepare(bundle, splits.train, ctx, training=True)
        assert ("latents" in prepared.items[0]) == (name == "cached")
        assert ("cond" in prepared.items[0]) == (name == "cached")
        torch.manual_seed(123)
        train_batch = modality.collate(bundle, prepared.items[:4], training=True)
        eval_batch = modality.collate(bundle, prepared.items[:4], training=False)
        with torch.no_grad():
            losses[name] = (
                modality.compute_loss(bundle, bundle.model, train_batch),
                modality.compute_loss(bundle, bundle.model, eval_batch),
            )
    for cached_loss, fresh_loss in zip(losses["cached"], losses["fresh"], strict=True):
        torch.testing.assert_close(cached_loss, fresh_loss, rtol=1e-4, atol=1e-5)


def test_eval_batches_are_deterministic_and_training_batches_are_not(make_config):
    modality, ctx, splits, bundle = setup(make_config())
    prepared = modality.prepare(bundle, splits.validation, ctx, training=False)
    first = modality.collate(bundle, prepared.items, training=False)
    torch.manual_seed(999)
    second = modality.collate(bundle, prepared.items, training=False)
    for key in ("timesteps", "noise", "latent_noise", "latent_mean"):
        assert torch.equal(first[key], second[key]), key
    assert len(set(first["timesteps"].tolist())) > 1, "each item has its own timestep"
    one = modality.collate(bundle, prepared.items, training=True)
    two = modality.collate(bundle, prepared.items, training=True)
    assert not torch.equal(one["noise"], two["noise"])


def test_loss_falls_when_training_the_lora(make_config):
    torch.manual_seed(0)
    modality, ctx, splits, bundle = setup(make_config(peft={"r": 8, "alpha": 8, "dropout": 0.0}), adapter=True)
    prepared = modality.prepare(bundle, splits.train, ctx, training=True)
    batch = modality.collate(bundle, prepared.items[:4], training=False)
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in bundle.model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    bundle.model.train()
    losses = []
    for _ in range(25):
        loss = modality.compute_loss(bundle, bundle.model, batch)
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
    modality, ctx, splits, bundle = setup(make_config(base=tiny_base_v))
    assert bundle.info["prediction_type"] == "v_prediction"
    strategy, scheduler = bundle.components["denoiser"], bundle.components["noise_scheduler"]
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    timesteps = torch.tensor([100, 700])
    _, target = strategy.noisy_and_target(scheduler, latents, noise, timesteps)
    a = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * latents)


def test_noise_offset_adds_a_per_channel_constant(make_config):
    plain = setup(make_config())
    offset = setup(make_config(image={"noise_offset": 0.1}))
    batches = []
    for modality, ctx, splits, bundle in (plain, offset):
        prepared = modality.prepare(bundle, splits.validation, ctx, training=False)
        batches.append(modality.collate(bundle, prepared.items, training=False))
    difference = batches[1]["noise"] - batches[0]["noise"]
    assert difference.abs().max() > 0
    torch.testing.assert_close(difference, difference.mean(dim=(2, 3), keepdim=True).expand_as(difference))


def test_sdxl_uses_both_encoders_and_time_ids(make_config, tiny_base_xl):
    modality, ctx, splits, bundle = setup(make_config(base=tiny_base_xl), adapter=True)
    assert bundle.info["pipeline"] == "StableDiffusionXLPipeline"
    prepared = modality.prepare(bundle, splits.train, ctx, training=True)
    batch = modality.collate(bundle, prepared.items[:2], training=False)
    assert batch["encoder_hidden_states"].shape[-1] == 128  # two 64-wide encoders, concatenated
    assert batch["text_embeds"].shape == (2, 64) and batch["time_ids"].shape == (2, 6)
    loss = modality.compute_loss(bundle, bundle.model, batch)
    loss.backward()
    assert any(p.grad is not None for n, p in bundle.model.named_parameters() if "lora_" in n)


def test_text_encoder_lora_trains_and_reloads_with_the_same_outputs(make_config, tmp_path):
    from polyadapt_image.model import transformers_peft_usable

    config = make_config(image={"train_text_encoder": True}, peft={"r": 4, "alpha": 16})
    modality, ctx, splits, bundle = setup(config, adapter=True)
    prepared = modality.prepare(bundle, splits.train, ctx, training=True)
    assert "tokens" in prepared.items[0], "text embeddings are not cached when the text encoder trains"
    batch = modality.collate(bundle, prepared.items[:2], training=True)
    modality.compute_loss(bundle, bundle.model, batch).backward()
    trained = {n.split(".")[0] for n, p in bundle.model.named_parameters() if p.requires_grad and p.grad is not None}
    assert trained == {"denoiser", "text_encoders"}

    with torch.no_grad():  # a trained-looking adapter: LoRA B is zero at initialisation
        for name, parameter in bundle.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    modality.save_adapter(bundle, tmp_path / "lora")
    ids = bundle.components["denoiser"].tokenize(["a red circle"])["input_ids"]

    def encoded(b):
        encoder = b.components["text_encoders"][0].eval()
        with torch.no_grad():
            return encoder(ids)[0]

    trained_out = encoded(bundle)
    fresh = modality.load_base(ctx)
    base_out = encoded(fresh)
    modality.load_adapter(fresh, tmp_path / "lora", ctx)
    # denoiser and text encoder come back with the trained scale alpha / r = 16 / 4
    scales = {v for m in fresh.model.modules() for v in (getattr(m, "scaling", None) or {}).values()}
    scales |= {v for m in fresh.components["text_encoders"][0].modules() for v in (getattr(m, "scaling", None) or {}).values()}
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
    assert {v for k, v in alphas.items() if k.startswith("text_encoder.")} == {float(configs["text_encoder"]["lora_alpha"])}
    if transformers_peft_usable():  # plain diffusers loads the text-encoder part itself only with a recent peft
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(ctx.config.base), use_safetensors=True)
        pipe.load_lora_weights(str(tmp_path / "lora"))
        with torch.no_grad():
            torch.testing.assert_close(pipe.text_encoder.eval()(ids)[0], trained_out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sample", [True, False])
def test_training_latents_are_posterior_samples_or_the_mean(make_config, sample):
    modality, ctx, splits, bundle = setup(make_config(image={"sample_latents": sample}))
    prepared = modality.prepare(bundle, splits.train, ctx, training=True)
    batch = modality.collate(bundle, prepared.items[:4], training=True)
    assert bool(batch["latent_noise"].abs().sum() > 0) is sample
