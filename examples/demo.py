"""`make demo`: adapt every installed modality offline on sample_data/ and print one before/after table, and the
forgetting check: the same before/after on each sample set's general/ data (``eval.general_data: auto``).

Each modality's demo config is examples/<modality>.yaml; its run directory is replaced on every demo.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("text", "speech", "image")


def main(argv: list[str]) -> int:
    import polyadapt
    from polyadapt.plugins import get_plugin_manager

    os.chdir(ROOT)
    wanted = argv or list(ORDER)
    installed = get_plugin_manager().modalities
    rows, general, failures = [], [], []
    for name in wanted:
        config = ROOT / "examples" / f"{name}.yaml"
        if name not in installed or not config.exists():
            print(f"== {name}: skipped ({'not installed' if name not in installed else 'no demo config'})")
            continue
        print(f"== {name}: adapting ({config.relative_to(ROOT)})", flush=True)
        started = time.perf_counter()
        try:
            run_dir = polyadapt.adapt(config, overwrite=True)
        except polyadapt.PolyadaptError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failures.append(name)
            continue
        seconds = time.perf_counter() - started
        report = json.loads((run_dir / "report.json").read_text())
        for row in report["metrics"]:
            rows.append((name, row, seconds, run_dir))
        general += [(name, row) for row in report.get("general_metrics") or []]
    if rows:
        print()
        print(f"{'modality':<8}  {'metric':<24}  {'before':>10}  {'after':>10}  {'':<6}  run")
        for name, row, _, run_dir in rows:
            print(f"{_row(name, row)}  {run_dir}/report.html")
        if general:
            print()
            print("forgetting check, on each set's general/ data (outside the domain; 'worse' is forgetting):")
            print(f"{'modality':<8}  {'metric':<24}  {'before':>10}  {'after':>10}")
            for name, row in general:
                print(_row(name, row))
        print()
        for name in dict.fromkeys(r[0] for r in rows):
            seconds = next(r[2] for r in rows if r[0] == name)
            print(f"{name}: adapted in {seconds:.0f} s")
    return 1 if failures else 0


def _row(name: str, row: dict) -> str:
    """One line of a before/after table: modality, metric, before, after, better/worse."""
    before = "-" if row["before"] is None else f"{row['before']:.4f}"
    verdict = {True: "better", False: "worse", None: "same"}[row["improved"]] if "improved" in row else ""
    return f"{name:<8}  {row['metric']:<24}  {before:>10}  {row['after']:>10.4f}  {verdict:<6}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
