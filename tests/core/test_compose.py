"""``polyadapt compose`` on the toy modality: each method's algebra on real runs, the refusals, the judged table and
the composed run as an ordinary run (evaluate, infer, export, registry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import polyadapt
import polyadapt.cli
from polyadapt.compose import compose, compose_layers
from polyadapt.errors import ConfigError
from polyadapt.lora import read_adapter


@pytest.fixture
def make_run(toy, toy_config, tmp_path):
    def make(name: str, seed: int = 3, steps: int = 10, **sections) -> Path:
        sections.setdefault("eval", {"general_data": None})
        config = toy_config(f"{name}.yaml", output=str(tmp_path / name), train={"max_steps": steps, "seed": seed},
                            **sections)  # fmt: skip
        return polyadapt.adapt(config)

    return make


def deltas(directory: Path) -> dict[str, torch.Tensor]:
    return {key: layer.delta() for key, layer in read_adapter(directory).layers.items()}


def toy_net(toy, base: Path):
    from safetensors.torch import load_file

    config = json.loads((base / "config.json").read_text())
    net = toy.build_net(config["features"], config["hidden"])
    net.load_state_dict(load_file(str(base / "model.safetensors")))
    return net.eval()


def test_cat_with_weights_1_1_is_the_base_with_both_updates_merged(make_run, toy, tmp_path):
    from peft import PeftModel

    a, b = make_run("a", seed=1), make_run("b", seed=2)
    out = tmp_path / "ab"
    result = compose([str(a), str(b)], out, evaluate=False)
    assert result["rank"] == 8  # 4 + 4
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    composed = PeftModel.from_pretrained(toy_net(toy, tmp_path / "base"), str(out)).eval()
    merged = PeftModel.from_pretrained(toy_net(toy, tmp_path / "base"), str(a)).merge_and_unload()
    merged = PeftModel.from_pretrained(merged, str(b)).merge_and_unload().eval()
    with torch.no_grad():
        assert torch.allclose(composed(x), merged(x), atol=1e-5)
        assert not torch.allclose(composed(x), toy_net(toy, tmp_path / "base")(x), atol=1e-3)


def test_cat_is_exactly_the_weighted_sum_of_updates_negative_weights_included(make_run, tmp_path):
    a, b = make_run("a", seed=1), make_run("b", seed=2)
    compose([str(a), str(b)], tmp_path / "mix", weights=[0.6, -0.4], evaluate=False)
    da, db, dc = deltas(a), deltas(b), deltas(tmp_path / "mix")
    assert set(dc) == set(da) == set(db)
    for key in dc:
        assert torch.allclose(dc[key], 0.6 * da[key] - 0.4 * db[key], atol=1e-6)


def test_svd_at_full_rank_equals_cat_and_below_it_loses_exactly_the_discarded_singular_values(make_run, tmp_path):
    a, b = make_run("a", seed=1), make_run("b", seed=2)
    parents = [read_adapter(a), read_adapter(b)]
    cat = compose_layers(parents, [1.0, 1.0], "cat")
    full = compose_layers(parents, [1.0, 1.0], "svd", rank=8)
    low = compose_layers(parents, [1.0, 1.0], "svd", rank=2)
    for key, layer in cat.layers.items():
        exact = layer.delta()
        assert torch.allclose(full.layers[key].delta(), exact, atol=1e-5)
        singular = torch.linalg.svdvals(exact.double())
        discarded = float(singular[2:].square().sum().sqrt())
        assert float(torch.linalg.norm((low.layers[key].delta() - exact).double())) == pytest.approx(
            discarded, rel=1e-4, abs=1e-7
        )
        assert low.errors[key] == pytest.approx(discarded / float(singular.square().sum().sqrt()), rel=1e-4, abs=1e-7)
        assert low.layers[key].rank == 2


def test_pruning_methods_work_on_the_updates(make_run, tmp_path):
    a, b = make_run("a", seed=1), make_run("b", seed=2)
    pa, pb = read_adapter(a), read_adapter(b)
    exact = compose_layers([pa, pb], [1.0, 1.0], "cat")
    everything = compose_layers([pa, pb], [1.0, 1.0], "magnitude_prune", density=1.0, rank=64)
    linear = compose_layers([pa, pb], [1.0, 1.0], "dare_linear", density=1.0, rank=64)
    for key in exact.layers:
        assert torch.allclose(everything.layers[key].delta(), exact.layers[key].delta(), atol=1e-5)
        assert torch.allclose(linear.layers[key].delta(), exact.layers[key].delta(), atol=1e-5)
    # TIES of an adapter with itself is the adapter (agreeing signs, mean of the agreeing entries)
    itself = compose_layers([pa, pa], [1.0, 1.0], "ties", density=1.0, rank=64)
    for key, layer in pa.layers.items():
        assert torch.allclose(itself.layers[key].delta(), layer.delta(), atol=1e-5)
    # magnitude pruning keeps the largest entries of each update
    half = compose_layers([pa], [1.0], "magnitude_prune", density=0.5, rank=64)
    for key, layer in pa.layers.items():
        delta, kept = layer.delta(), half.layers[key].delta()
        assert (kept.abs() > 1e-6).float().mean() == pytest.approx(0.5, abs=0.1)
        big = delta.abs() > delta.abs().flatten().median()
        assert torch.allclose(kept[big], delta[big], atol=1e-5)
    # DARE is reproducible with its seed and differs with another
    one = compose_layers([pa, pb], [1.0, 1.0], "dare_ties", density=0.5, rank=64, seed=1)
    same = compose_layers([pa, pb], [1.0, 1.0], "dare_ties", density=0.5, rank=64, seed=1)
    other = compose_layers([pa, pb], [1.0, 1.0], "dare_ties", density=0.5, rank=64, seed=2)
    key = next(iter(one.layers))
    assert torch.equal(one.layers[key].delta(), same.layers[key].delta())
    assert not torch.allclose(one.layers[key].delta(), other.layers[key].delta())


def test_refusals_name_what_does_not_fit(make_run, toy, tmp_path):
    a, b = make_run("a", seed=1), make_run("b", seed=2)
    with pytest.raises(ConfigError, match="at least two adapters"):
        compose([str(a)], tmp_path / "x", evaluate=False)
    with pytest.raises(ConfigError, match="--weights: 3 weight\\(s\\) for 2 adapters"):
        compose([str(a), str(b)], tmp_path / "x", weights=[1, 1, 1], evaluate=False)
    with pytest.raises(ConfigError, match="--rank does not apply to cat"):
        compose([str(a), str(b)], tmp_path / "x", rank=2, evaluate=False)
    with pytest.raises(ConfigError, match="--method ties needs --density"):
        compose([str(a), str(b)], tmp_path / "x", method="ties", evaluate=False)
    dora = make_run("dora", peft={"method": "dora", "r": 4, "alpha": 8})
    with pytest.raises(ConfigError, match="a DoRA adapter; its magnitude vectors"):
        compose([str(a), str(dora)], tmp_path / "x", evaluate=False)
    ia3 = tmp_path / "ia3"  # the toy modality trains no IA3: an IA3 directory as peft writes one
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["encoder"]}))
    from safetensors.torch import save_file

    save_file({"base_model.model.encoder.ia3_l": torch.ones(16, 1)}, str(ia3 / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="a ia3 adapter; composition needs LoRA"):
        read_adapter(ia3)
    toy.write_base(tmp_path / "other-base", seed=7)
    other = make_run("other", base=str(tmp_path / "other-base"))
    with pytest.raises(ConfigError, match="compose adapters of one base"):
        compose([str(a), str(other)], tmp_path / "x", evaluate=False)
    assert not (tmp_path / "x").exists()
    code = CliRunner().invoke(polyadapt.cli.cli, ["compose", str(a), str(other), "--output", str(tmp_path / "x")])
    assert code.exit_code == 2 and "compose adapters of one base" in code.output


def test_the_composition_is_judged_on_each_parent_s_data_and_is_an_ordinary_run(make_run, toy, tmp_path, monkeypatch):
    data_b = toy.write_data(tmp_path / "data-b", seed=11)
    general = toy.write_data(tmp_path / "general", seed=5)
    a = make_run("a", seed=1, steps=20, eval={"general_data": str(general)})
    b = make_run("b", seed=2, steps=20, data={"path": str(data_b)}, eval={"general_data": str(general)})
    result = CliRunner().invoke(
        polyadapt.cli.cli, ["compose", str(a), str(b), "--output", str(tmp_path / "ab"), "--weights", "0.5,0.5"]
    )
    assert result.exit_code == 0, result.output
    assert "cat of 2 adapters, rank 8" in result.output and "kept" in result.output
    record = json.loads((tmp_path / "ab" / "composition.json").read_text())
    rows = {row["set"]: row for row in record["table"]}
    assert set(rows) == {f"{a} held-out", f"{b} held-out", f"general ({general})"}
    for parent in (a, b):
        row = rows[f"{parent} held-out"]
        assert row["metric"] == "eval_loss" and row["parent"] < row["base"]
        assert row["kept"] == pytest.approx((row["base"] - row["composed"]) / (row["base"] - row["parent"]))
    manifest = json.loads((tmp_path / "ab" / "polyadapt.json").read_text())
    assert manifest["status"] == "complete" and manifest["composition"]["method"] == "cat"
    assert [p["reference"] for p in manifest["parents"]] == [str(a), str(b)]
    assert (
        manifest["parents"][1]["data"]["fingerprint"]
        == json.loads((b / "polyadapt.json").read_text())["data"]["fingerprint"]["sha256"]
    )
    assert manifest["metrics"]["general_after"] and len(manifest["evaluations"]) == 2
    # an ordinary run: evaluate, infer, export, the registry
    assert polyadapt.evaluate(tmp_path / "ab")["metrics"]
    assert (
        CliRunner().invoke(polyadapt.cli.cli, ["infer", str(tmp_path / "ab"), "--x", "0.1,0.2,0.3,0.4"]).exit_code == 0
    )
    from polyadapt import registry
    from polyadapt.export import export_run

    export_run(tmp_path / "ab", "merged", tmp_path / "merged")
    reg = registry.open(tmp_path / "reg")
    version = reg.push(tmp_path / "ab", "mix").version
    assert [p["reference"] for p in version.as_dict()["parents"]] == [str(a), str(b)]
    reg.close()


def test_registry_references_compose(make_run, tmp_path, monkeypatch):
    from polyadapt import registry

    a, b = make_run("a", seed=1), make_run("b", seed=2)
    reg = registry.open(tmp_path / "reg")
    reg.push(a, "cards")
    reg.push(b, "loans")
    reg.alias("loans@v1", "production")
    reg.close()
    monkeypatch.setenv("POLYADAPT_CACHE", str(tmp_path / "cache"))
    result = compose(["cards@v1", "loans@production"], tmp_path / "ab", evaluate=False, registry=str(tmp_path / "reg"))
    assert result["parents"] == ["cards@v1", "loans@production"]
    for key, delta in deltas(tmp_path / "ab").items():
        assert torch.allclose(delta, deltas(a)[key] + deltas(b)[key], atol=1e-6)
