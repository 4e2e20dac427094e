"""Run directories: atomic, never overwritten by accident, and a manifest whose hashes match the files."""

from __future__ import annotations

import hashlib
import json

import pytest

import polyadapt
from polyadapt.errors import RunDirectoryError
from polyadapt.manifest import read_manifest


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def finished(toy_config):
    config = toy_config(train={"max_steps": 6})
    return config, polyadapt.adapt(config)


def test_run_directory_layout(finished):
    _, run_dir = finished
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "metrics.jsonl",
        "report.json",
        "report.html",
        "polyadapt.json",
    ):
        assert (run_dir / name).is_file(), name
    html = (run_dir / "report.html").read_text()
    assert "<svg" in html and "Held-out metrics, before vs after" in html and "Toy predictions" in html
    report = json.loads((run_dir / "report.json").read_text())
    assert {r["metric"] for r in report["metrics"]} >= {"eval_loss", "mae"}


def test_manifest_records_lineage_and_its_hashes_match_the_files(finished, tmp_path):
    _, run_dir = finished
    m = read_manifest(run_dir).to_json()
    assert m["status"] == "complete" and m["modality"] == "toy" and m["polyadapt_version"] == polyadapt.__version__
    assert m["plugins"]["toy"]["version"] == "0.1.0"
    assert m["base"]["weights_sha256"]["model.safetensors"] == sha256(tmp_path / "base" / "model.safetensors")
    files = m["data"]["fingerprint"]["files"]
    assert files == {
        "train.jsonl": sha256(tmp_path / "data" / "train.jsonl"),
        "validation.jsonl": sha256(tmp_path / "data" / "validation.jsonl"),
    }
    combined = hashlib.sha256("".join(f"{n}\0{files[n]}\n" for n in sorted(files)).encode()).hexdigest()
    assert m["data"]["fingerprint"]["sha256"] == combined
    assert m["data"]["counts"] == {"train": 64, "validation": 16}
    assert m["config"]["train"]["max_steps"] == 6 and m["config"]["toy"]["hidden"] == 16
    assert m["seed"] == 3 and "torch" in m["libraries"] and m["hardware"]["cpu_count"] >= 1
    assert m["started"] <= m["finished"]
    assert set(m["metrics"]) >= {"before", "after"} and m["metrics"]["after"]["eval_loss"] > 0
    assert m["adapter"]["files"]["adapter_model.safetensors"] == sha256(run_dir / "adapter_model.safetensors")
    assert m["adapter"]["parameters"]["trainable"] > 0


def test_a_complete_run_is_not_overwritten_without_overwrite(finished):
    config, run_dir = finished
    before = sha256(run_dir / "adapter_model.safetensors")
    with pytest.raises(RunDirectoryError, match="holds a complete run; pass --overwrite"):
        polyadapt.adapt(config)
    assert sha256(run_dir / "adapter_model.safetensors") == before
    polyadapt.adapt(config, overwrite=True)
    assert read_manifest(run_dir).status == "complete"


