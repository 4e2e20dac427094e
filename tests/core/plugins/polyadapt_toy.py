"""A toy modality: a tiny regression network adapted with LoRA on synthetic data.

It is installed for the core tests as a third-party plugin would be (a dist-info with an entry point), proves every
part of the shared lifecycle without any modality library, and is the example a plugin author copies:

- ``ToyModality`` is the stateless factory: what it supports (``peft_methods``, ``capabilities``, ``metrics``), how to
  read its data (``read_data``: the splits found, bad rows as Problems), cross-section checks (``check_config``);
- ``ToyRun`` is the per-run object: the model and everything else a run needs are its attributes. It builds on
  ``polyadapt.peft_run.PeftRun``, which supplies PEFT adapters (attach, save, load, several by name, mixed batches);
- it passes ``polyadapt.testing``'s conformance checks (tests/core/test_conformance.py).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import click

from polyadapt import hookimpl
from polyadapt.data import Problem, read_jsonl
from polyadapt.evaluation import Metric
from polyadapt.export import ExportFormat
from polyadapt.modality import DataFound, EvalResult, Modality, ModalitySettings, PreparedSplit
from polyadapt.peft_run import PeftRun


class ToySettings(ModalitySettings):
    hidden: int = 16
    explode_after_calls: int | None = None


def build_net(features: int, hidden: int):
    import torch

    class ToyNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Linear(features, hidden)
            self.head = torch.nn.Linear(hidden, 1)

        def forward(self, x):
            return self.head(torch.tanh(self.encoder(x))).squeeze(-1)

    return ToyNet()


def write_base(directory: Path, features: int = 4, hidden: int = 16, seed: int = 0) -> Path:
    """Write a toy base model (config.json + model.safetensors)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    net = build_net(features, hidden)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"features": features, "hidden": hidden}))
    return directory


def write_data(directory: Path, n: int = 64, features: int = 4, seed: int = 1, validation: bool = True) -> Path:
    """Synthetic regression data: y = sum(w * x) with weights the base never saw."""
    import random

    rng = random.Random(seed)
    weights = [0.5 * (i + 1) * (-1) ** i for i in range(features)]
    directory.mkdir(parents=True, exist_ok=True)

    def rows(count: int) -> str:
        out = []
        for _ in range(count):
            x = [rng.uniform(-1, 1) for _ in range(features)]
            out.append(json.dumps({"x": x, "y": sum(w * v for w, v in zip(weights, x, strict=True))}))
        return "\n".join(out) + "\n"

    (directory / "train.jsonl").write_text(rows(n))
    if validation:
        (directory / "validation.jsonl").write_text(rows(max(8, n // 4)))
    return directory


class ToyModality(Modality):
    """The modality: a stateless factory. It declares what it supports and opens a ToyRun per run."""

    name = "toy"
    description = "tiny regression network (tests)"
    settings_model = ToySettings
    primary_metric = "eval_loss"
    metrics = {"mae": False}
    peft_methods = ("lora", "dora")
    capabilities = frozenset({"inference", "report", "multi_adapter", "batched_adapters"})
    data_layout = "train.jsonl and validation.jsonl (rows {'x': [...], 'y': ...})"

    def read_data(self, ctx):
        problems, splits, files = [], {}, []
        for split in ("train", "validation", "test"):
            file = Path(ctx.path) / f"{split}.jsonl"
            if not file.exists():
                continue
            files.append(file)
            records, bad = read_jsonl(file, str(file), split=split)
            problems.extend(bad)
            rows = []
            for number, row in records:
                if "x" not in row or "y" not in row:
                    problems.append(Problem(str(file), "needs keys 'x' and 'y'", number, split))
                    continue
                rows.append(row)
            splits[split] = rows
        return DataFound(splits=splits, files=files, problems=problems)

    def check_config(self, config):
        if config.peft.method == "dora" and config.settings.hidden < 4:
            return ["toy.hidden: dora needs at least 4 hidden units"]
        return []

    def infer_params(self):
        return [click.Option(["--x"], required=True, help="Comma-separated features.")]


class ToyRun(PeftRun):
    """One run: the network and the settings are attributes of this object."""

    def __init__(self, modality, ctx):
        super().__init__(modality, ctx)
        self.training_calls = 0

    def load_base(self):
        import torch
        from safetensors.torch import load_file

        path = self.ctx.base.path
        config = json.loads((path / "config.json").read_text())
        net = build_net(config["features"], config["hidden"])
        net.load_state_dict(load_file(str(path / "model.safetensors")))
        self.model = net
        self.info = {"architecture": "ToyNet", "dtype": str(torch.float32)}

    def target_modules(self):
        from polyadapt.adapters import linear_module_names

        return linear_module_names(self.model)

    def prepare(self, samples, training):
        return PreparedSplit(items=list(samples), lengths=[len(s["x"]) for s in samples], stats={"count": len(samples)})

    def collate(self, items, training):
        import torch

        return {"x": torch.tensor([i["x"] for i in items]), "y": torch.tensor([i["y"] for i in items])}

    def loss(self, model, batch):
        prediction = model(batch["x"])
        loss = ((prediction - batch["y"]) ** 2).mean()
        if model.training:
            self.training_calls += 1
            limit = self.settings.explode_after_calls
            if limit is not None and self.training_calls > limit:
                loss = loss * float("nan")
        return loss

    def evaluate(self, samples, eval_loss):
        batch = self.collate(samples, False)
        prediction = self.model(batch["x"].to(self.ctx.device)).cpu()
        mae = float((prediction - batch["y"]).abs().mean())
        examples = [
            {"prediction": f"{p:.3f}", "reference": f"{r:.3f}"}
            for p, r in zip(prediction.tolist(), batch["y"].tolist(), strict=True)
        ]
        return EvalResult(metrics={"mae": mae}, examples=examples)

    def infer(self, options):
        import torch

        x = torch.tensor([[float(v) for v in options["x"].split(",")]])
        return [f"{float(self.model(x)):.6f}"]

    def report_sections(self, before, after, run_dir):
        return [("Toy predictions", f"<p>{len(after.examples)} predictions</p>")]


ToyModality.run_class = ToyRun


def export_merged(run, output_dir):
    from safetensors.torch import save_file

    merged = run.run.model.merge_and_unload()
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(output_dir / "model.safetensors"))
    return {"tensors": len(merged.state_dict())}


class KillAtStep:
    """Kills the process right after the checkpoint of a given step is saved (a crash mid-run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, state, checkpoint_dir):
        if state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


@hookimpl
def register_modalities(register):
    register(ToyModality)


@hookimpl
def register_export_formats(register):
    register(
        ExportFormat(name="merged", modality="toy", help="toy network with the adapter merged", export=export_merged)
    )


@hookimpl
def register_metrics(register):
    register(
        Metric(
            name="max_abs_error",
            modality="toy",
            higher_is_better=False,
            compute=lambda ex: max(abs(float(e["prediction"]) - float(e["reference"])) for e in ex),
        )
    )


@hookimpl
def training_callbacks(config):
    step = os.environ.get("POLYADAPT_TOY_KILL_AT_STEP")
    return [KillAtStep(int(step))] if step else []


@hookimpl
def register_commands(cli):
    @cli.command(name="toy-hello")
    def toy_hello():
        """Say hello from the toy plugin."""
        click.echo("hello from toy")
