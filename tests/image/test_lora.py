"""End to end on a tiny pipeline: adapt, then the LoRA through plain diffusers, kohya and merged exports, inference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import polyadapt

PROMPT = "a gold circle on a navy background, in harbor style"


def diffusers_pipeline(path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, height=16, width=16, num_inference_steps=3, generator=generator, output_type="np").images[0]


def lora_tensors(unet) -> dict[str, torch.Tensor]:
    """The LoRA weights loaded into ``unet`` under their diffusers names, each B scaled by its alpha/r."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            (adapter,) = module.lora_A.keys()
            scale = module.scaling[adapter]
            out[name] = (module.lora_B[adapter].weight @ module.lora_A[adapter].weight * scale).detach()
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_base):
    """One finished tiny run (alpha != r, so scaling must survive every format)."""
    from .conftest import RESOLUTION, write_dataset

    root = tmp_path_factory.mktemp("image-run")
    data = write_dataset(root / "data")
    import yaml

    config = {
        "modality": "image", "base": str(tiny_base), "data": {"path": str(data)}, "output": str(root / "run"),
        "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 2e-2, "precision": "fp32", "scheduler": "constant",
                  "eval_every": 3},
        "image": {"resolution": RESOLUTION, "trigger": "in harbor style", "num_inference_steps": 2,
                  "validation_seeds": [0, 1], "num_validation_prompts": 2},
    }  # fmt: skip
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    torch.set_num_threads(1)
    return polyadapt.adapt(path)


def test_run_writes_lora_report_and_grids(run_dir):
    manifest = json.loads((run_dir / "polyadapt.json").read_text())
    assert manifest["status"] == "complete"
    for when in ("before", "after"):
        assert {"eval_loss", "brand_style_distance"} <= set(manifest["metrics"][when])
    assert (run_dir / "pytorch_lora_weights.safetensors").is_file()
    grids = sorted(p.name for p in (run_dir / "validation").iterdir())
    assert grids == ["adapted.png", "base.png", "step-000003.png"]
    html = (run_dir / "report.html").read_text()
    assert "Validation images: base vs adapted" in html and html.count("data:image/png;base64,") >= 2


def test_plain_diffusers_loads_the_lora_with_every_key_and_output_changes(run_dir, tiny_base):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "pytorch_lora_weights.safetensors"))
    assert saved and all(k.startswith("unet.") for k in saved)
    pipe = diffusers_pipeline(tiny_base)
    before = render(pipe)
    pipe.load_lora_weights(str(run_dir))
    loaded = convert_state_dict_to_diffusers(
        get_peft_model_state_dict(pipe.unet, adapter_name=pipe.get_active_adapters()[0])
    )
    loaded = {f"unet.{k}": v for k, v in loaded.items()}
    assert set(loaded) == set(saved), "no missing or unexpected keys"
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value)
    # the trained alpha (8 with r=4) is restored from the file's metadata
    assert {m.scaling[a] for m in _lora_layers(pipe.unet) for a in m.scaling} == {2.0}
    after = render(pipe)
    assert np.abs(after - before).max() > 1e-4


def test_the_model_card_snippet_loads_the_lora_with_plain_diffusers(run_dir, tiny_base):
    card = (run_dir / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert f"DiffusionPipeline.from_pretrained({str(tiny_base)!r})" in code
    assert f"pipe.load_lora_weights({str(run_dir)!r})" in code
    namespace: dict = {}
    exec(code.replace("pipe(", "pipe(num_inference_steps=2, prompt="), namespace)
    assert namespace["pipe"].get_list_adapters()["unet"] and namespace["image"].size == (16, 16)


def _lora_layers(unet):
    from peft.tuners.lora import LoraLayer

    return [m for m in unet.modules() if isinstance(m, LoraLayer)]


def test_kohya_export_loads_back_to_the_same_weights(run_dir, tiny_base, tmp_path):
    from safetensors.torch import load_file

    from polyadapt.export import export_run

    record = export_run(run_dir, "kohya", tmp_path / "kohya")
    tensors = load_file(str(tmp_path / "kohya" / record["file"]))
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert any(k.endswith("_attn1_to_out_0.lora_down.weight") for k in tensors)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {8.0}

    reference = diffusers_pipeline(tiny_base)
    reference.load_lora_weights(str(run_dir))
    from_kohya = diffusers_pipeline(tiny_base)
    from_kohya.load_lora_weights(str(tmp_path / "kohya"), weight_name=record["file"])
    expected, got = lora_tensors(reference.unet), lora_tensors(from_kohya.unet)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    np.testing.assert_allclose(render(from_kohya), render(reference), atol=1e-5)


def test_merged_export_matches_base_plus_lora(run_dir, tiny_base, tmp_path):
    from polyadapt.export import export_run

    record = export_run(run_dir, "merged", tmp_path / "merged")
    assert record["parity_max_abs_diff"] < 1e-4
    merged = diffusers_pipeline(tmp_path / "merged")
    assert not _lora_layers(merged.unet)
    reference = diffusers_pipeline(tiny_base)
    reference.load_lora_weights(str(run_dir))
    np.testing.assert_allclose(render(merged), render(reference), atol=1e-3)


def test_infer_writes_pngs_scales_and_combines_adapters(run_dir, tmp_path):
    from PIL import Image

    from polyadapt.cli import cli

    def infer(*extra: str) -> list[np.ndarray]:
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        args = [
            "infer",
            str(run_dir),
            "--prompt",
            PROMPT,
            "--n",
            "2",
            "--seed",
            "3",
            "--out",
            str(out),
            "--steps",
            "3",
            *extra,
        ]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        files = sorted(out.glob("*.png"))
        assert [f.name for f in files] == ["0003.png", "0004.png"]
        return [np.asarray(Image.open(f), dtype=np.float32) for f in files]

    full = infer()
    off = infer("--scale", "0")
    assert np.abs(full[0] - off[0]).max() > 0
    assert np.abs(full[0] - full[1]).max() > 0, "each image has its own seed"
    # the same LoRA twice at half weight each is the LoRA at full weight
    combined = infer("--scale", "0.5", "--adapter", f"{run_dir}:0.5")
    np.testing.assert_allclose(combined[0], full[0], atol=2.0)


def test_a_prompt_beyond_the_text_window_is_named_once_not_at_every_image(run_dir, tmp_path, caplog):
    from polyadapt.cli import cli

    long_prompt = " ".join(["a red circle on a blue background"] * 4)  # well over the tiny tokenizer's 16 tokens
    args = ["infer", str(run_dir), "--prompt", long_prompt, "--n", "2", "--out", str(tmp_path / "o"), "--steps", "2"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("longer than the text encoder's 16 tokens") == 1
    assert "truncated because CLIP" not in result.output + caplog.text
    result = CliRunner().invoke(cli, [*args[:4], PROMPT, *args[5:]], catch_exceptions=False)
    assert "longer than the text encoder" not in result.output


def test_captions_beyond_the_text_window_are_counted(make_config, tmp_path):
    import dataclasses

    from .conftest import open_run

    run, splits = open_run(make_config())
    samples = list(splits.train)
    assert run.prepare(samples, training=True).stats["captions_truncated"] == 0
    samples[0] = dataclasses.replace(samples[0], caption=" ".join(["red circle"] * 20))
    assert run.prepare(samples, training=True).stats["captions_truncated"] == 1