def test_a_directory_that_is_not_a_run_is_never_touched(toy_config, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    config = toy_config(output=str(out))
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(RunDirectoryError, match="is not a polyadapt run"):
            polyadapt.adapt(config, **flags)
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_a_failed_run_is_marked_failed_and_not_complete(toy_config, tmp_path):
    config = toy_config(toy={"explode_after_calls": 2})
    with pytest.raises(polyadapt.TrainingDivergedError):
        polyadapt.adapt(config)
    manifest = read_manifest(tmp_path / "run").to_json()
    assert manifest["status"] == "failed"
    with pytest.raises(RunDirectoryError, match="is not a complete run"):
        polyadapt.evaluate(tmp_path / "run")


def test_bad_samples_fail_listing_every_one_or_are_skipped_and_recorded(toy_config, tmp_path):
    data = tmp_path / "data" / "train.jsonl"
    lines = data.read_text().splitlines()
    lines[2] = "{not json"
    lines[5] = '{"x": [1, 2, 3, 4]}'
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(polyadapt.DataError) as err:
        polyadapt.adapt(toy_config())
    message = str(err.value)
    assert "2 bad sample(s)" in message and f"{data}:3: invalid JSON" in message and f"{data}:6: needs keys" in message
    assert not (tmp_path / "run").exists()  # nothing was created for a run that could not start
    run_dir = polyadapt.adapt(toy_config(data={"on_bad_sample": "skip"}, train={"max_steps": 2}))
    skipped = read_manifest(run_dir).to_json()["data"]["bad_samples_skipped"]
    assert [s["line"] for s in skipped] == [3, 6] and read_manifest(run_dir).to_json()["data"]["counts"]["train"] == 62


def test_holdout_is_cut_deterministically_and_recorded(toy_config, tmp_path):
    (tmp_path / "data" / "validation.jsonl").unlink()
    run_dir = polyadapt.adapt(toy_config(train={"max_steps": 2}, data={"holdout": 0.25}))
    heldout = read_manifest(run_dir).data.heldout
    assert heldout["source"] == "holdout" and heldout["fraction"] == 0.25 and len(heldout["indices"]) == 16
    again = polyadapt.adapt(
        toy_config("again.yaml", output=str(tmp_path / "again"), train={"max_steps": 2}, data={"holdout": 0.25})
    )
    assert read_manifest(again).data.heldout["indices"] == heldout["indices"]


@pytest.mark.parametrize(
    ("files", "source"),
    [(("train", "validation", "test"), "validation"), (("train", "test"), "test"), (("train",), "holdout")],
)
def test_one_heldout_rule_validation_then_test_then_a_cut(toy, tmp_path, files, source):
    from polyadapt.config import validate_config
    from polyadapt.lifecycle import read_data

    data = toy.write_data(tmp_path / "data", n=40)
    (data / "validation.jsonl").rename(data / "test.jsonl")
    if "validation" in files:
        (data / "validation.jsonl").write_text((data / "test.jsonl").read_text())
    if "test" not in files:
        (data / "test.jsonl").unlink()
    config = validate_config(
        {
            "modality": "toy",
            "base": str(toy.write_base(tmp_path / "base")),
            "data": str(data),
            "output": str(tmp_path / "o"),
        }
    )
    from polyadapt.plugins import get_plugin_manager

    modality = get_plugin_manager().get_modality("toy")
    splits, _ = read_data(modality, config)
    assert splits.heldout["source"] == source
    assert len(splits.validation) == (4 if source == "holdout" else 10) and len(splits.train) == (
        36 if source == "holdout" else 40
    )


def test_a_directory_without_a_dataset_is_one_clear_error(toy, tmp_path):
    from polyadapt.config import validate_config
    from polyadapt.lifecycle import doctor

    (tmp_path / "empty").mkdir()
    config = validate_config(
        {
            "modality": "toy",
            "base": str(toy.write_base(tmp_path / "base")),
            "data": str(tmp_path / "empty"),
            "output": "o",
        }
    )
    with pytest.raises(polyadapt.DataError, match=r"data.path: .*empty holds no dataset \(expected train.jsonl"):
        doctor(config)


def test_an_invalid_manifest_is_refused_naming_the_file_and_key(finished):
    _, run_dir = finished
    path = run_dir / "polyadapt.json"
    content = json.loads(path.read_text())
    content["status"] = "done"
    path.write_text(json.dumps(content))
    with pytest.raises(RunDirectoryError, match=r"polyadapt.json: invalid manifest: status: "):
        read_manifest(run_dir)


def test_the_run_directory_has_a_model_card_written_from_the_manifest(finished):
    _, run_dir = finished
    card = (run_dir / "README.md").read_text()
    manifest = read_manifest(run_dir)
    assert manifest.data.fingerprint["sha256"] in card
    assert next(iter(manifest.base.weights_sha256.values())) in card
    assert "| eval_loss |" in card and "PeftModel.from_pretrained" in card and "lora" in card
