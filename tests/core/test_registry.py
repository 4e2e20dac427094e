"""The adapter registry on every backend: a directory (SQLite + local files), SQLite with fsspec's in-memory
filesystem, and a real PostgreSQL server with in-memory files. Runs are real toy-modality runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

import polyadapt
from polyadapt import registry
from polyadapt.errors import PromotionRefused, RegistryError, RunDirectoryError

BACKENDS = ["directory", "sqlite+memory", "postgresql+memory"]


# -- fixtures --------------------------------------------------------------------------------------------------------
def write_base_outputs(toy, base: Path, directory: Path, n: int = 32) -> Path:
    """General data the base already gets right: its own predictions as labels (adapting can only lose them)."""
    import random

    import torch
    from safetensors.torch import load_file

    config = json.loads((base / "config.json").read_text())
    net = toy.build_net(config["features"], config["hidden"])
    net.load_state_dict(load_file(str(base / "model.safetensors")))
    rng = random.Random(9)
    rows = []
    for _ in range(n):
        x = [rng.uniform(-1, 1) for _ in range(config["features"])]
        with torch.no_grad():
            y = float(net(torch.tensor([x]))[0]) + rng.uniform(-0.05, 0.05)
        rows.append(json.dumps({"x": x, "y": y}))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.jsonl").write_text("\n".join(rows) + "\n")
    (directory / "validation.jsonl").write_text("\n".join(rows) + "\n")
    return directory


@pytest.fixture
def make_run(toy, toy_config, tmp_path):
    """Adapt the toy modality; ``general`` is ``"domain"`` (data like the training set: it improves) or
    ``"base"`` (the base's own outputs: adapting forgets them)."""
    general_sets = {
        "domain": toy.write_data(tmp_path / "general-domain", seed=5),
        "base": write_base_outputs(toy, tmp_path / "base", tmp_path / "general-base"),
    }

    def make(name: str, steps: int = 12, general: str | None = "domain") -> Path:
        evaluation = {"general_data": str(general_sets[general])} if general else {"general_data": None}
        config = toy_config(f"{name}.yaml", output=str(tmp_path / name), train={"max_steps": steps}, eval=evaluation)
        return polyadapt.adapt(config)

    return make


@pytest.fixture
def open_registry(request, tmp_path):
    """Open a registry on a backend by name; every registry opened is closed at the end."""
    opened = []

    def make(backend: str = "directory") -> registry.Registry:
        if backend == "directory":
            reg = registry.open(tmp_path / f"registry-{len(opened)}")
        elif backend == "sqlite+memory":
            reg = registry.open(f"sqlite:///{tmp_path}/meta-{len(opened)}.db", files=f"memory://{uuid.uuid4().hex}")
        else:
            from tests.postgres import new_database

            server = request.getfixturevalue("postgres_server_url")
            reg = registry.open(new_database(server), files=f"memory://{uuid.uuid4().hex}")
        opened.append(reg)
        return reg

    yield make
    for reg in opened:
        reg.close()


def cli(*args: str, registry_at: str | Path) -> tuple[int, str]:
    from polyadapt.cli import cli as group

    result = CliRunner().invoke(group, [*args, "--registry", str(registry_at)])
    return result.exit_code, result.output


# -- push, list, show, diff ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_push_numbers_versions_and_the_same_content_gives_its_version_back(backend, make_run, open_registry):
    reg = open_registry(backend)
    first, second = make_run("first"), make_run("second", steps=24)
    pushed = reg.push(first, "support", tags={"team": "cards"}, description="first try")
    assert pushed.created and pushed.version.label == "support@v1"
    assert reg.push(second, "support").version.label == "support@v2"
    again = reg.push(first, "support")
    assert not again.created and again.version.label == "support@v1"
    assert [v.label for v in reg.versions("support")] == ["support@v1", "support@v2"]
    assert reg.names() == [{"name": "support", "kind": "adapter", "versions": 2, "latest": 2, "aliases": {}}]
    assert reg.get("support").label == reg.get("support@latest").label == "support@v2"


@pytest.mark.parametrize("backend", BACKENDS)
def test_show_holds_the_lineage_from_data_to_files(backend, make_run, open_registry):
    reg = open_registry(backend)
    run = make_run("run")
    manifest = json.loads((run / "polyadapt.json").read_text())
    info = reg.push(run, "support", tags={"team": "cards"}).version.as_dict()
    assert info["modality"] == "toy"
    assert info["base"]["reference"] == manifest["base"]["reference"]
    assert info["base"]["weights_sha256"] == manifest["base"]["weights_sha256"] and len(info["base"]["sha256"]) == 64
    assert info["data"]["fingerprint"] == manifest["data"]["fingerprint"]["sha256"]
    assert info["data"]["counts"] == manifest["data"]["counts"]
    assert info["config"] == manifest["config"]
    assert info["code"]["polyadapt"] == manifest["polyadapt_version"] and "torch" in info["code"]["libraries"]
    assert info["metrics"]["before"] == manifest["metrics"]["before"]
    assert info["metrics"]["after"] == manifest["metrics"]["after"]
    assert info["metrics"]["general_after"] == manifest["metrics"]["general_after"]
    for name, digest in manifest["adapter"]["files"].items():
        assert info["files"][name]["sha256"] == digest
    assert "polyadapt.json" in info["files"] and info["tags"] == {"team": "cards"} and info["parents"] == []


def test_the_cli_prints_labels_lists_shows_and_diffs(make_run, tmp_path):
    at = tmp_path / "reg"
    first, second = make_run("first"), make_run("second", steps=24)
    assert cli("registry", "push", str(first), "--name", "support", "--tag", "team=cards", registry_at=at) == (
        0, "support@v1\n",
    )  # fmt: skip
    code, out = cli("registry", "push", str(first), "--name", "support", registry_at=at)
    assert code == 0 and "support@v1" in out and "already stored" in out
    assert cli("registry", "push", str(second), "--name", "support", registry_at=at)[1] == "support@v2\n"
    code, out = cli("registry", "list", registry_at=at)
    assert code == 0 and out.startswith("support  2 version(s), latest v2")
    code, out = cli("registry", "list", "support", "--json", registry_at=at)
    assert [v["label"] for v in json.loads(out)] == ["support@v1", "support@v2"]
    code, out = cli("registry", "show", "support@v1", "--json", registry_at=at)
    assert json.loads(out)["tags"] == {"team": "cards"}
    code, out = cli("registry", "show", "support@v2", registry_at=at)
    assert code == 0 and "adapter_model.safetensors" in out and "headline:  eval_loss" in out
    code, out = cli("registry", "diff", "support@v1", "support@v2", registry_at=at)
    assert code == 0 and "config.train.max_steps: 12 -> 24" in out and "metrics.after.eval_loss" in out


def test_push_refuses_what_is_not_a_complete_run_or_a_bad_name(make_run, toy_config, tmp_path):
    reg = registry.open(tmp_path / "reg")
    run = make_run("run")
    with pytest.raises(RegistryError, match="'Support!' is not allowed"):
        reg.push(run, "Support!")
    with pytest.raises(RunDirectoryError, match="is not a polyadapt run"):
        reg.push(tmp_path, "support")
    manifest = json.loads((run / "polyadapt.json").read_text())
    manifest["status"] = "failed"
    (run / "polyadapt.json").write_text(json.dumps(manifest))
    code, out = cli("registry", "push", str(run), "--name", "support", registry_at=tmp_path / "reg")
    assert code == 2 and "is not a complete run (status: failed)" in out
    assert reg.names() == []
    reg.close()


def test_a_directory_that_is_not_a_registry_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(RegistryError, match="is not a polyadapt registry"):
        registry.open(tmp_path / "notes")
    code, out = cli("registry", "list", registry_at=tmp_path / "missing")
    assert code == 2 and "no registry at" in out


# -- aliases, promotion, rollback, history ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_promotion_is_gated_on_gain_forgetting_and_the_incumbent(backend, make_run, open_registry):
    reg = open_registry(backend)
    weaker, stronger = make_run("weaker", steps=4), make_run("stronger", steps=40)
    forgets = make_run("forgets", steps=32, general="base")
    w, s, f = (reg.push(run, "support").version.label for run in (weaker, stronger, forgets))
    after = {label: reg.get(label).summary["metrics"]["after"]["eval_loss"] for label in (w, s)}
    assert after[s] < after[w]  # more steps, lower held-out loss

    promotion = reg.promote(s, "production")
    assert all(c.passed for c in promotion.conditions) and promotion.event.action == "gated"
    assert {c.name for c in promotion.conditions} >= {"gain", "forgetting:eval_loss", "forgetting:mae"}

    with pytest.raises(PromotionRefused) as refused:
        reg.promote(w, "production")
    failed = {c.name: c.detail for c in refused.value.conditions if not c.passed}
    assert list(failed) == ["incumbent"] and f"for {s}" in failed["incumbent"]

    with pytest.raises(PromotionRefused) as refused:
        reg.promote(f, "staging")
    failed = {c.name: c.detail for c in refused.value.conditions if not c.passed}
    assert "forgetting:eval_loss" in failed and "budget 5.0%" in failed["forgetting:eval_loss"]
    assert reg.alias_target("support", "staging") is None  # nothing moved
    # a looser budget lets it through; a gain above what it reached does not
    general = reg.get(f).summary["metrics"]
    regression = general["general_after"]["mae"] / general["general_before"]["mae"] - 1
    assert regression > 0.05
    with pytest.raises(PromotionRefused, match="gain"):
        reg.promote(f, "staging", max_forgetting=1e9, min_gain=1e6)
    assert reg.promote(f, "staging", max_forgetting=1e9).event.to_version == 3

    with pytest.raises(RegistryError, match="--force needs --reason"):
        reg.promote(w, "production", force=True)
    forced = reg.promote(w, "production", force=True, reason="hotfix for ticket 12")
    assert forced.event.action == "forced" and forced.event.from_version == 2
    assert [e.action for e in reg.history("support")] == ["gated", "gated", "forced"]


def test_a_refused_promotion_lists_every_failed_condition_and_exits_2(make_run, tmp_path):
    at = tmp_path / "reg"
    forgets = make_run("forgets", steps=32, general="base")
    cli("registry", "push", str(forgets), "--name", "support", registry_at=at)
    code, out = cli("registry", "promote", "support@v1", "production", registry_at=at)
    assert code == 2 and "promotion of support@v1 to @production refused" in out
    assert "forgetting:eval_loss" in out and "forgetting:mae" in out and "% worse; budget 5.0%" in out
    code, out = cli(
        "registry", "promote", "support@v1", "production", "--force", "--reason", "accepted", registry_at=at
    )
    assert code == 0 and "[FAIL] forgetting:mae" in out and "support@production: nothing -> v1 (forced)" in out
    code, out = cli("registry", "history", "support", "--json", registry_at=at)
    (event,) = json.loads(out)
    assert event["action"] == "forced" and event["reason"] == "accepted" and event["by"]
    assert any(not c["passed"] for c in event["details"]["conditions"])


def test_a_run_without_general_data_cannot_pass_the_forgetting_gate(make_run, tmp_path):
    reg = registry.open(tmp_path / "reg")
    label = reg.push(make_run("plain", general=None), "support").version.label
    with pytest.raises(PromotionRefused, match="no general-data metrics recorded"):
        reg.promote(label, "production")
    reg.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_after_three_promotions_walks_back_one_version_at_a_time(backend, make_run, open_registry):
    reg = open_registry(backend)
    for steps in (4, 12, 40):
        reg.push(make_run(f"run-{steps}", steps=steps), "support")
    for version in (1, 2, 3):
        reg.promote(f"support@v{version}", "production")
    assert reg.get("support@production").version == 3
    assert reg.rollback("support", "production", reason="latency").to_version == 2
    assert reg.get("support@production").version == 2
    assert reg.rollback("support", "production").to_version == 1
    with pytest.raises(RegistryError, match="no earlier version to roll back to"):
        reg.rollback("support", "production")
    moves = [(e.from_version, e.to_version, e.action) for e in reg.history("support")]
    assert moves == [(None, 1, "gated"), (1, 2, "gated"), (2, 3, "gated"), (3, 2, "rollback"), (2, 1, "rollback")]
    assert reg.history("support")[3].reason == "latency"


def test_alias_sets_without_checks_and_refuses_reserved_names(make_run, tmp_path):
    reg = registry.open(tmp_path / "reg")
    reg.push(make_run("plain", general=None), "support")
    assert reg.alias("support@v1", "canary").action == "set"
    assert reg.alias("support@v1", "canary").action == "unchanged"  # idempotent, and not in the history
    assert [e.action for e in reg.history("support")] == ["set"]
    assert reg.get("support@canary").version == 1 and reg.get("support@v1").aliases == ["canary"]
    for reserved in ("v2", "latest"):
        with pytest.raises(RegistryError, match="reserved"):
            reg.alias("support@v1", reserved)
    with pytest.raises(RegistryError, match="support has no alias 'production' \\(aliases: canary\\)"):
        reg.get("support@production")
    with pytest.raises(RegistryError, match="support@v7 does not exist \\(support has v1..v1"):
        reg.get("support@v7")
    reg.close()


# -- pull, verify, delete, gc ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_pull_writes_a_standard_adapter_directory_that_peft_loads(backend, make_run, open_registry, toy, tmp_path):
    reg = open_registry(backend)
    run = make_run("run")
    reg.push(run, "support")
    reg.alias("support@v1", "production")
    out = reg.pull("support@production", tmp_path / "pulled")
    for name in ("adapter_model.safetensors", "adapter_config.json", "polyadapt.json"):
        assert (out / name).read_bytes() == (run / name).read_bytes()
    card = (out / "README.md").read_text()
    assert "# support@v1" in card and "library_name: peft" in card and "aliases: @production" in card
    from peft import PeftModel

    config = json.loads((tmp_path / "base" / "config.json").read_text())
    model = PeftModel.from_pretrained(toy.build_net(config["features"], config["hidden"]), str(out))
    assert any("lora_A" in name for name, _ in model.named_parameters())
    with pytest.raises(RegistryError, match="exists and is not empty"):
        reg.pull("support@v1", out)


def test_pull_checks_digests_and_writes_nothing_when_a_file_is_altered(make_run, tmp_path):
    reg = registry.open(tmp_path / "reg")
    version = reg.push(make_run("run"), "support").version
    digest = version.files["adapter_model.safetensors"][0]
    stored = Path(reg.store.key(digest))
    stored.write_bytes(stored.read_bytes()[:-1] + b"\0")
    with pytest.raises(RegistryError, match="stored adapter_model.safetensors is altered"):
        reg.pull("support@v1", tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pulled")] == []
    reg.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_names_every_altered_or_missing_file(backend, make_run, open_registry):
    reg = open_registry(backend)
    version = reg.push(make_run("run"), "support").version
    checked, problems = reg.verify()
    assert checked == len(version.files) and problems == []
    altered, missing = version.files["adapter_model.safetensors"][0], version.files["adapter_config.json"][0]
    with reg.store.fs.open(reg.store.key(altered), "wb") as handle:
        handle.write(b"not the adapter")
    reg.store.remove(missing)
    _, problems = reg.verify("support")
    found = {p.path: p for p in problems}
    assert set(found) == {"adapter_model.safetensors", "adapter_config.json"}
    assert found["adapter_config.json"].actual is None and "is missing" in str(found["adapter_config.json"])
    assert "support@v1: adapter_model.safetensors is altered" in str(found["adapter_model.safetensors"])


def test_verify_exits_1_naming_the_file(make_run, tmp_path):
    at = tmp_path / "reg"
    cli("registry", "push", str(make_run("run")), "--name", "support", registry_at=at)
    assert cli("registry", "verify", registry_at=at) == (0, "4 stored file(s) verified\n")
    reg = registry.open(at)
    digest = reg.get("support@v1").files["adapter_model.safetensors"][0]
    Path(reg.store.key(digest)).write_bytes(b"tampered")
    reg.close()
    code, out = cli("registry", "verify", "support", registry_at=at)
    assert code == 1 and "support@v1: adapter_model.safetensors is altered" in out


@pytest.mark.parametrize("backend", BACKENDS)
def test_delete_is_refused_under_an_alias_numbers_are_never_reused_and_gc_frees_files(backend, make_run, open_registry):
    reg = open_registry(backend)
    first, second = make_run("first"), make_run("second", steps=24)
    reg.push(first, "support")
    reg.push(second, "support")
    reg.alias("support@v2", "production")
    with pytest.raises(RegistryError, match="support@v2 is what @production points at"):
        reg.delete("support@v2")
    assert reg.gc(grace_seconds=0).removed == 0
    reg.delete("support@v1")
    assert [v.version for v in reg.versions("support")] == [2]
    removed = reg.gc(grace_seconds=0)
    assert removed.removed >= 2 and removed.bytes > 0  # v1's adapter weights and manifest
    assert reg.verify() == (len(reg.get("support@v2").files), [])
    assert reg.push(first, "support").version.label == "support@v3"


# -- concurrency and crashes -----------------------------------------------------------------------------------------
def _cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.environ["PYTHONPATH"], **(extra or {})}


@pytest.mark.parametrize("backend", ["directory", "postgresql"])
def test_concurrent_pushers_in_separate_processes_each_get_their_own_version(backend, make_run, tmp_path, request):
    runs = [make_run(f"run-{i}", steps=4 + 4 * i) for i in range(4)]
    if backend == "directory":
        args = ["--registry", str(tmp_path / "reg")]
    else:
        from tests.postgres import new_database

        url = new_database(request.getfixturevalue("postgres_server_url"))
        args = ["--registry", url, "--registry-files", f"file://{tmp_path / 'files'}"]
    pushers = [
        subprocess.Popen(
            [sys.executable, "-m", "polyadapt", "registry", "push", str(run), "--name", "support", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_cli_env(),
        )  # fmt: skip
        for run in runs
    ]
    outputs = [p.communicate(timeout=300) for p in pushers]
    assert [p.returncode for p in pushers] == [0] * 4, outputs
    labels = sorted(out.strip() for out, _ in outputs)
    assert labels == ["support@v1", "support@v2", "support@v3", "support@v4"]
    reg = registry.open(args[1], files=args[3] if len(args) > 2 else None)
    by_source = {v.source: v.label for v in reg.versions("support")}
    assert sorted(by_source) == sorted(str(r.resolve()) for r in runs)
    assert reg.verify()[1] == []
    reg.close()


KILLER = """
import os, signal, sys
from polyadapt import registry
from polyadapt.registry.files import FileStore
put = FileStore.put
def put_then_die(self, source, digest):
    stored = put(self, source, digest)
    if source.name == "adapter_model.safetensors":
        os.kill(os.getpid(), signal.SIGKILL)
    return stored
FileStore.put = put_then_die
registry.open(sys.argv[1]).push(sys.argv[2], "support")
"""


def test_a_push_killed_half_way_leaves_no_version_and_nothing_verify_flags(make_run, tmp_path):
    run, at = make_run("run"), tmp_path / "reg"
    killed = subprocess.run([sys.executable, "-c", KILLER, str(at), str(run)], env=_cli_env(), capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    reg = registry.open(at)
    assert reg.names() == [] and reg.verify() == (0, [])
    assert reg.gc(grace_seconds=0).removed >= 1  # what it had stored, referenced by no version
    assert reg.push(run, "support").version.label == "support@v1" and reg.verify()[1] == []
    reg.close()


# -- the same results on every backend -------------------------------------------------------------------------------
def scenario(reg: registry.Registry, runs: dict[str, Path]) -> list:
    """A fixed sequence of commands; what each one answered."""
    seen: list = []
    for name in ("weak", "strong", "forgets", "weak"):
        result = reg.push(runs[name], "support")
        seen.append((result.version.label, result.created))
    for label, alias in (("support@v2", "production"), ("support@v1", "production"), ("support@v3", "staging")):
        try:
            seen.append(("promoted", reg.promote(label, alias).event.to_version))
        except PromotionRefused as exc:
            seen.append(("refused", sorted(c.name for c in exc.conditions if not c.passed)))
    seen.append(reg.alias("support@v1", "production").to_version)
    seen.append(reg.rollback("support", "production").to_version)
    seen.append([(e.alias, e.from_version, e.to_version, e.action) for e in reg.history("support")])
    seen.append(reg.names())
    seen.append(sorted(reg.diff("support@v1", "support@v2")["config"]))
    seen.append(reg.verify()[0])
    return seen


def test_sqlite_and_postgresql_give_the_same_results(make_run, open_registry):
    runs = {"weak": make_run("weak", steps=4), "strong": make_run("strong", steps=40),
            "forgets": make_run("forgets", steps=32, general="base")}  # fmt: skip
    results = {backend: scenario(open_registry(backend), runs) for backend in BACKENDS}
    assert results["directory"] == results["sqlite+memory"] == results["postgresql+memory"]
    assert results["directory"][:4] == [("support@v1", True), ("support@v2", True), ("support@v3", True),
                                         ("support@v1", False)]  # fmt: skip
    assert results["directory"][4:7] == [("promoted", 2), ("refused", ["incumbent"]),
                                         ("refused", ["forgetting:eval_loss", "forgetting:mae", "forgetting:max_abs_error"])]  # fmt: skip


# -- registry references and run-directory integrity -----------------------------------------------------------------
def test_evaluate_infer_and_export_take_a_registry_reference(make_run, tmp_path, monkeypatch):
    at = tmp_path / "reg"
    run = make_run("run")
    reg = registry.open(at)
    reg.push(run, "support")
    reg.alias("support@v1", "production")
    reg.close()
    monkeypatch.setenv("POLYADAPT_REGISTRY", str(at))
    monkeypatch.setenv("POLYADAPT_CACHE", str(tmp_path / "cache"))
    report = polyadapt.evaluate("support@production")
    assert {r["metric"] for r in report["metrics"]} >= {"eval_loss", "mae"}
    from polyadapt.export import export_run

    record = export_run("support@production", "merged", tmp_path / "merged")
    assert record["run"].startswith(str(tmp_path / "cache"))
    from polyadapt.cli import cli as group

    result = CliRunner().invoke(group, ["infer", "support@v1", "--x", "0.1,0.2,0.3,0.4"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(group, ["evaluate", "support@canary"])
    assert result.exit_code == 2 and "support has no alias 'canary'" in result.output


@pytest.mark.parametrize("command", ["evaluate", "infer", "export", "push"])
def test_a_changed_byte_in_a_run_s_adapter_is_refused_naming_the_file_and_both_digests(command, make_run, tmp_path):
    run = make_run("run")
    weights = run / "adapter_model.safetensors"
    recorded = json.loads((run / "polyadapt.json").read_text())["adapter"]["files"]["adapter_model.safetensors"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    from polyadapt.cli import cli as group

    args = {
        "evaluate": ["evaluate", str(run)],
        "infer": ["infer", str(run), "--x", "0.1,0.2,0.3,0.4"],
        "export": ["export", str(run), "--format", "merged", "--output", str(tmp_path / "out")],
        "push": ["registry", "push", str(run), "--name", "support", "--registry", str(tmp_path / "reg")],
    }[command]
    result = CliRunner().invoke(group, args)
    assert result.exit_code == 2, result.output
    assert f"{weights}: adapter file altered since the run finished" in result.output
    assert recorded in result.output and "sha256" in result.output
    assert not (tmp_path / "out").exists()
