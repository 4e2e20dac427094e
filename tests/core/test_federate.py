"""``polyadapt federate`` on the toy modality: the aggregators' algebra (``ffa`` and ``stack`` exact, ``fedavg`` not),
sample weighting, client-side DP and its budget, broken sites, and the result as an ordinary run directory."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import polyadapt.cli
from polyadapt.federated.aggregate import (
    GlobalAdapter,
    aggregate,
    applied_delta,
    exact_mean,
    relative_error,
    site_update,
    weights_of,
)
from polyadapt.federated.privacy import gaussian_epsilon, gaussian_rdp, privatize, rdp_to_epsilon
from polyadapt.lora import LoraLayer, read_adapter
from tests.core.conftest import run_cli


# -- the algebra, on random factors ----------------------------------------------------------------------------------
def random_layers(seed: int, b_zero: bool = False) -> dict[str, LoraLayer]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"q": (12, 10), "v": (7, 10)}
    layers = {}
    for key, (out, inp) in shapes.items():
        A = torch.randn(3, inp, generator=generator)
        B = torch.zeros(out, 3) if b_zero else torch.randn(out, 3, generator=generator)
        layers[key] = LoraLayer(A, B, 2.0)
    return layers


def trained_from(start: dict[str, LoraLayer], seed: int, train_a: bool) -> dict[str, LoraLayer]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: LoraLayer(
            layer.A + (0.3 * torch.randn(layer.A.shape, generator=generator) if train_a else 0),
            layer.B + 0.3 * torch.randn(layer.B.shape, generator=generator),
            layer.scale,
        )
        for key, layer in start.items()
    }


CASES = [
    # aggregator, sites train A, start from B = 0 (stack's fresh adapter), exact
    ("ffa", False, False, True),
    ("stack", True, True, True),
    ("fedavg", True, False, False),
]


@pytest.mark.parametrize(("method", "train_a", "b_zero", "exact"), CASES)
def test_ffa_and_stack_equal_the_exact_weighted_mean_of_updates_and_fedavg_does_not(method, train_a, b_zero, exact):
    start = random_layers(0, b_zero=b_zero)
    state = GlobalAdapter(layers=start)
    updates = [site_update(start, trained_from(start, 10 + i, train_a), train_a) for i in range(3)]
    weights = weights_of([10, 30, 60])
    new = aggregate(method, state, start, updates, weights)
    got, expected = applied_delta(method, state, new, start), exact_mean(start, updates, weights)
    error = relative_error(got, expected)
    if exact:
        assert error < 1e-6
    else:  # the gap: the product of the means of A and B is not the mean of the products
        assert error > 1e-2
    # ffa sends B only; the others send both factors
    assert all(k.endswith(".B") for k in updates[0]) == (method == "ffa")


def test_stack_rank_grows_by_the_sites_ranks_each_round_and_stays_exact():
    start = random_layers(1, b_zero=True)
    state = GlobalAdapter(layers=start)
    for number in range(2):
        updates = [site_update(start, trained_from(start, 20 + 2 * number + i, True), True) for i in range(2)]
        new = aggregate("stack", state, start, updates, [0.5, 0.5])
        assert relative_error(applied_delta("stack", state, new, start), exact_mean(start, updates, [0.5, 0.5])) < 1e-6
        state = new
    assert state.merged_rank == 2 * 2 * 3


def test_sites_are_weighted_by_their_sample_counts():
    assert weights_of([10, 30]) == [0.25, 0.75]
    start = random_layers(2)
    updates = [site_update(start, trained_from(start, 30 + i, False), False) for i in range(2)]
    new = aggregate("ffa", GlobalAdapter(layers=start), start, updates, weights_of([10, 30]))
    for key, layer in start.items():
        expected = layer.B + 0.25 * updates[0][f"{key}.B"] + 0.75 * updates[1][f"{key}.B"]
        assert torch.allclose(new.layers[key].B, expected, atol=1e-6)
        assert torch.equal(new.layers[key].A, layer.A)  # A never moves under ffa
    equal = aggregate("ffa", GlobalAdapter(layers=start), start, updates, weights_of([20, 20]))
    assert not torch.allclose(equal.layers["q"].B, new.layers["q"].B)


# -- differential privacy ----------------------------------------------------------------------------------------------
def test_updates_are_clipped_to_the_norm_and_noised_at_sigma_times_clip():
    generator = torch.Generator().manual_seed(0)
    big = {"a": torch.full((100,), 1.0), "b": torch.full((44,), 1.0)}  # norm 12
    done = privatize(big, clip=3.0, noise_multiplier=0.0, generator=generator)
    assert done.norm == pytest.approx(12.0) and done.scale == pytest.approx(0.25)
    assert math.sqrt(sum(float(t.square().sum()) for t in big.values())) == pytest.approx(3.0, rel=1e-6)
    small = {"a": torch.full((4,), 0.5)}  # norm 1, under the clip: unchanged
    privatize(small, clip=3.0, noise_multiplier=0.0, generator=generator)
    assert torch.allclose(small["a"], torch.full((4,), 0.5))
    zeros = {"a": torch.zeros(40_000)}
    privatize(zeros, clip=2.0, noise_multiplier=0.5, generator=generator)
    assert float(zeros["a"].std()) == pytest.approx(1.0, rel=0.05)  # sigma * clip
    assert abs(float(zeros["a"].mean())) < 0.05


@pytest.mark.parametrize(
    ("sigma", "rounds", "delta"), [(1.0, 1, 1e-5), (2.0, 10, 1e-5), (0.8, 3, 1e-6), (5.0, 50, 1e-5)]
)
def test_epsilon_is_the_rdp_conversion_of_composed_gaussian_releases(sigma, rounds, delta):
    # rdp(alpha) = T alpha / (2 sigma^2); min over alpha of rdp + log(1/delta)/(alpha-1) is a + 2 sqrt(a L) at
    # alpha* = 1 + sqrt(L / a), with a = T / (2 sigma^2), L = log(1/delta)
    a, L = rounds / (2 * sigma**2), math.log(1 / delta)
    optimum = a + 2 * math.sqrt(a * L)
    epsilon = gaussian_epsilon(sigma, rounds, delta)
    assert optimum <= epsilon <= optimum * 1.01
    assert gaussian_rdp(sigma, orders=[2.0, 8.0], rounds=rounds) == pytest.approx([2 * a, 8 * a])
    assert gaussian_epsilon(sigma, rounds + 1, delta) > epsilon


def test_known_epsilon_values_and_no_noise_gives_no_guarantee():
    # sigma = 1, one release, delta = 1e-5: 0.5 + 2 sqrt(0.5 ln 1e5) = 5.2985...
    assert gaussian_epsilon(1.0, 1, 1e-5) == pytest.approx(5.2985, abs=0.01)
    assert rdp_to_epsilon([1.0], 1e-5, orders=[3.0])[0] == pytest.approx(1.0 + math.log(1e5) / 2)
    assert gaussian_epsilon(0.0, 1, 1e-5) == math.inf


# -- real runs on the toy modality -------------------------------------------------------------------------------------
@pytest.fixture
def sites(toy, tmp_path):
    return [toy.write_data(tmp_path / f"branch-{i}", n=16 * (i + 1), seed=10 + i) for i in range(3)]


@pytest.fixture
def fed_config(toy_config):
    def make(**federate) -> Path:
        return toy_config(
            "fed.yaml", train={"max_steps": 4, "lr": 0.02}, eval={"general_data": None},
            **({"federate": federate} if federate else {}),
        )  # fmt: skip

    return make


def manifest_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "polyadapt.json").read_text())


@pytest.mark.parametrize("method", ["ffa", "stack", "fedavg"])
def test_a_federated_run_is_an_ordinary_run_with_its_lineage(method, fed_config, sites, tmp_path):
    from polyadapt import registry
    from polyadapt.federated import federate
    from polyadapt.lifecycle import evaluate, open_run

    run_dir = federate(fed_config(), sites[:2], rounds=2, aggregate=method, output=tmp_path / f"fed-{method}")
    path, manifest, _ = open_run(run_dir)
    federation = manifest.federation
    assert federation["aggregate"] == method and federation["exact"] == (method != "fedavg")
    errors = [r["relative_error_vs_exact_mean"] for r in federation["history"]]
    assert len(errors) == 2
    if method == "fedavg":
        assert min(errors) > 1e-4
    else:
        assert max(errors) < 1e-6
    names = [s["name"] for s in federation["sites"]]
    assert names == ["branch-0", "branch-1"]
    assert [s["train_samples"] for s in federation["sites"]] == [16, 32]
    assert federation["history"][0]["weights"] == pytest.approx([1 / 3, 2 / 3])
    assert all(len(s["data_fingerprint"]) == 64 for s in federation["sites"])
    assert "branch-0" not in json.dumps(manifest.data.fingerprint["sha256"])
    for record in federation["history"]:
        assert record["bytes_up"] > 0 and record["bytes_down"] > 0
        assert record["full_model_bytes_per_site_and_way"] > 0
    # learns: the pooled held-out loss falls
    assert manifest.metrics.after["eval_loss"] < manifest.metrics.before["eval_loss"]
    # the saved adapter is the one that was evaluated: re-evaluating site 0 from the files gives its recorded metrics
    report = evaluate(run_dir, data=sites[0])
    after = {row["metric"]: row["after"] for row in report["metrics"]}
    assert after["eval_loss"] == pytest.approx(federation["sites"][0]["metrics_after"]["eval_loss"], rel=1e-4)
    adapter = read_adapter(path)  # compose's reader
    assert adapter.ranks == {4}
    if method == "stack":
        energy = federation["stack_discarded_energy"]
        assert 0 <= energy["max"] < 1 and set(energy["per_layer"]) == set(adapter.layers)
    reg = registry.open(tmp_path / "registry")
    try:
        assert reg.push(run_dir, f"fed-{method}").version.label == f"fed-{method}@v1"
    finally:
        reg.close()


def test_ffa_sends_only_b_and_keeps_a_at_the_shared_seed(fed_config, sites, tmp_path):
    from polyadapt.federated import federate

    ffa = federate(fed_config(), sites[:2], rounds=1, aggregate="ffa", output=tmp_path / "ffa")
    fedavg = federate(fed_config(), sites[:2], rounds=1, aggregate="fedavg", output=tmp_path / "fedavg")
    up = [manifest_of(r)["federation"]["history"][0]["bytes_up"] for r in (ffa, fedavg)]
    assert up[0] < up[1]
    a_ffa = {k: v.A for k, v in read_adapter(ffa).layers.items()}
    # a one-round fedavg moves A; ffa's A is the initial A every site draws from the seed (same for both runs)
    a_fedavg = {k: v.A for k, v in read_adapter(fedavg).layers.items()}
    assert any(not torch.allclose(a_ffa[k], a_fedavg[k]) for k in a_ffa)
    again = federate(fed_config(), sites[1:], rounds=1, aggregate="ffa", output=tmp_path / "ffa-other-sites")
    assert all(torch.equal(a_ffa[k], v.A) for k, v in read_adapter(again).layers.items())


def test_dp_reports_epsilon_per_round(fed_config, sites, tmp_path):
    from polyadapt.federated import federate

    config = fed_config(dp={"clip": 0.5, "noise_multiplier": 1.1, "delta": 1e-5})
    run_dir = federate(config, sites[:2], rounds=3, output=tmp_path / "dp")
    federation = manifest_of(run_dir)["federation"]
    epsilons = [r["epsilon"] for r in federation["history"]]
    assert epsilons == pytest.approx([gaussian_epsilon(1.1, n, 1e-5) for n in (1, 2, 3)])
    assert epsilons[0] < epsilons[1] < epsilons[2] == pytest.approx(federation["dp"]["epsilon"])
    norms = [s["update_norm"] for r in federation["history"] for s in r["local"].values()]
    assert all(n > 0 for n in norms)
    # still exact: the aggregate is the exact mean of the (noised) updates
    assert max(r["relative_error_vs_exact_mean"] for r in federation["history"]) < 1e-6


def test_a_site_with_broken_data_is_named_and_the_run_stops_before_writing(fed_config, sites, tmp_path):
    broken = sites[1] / "train.jsonl"
    broken.write_text(broken.read_text() + "{not json\n")
    before = {p: p.read_bytes() for s in sites for p in s.iterdir()}
    out = tmp_path / "stopped"
    result = CliRunner().invoke(
        polyadapt.cli.cli,
        ["federate", str(fed_config()), "--sites", ",".join(map(str, sites)), "--rounds", "1", "--output", str(out)],
    )
    assert result.exit_code == 2, result.output
    assert "site branch-1" in result.output and "train.jsonl" in result.output
    assert "branch-0" not in result.output and "branch-2" not in result.output
    assert not out.exists()
    assert {p: p.read_bytes() for s in sites for p in s.iterdir()} == before


def test_with_skip_a_broken_site_is_left_out_and_the_others_train(fed_config, sites, tmp_path):
    from polyadapt.federated import federate

    (sites[2] / "train.jsonl").write_text('{"x": [1, 2, 3, 4]}\n')  # no "y"
    run_dir = federate(fed_config(on_site_failure="skip"), sites, rounds=2, output=tmp_path / "skip")
    federation = manifest_of(run_dir)["federation"]
    assert [s["name"] for s in federation["sites"]] == ["branch-0", "branch-1"]
    assert federation["skipped"][0]["site"] == "branch-2" and "'y'" in federation["skipped"][0]["reason"]
    assert all(r["sites"] == ["branch-0", "branch-1"] for r in federation["history"])


def test_federate_refuses_what_it_cannot_aggregate(fed_config, sites, tmp_path, toy_config):
    from polyadapt.errors import ConfigError
    from polyadapt.federated import federate

    dora = toy_config("dora.yaml", peft={"method": "dora"})
    with pytest.raises(ConfigError, match="not LoRA"):
        federate(dora, sites[:2], rounds=1, output=tmp_path / "dora")
    with pytest.raises(ConfigError, match="federate.aggregate"):
        polyadapt.config.load_config(fed_config(aggregate="mean"))
    with pytest.raises(ConfigError, match="federate.dp.clip"):
        polyadapt.config.load_config(fed_config(dp={"clip": 0, "noise_multiplier": 1.0}))


def test_the_cli_runs_two_sites_for_two_rounds_into_a_verified_run(fed_config, sites, tmp_path):
    from polyadapt.lifecycle import open_run

    out = tmp_path / "cli-run"
    result = run_cli(
        "federate", str(fed_config()), "--sites", f"{sites[0]},{sites[1]}", "--rounds", "2", "--aggregate", "stack",
        "--output", str(out), check=True,
    )  # fmt: skip
    assert "round 2/2 [stack, exact]" in result.stderr
    assert "branch-0" in result.stdout and "aggregate: stack, exact" in result.stdout
    _, manifest, config = open_run(out)
    assert manifest.status == "complete" and config.federate.aggregate == "stack" and config.federate.rounds == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_federated_runs_compose_like_any_adapter(fed_config, sites, tmp_path):
    from polyadapt.compose import compose
    from polyadapt.federated import federate

    runs = [
        federate(fed_config(), sites[:2], rounds=1, aggregate=method, output=tmp_path / method)
        for method in ("ffa", "stack")
    ]
    result = compose([str(r) for r in runs], tmp_path / "composed", evaluate=False)
    assert result["rank"] == 8
    composed = json.loads((tmp_path / "composed" / "polyadapt.json").read_text())
    assert [p["data"]["fingerprint"] for p in composed["parents"]] == [
        manifest_of(r)["data"]["fingerprint"]["sha256"] for r in runs
    ]


# -- the Flower transport: a ServerApp with the recipe's aggregation, one ClientApp per site, Flower's simulation ----
ROOT = Path(__file__).resolve().parents[2]


def flower_python() -> Path:
    """The interpreter of the environment `make flower-env` builds; skipped with the reason when it is missing,
    unless POLYADAPT_REQUIRE_FLOWER is set (CI), where a missing environment fails."""
    python = ROOT / ".venv-flower" / "bin" / "python"
    if not python.exists():
        message = f"{python} is missing: run `make flower-env`"
        if os.environ.get("POLYADAPT_REQUIRE_FLOWER"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def flower_federate(config: Path, sites: list[Path], method: str, out: Path) -> dict:
    args = ["federate", str(config), "--sites", ",".join(map(str, sites)), "--rounds", "2", "--aggregate", method]
    result = subprocess.run(
        [str(flower_python()), "-m", "polyadapt", *args, "--transport", "flower", "--output", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_DEDUP_LOGS": "0"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "round 2/2" in result.stderr and "flower" in result.stdout
    return manifest_of(out)["federation"]


def assert_same_federation(flower: dict, local: dict, flower_dir: Path, local_dir: Path) -> None:
    assert (flower["transport"], local["transport"]) == ("flower", "simulation")
    assert [s["name"] for s in flower["sites"]] == [s["name"] for s in local["sites"]]
    for ours, theirs in zip(flower["history"], local["history"], strict=True):
        assert ours["sites"] == theirs["sites"]
        assert ours["relative_error_vs_exact_mean"] < 1e-6
        assert ours["weights"] == pytest.approx(theirs["weights"])
        assert (ours["bytes_up"], ours["bytes_down"]) == (theirs["bytes_up"], theirs["bytes_down"])
        assert ours["mean_local_loss"] == pytest.approx(theirs["mean_local_loss"], rel=1e-5)
    got, expected = read_adapter(flower_dir).layers, read_adapter(local_dir).layers
    assert set(got) == set(expected)
    for key in got:
        torch.testing.assert_close(got[key].A, expected[key].A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[key].B, expected[key].B, rtol=1e-5, atol=1e-6)


def test_flower_simulation_gives_the_in_process_adapter(fed_config, sites, tmp_path):
    """Two sites, two rounds as Flower ClientApps in Ray workers, aggregated by the strategy: the same exact
    aggregation, bytes and adapter as the in-process simulation from the same seed. ``stack`` takes the longest
    client path (the merged earlier rounds go down to every site, fresh factors come back); the aggregators are
    the transport's business no more than the in-process one's."""
    from polyadapt.federated import federate

    flower = flower_federate(fed_config(), sites[:2], "stack", tmp_path / "flower")
    local = federate(fed_config(), sites[:2], rounds=2, aggregate="stack", output=tmp_path / "local")
    assert_same_federation(flower, manifest_of(local)["federation"], tmp_path / "flower", local)


def test_flower_nodes_train_the_right_sites_when_one_is_left_out(fed_config, sites, tmp_path):
    """The first of three sites is broken and skipped: the two Flower nodes (partitions 0 and 1) are sites 1 and 2,
    each seeded as the in-process run seeds them."""
    from polyadapt.federated import federate

    (sites[0] / "train.jsonl").write_text('{"x": [1, 2, 3, 4]}\n')  # no "y"
    config = fed_config(on_site_failure="skip")
    flower = flower_federate(config, sites, "ffa", tmp_path / "flower")
    local = federate(config, sites, rounds=2, aggregate="ffa", output=tmp_path / "local")
    assert [s["name"] for s in flower["sites"]] == ["branch-1", "branch-2"]
    assert_same_federation(flower, manifest_of(local)["federation"], tmp_path / "flower", local)


def test_the_flower_transport_without_flwr_names_the_way_out(fed_config, sites, tmp_path):
    import importlib.util

    if importlib.util.find_spec("flwr") is not None:
        pytest.skip("flwr is importable in this environment")
    out = tmp_path / "no-flower"
    result = run_cli(
        "federate", str(fed_config()), "--sites", f"{sites[0]},{sites[1]}", "--transport", "flower",
        "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "make flower-env" in result.stderr and "federate.transport" in result.stderr
    assert not out.exists()
