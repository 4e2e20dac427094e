"""Several LoRAs on one pipeline: loaded by name, switched without reloading, deleted; what the modality declares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polyadapt.errors import ConfigError
from polyadapt.evaluation import evaluating

from .conftest import open_run

PROMPTS = ["a gold circle on a navy background, in harbor style", "a teal circle on a sand background"]


def trained_looking_lora(make_config, directory, seed: int, **image):
    """A saved LoRA whose B matrices are random (they are zero at initialisation, which would change nothing)."""
    run, _ = open_run(make_config(image=image), adapter=True)
    with torch.no_grad():
        for name, parameter in run.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed * 1000 + len(name)))
    run.save_adapter(directory)
    return directory


def images(run) -> list[np.ndarray]:
    with evaluating(run):
        return [np.asarray(image) for image in run.generate(PROMPTS, [0, 1])]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def lora_layers(run) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = [run.denoiser, *run.text_encoders]
    return [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]


def test_two_loras_in_one_run_switch_to_each_ones_images_and_none_to_the_base(make_config, tmp_path):
    # the second one also adapts the text encoder, so switching has to reach the text encoder too
    first = trained_looking_lora(make_config, tmp_path / "first", seed=1)
    second = trained_looking_lora(make_config, tmp_path / "second", seed=2, train_text_encoder=True)
    config = make_config()
    alone = {}
    for name, directory in (("first", first), ("second", second)):
        run, _ = open_run(config)
        run.load_adapter(directory)
        alone[name] = images(run)
    base_run, _ = open_run(config)
    base = images(base_run)
    assert not same(alone["first"], base) and not same(alone["second"], base)
    assert not same(alone["first"], alone["second"])

    run, _ = open_run(config)
    run.load_adapter(first, "first")
    run.load_adapter(second, "second")
    assert run.adapter_names() == ["first", "second"]
    assert run.active_adapters() == ["second"], "a loaded adapter is the active one"
    assert not any(p.requires_grad for m in (run.denoiser, *run.text_encoders) for p in m.parameters())
    for name in ("first", "second", None, "first", None, "second"):
        run.set_adapter(name)
        assert run.active_adapters() == ([] if name is None else [name])
        assert same(images(run), base if name is None else alone[name]), name
    assert not any(p.requires_grad for m in (run.denoiser, *run.text_encoders) for p in m.parameters())

    with pytest.raises(ConfigError, match="already attached"):
        run.load_adapter(first, "first")
    with pytest.raises(ConfigError, match="no adapter named third"):
        run.set_adapter("third")

    run.set_adapter("second")
    run.delete_adapter("second")
    assert run.adapter_names() == ["first"] and run.active_adapters() == ["first"]
    assert same(images(run), alone["first"])
    run.delete_adapter("first")
    assert run.adapter_names() == [] and not lora_layers(run)
    assert same(images(run), base)


def test_a_trained_adapter_stays_trainable_when_another_is_loaded_and_switched(make_config, tmp_path):
    other = trained_looking_lora(make_config, tmp_path / "other", seed=3)
    run, _ = open_run(make_config(), adapter=True)
    trained = {n for n, p in run.denoiser.named_parameters() if p.requires_grad}
    assert trained and all(".default." in n for n in trained)
    run.load_adapter(other, "other")
    run.set_adapter("default")
    run.set_adapter(None)
    run.set_adapter("other")
    run.set_adapter("default")
    assert {n for n, p in run.denoiser.named_parameters() if p.requires_grad} == trained


def test_the_declared_capabilities_are_implemented():
    from polyadapt.modality import capability_problems
    from polyadapt_image.modality import ImageModality

    modality = ImageModality()
    assert modality.capabilities == {"inference", "report", "multi_adapter"}
    assert capability_problems(modality) == []
    assert modality.peft_methods == ("lora", "dora")


@pytest.mark.parametrize(
    ("sections", "refused"),
    [
        ({"train": {"early_stopping_metric": "brand_style_distance"}}, None),
        ({"train": {"early_stopping_metric": "brand_style_distance_vae"}}, None),
        ({"train": {"early_stopping_metric": "clip_score"}}, "train.early_stopping_metric: 'clip_score'"),
        ({"peft": {"method": "ia3"}}, "peft.method: 'ia3' is not supported by the image modality"),
        ({"peft": {"method": "dora"}}, None),
    ],
)
def test_configs_the_modality_cannot_run_are_refused_at_validation(make_config, sections, refused):
    from polyadapt.config import load_config

    sections = {
        k: {**v, "eval_every": 2, "early_stopping_patience": 2} if k == "train" else v for k, v in sections.items()
    }
    if refused is None:
        load_config(make_config(**sections))
        return
    with pytest.raises(ConfigError, match=refused.replace(".", r"\.")):
        load_config(make_config(**sections))
