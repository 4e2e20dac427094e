"""Registry cost: push and pull against a plain copy of the same files, and resolving ``NAME@alias`` with 100 versus
10,000 stored versions.

The runs are complete run directories whose adapter is ``--megabytes`` of LoRA-shaped float32 tensors (20 MB is about
a rank-16 LoRA on every linear layer of SmolLM2-135M) with a valid manifest and report: what the registry stores and
checks depends only on the files' bytes and number, not on how they were trained. Each run gets its own random
weights, so every push stores new content.

* push: ``Registry.push`` (hash and check each file against the manifest, copy it into the content-addressed store,
  one metadata transaction) vs ``shutil.copy2`` of the same files into a fresh directory;
* pull: ``Registry.pull`` (copy out, re-hashing every byte, model card) vs ``shutil.copytree`` of the run;
* resolve: ``Registry.get("NAME@production")`` when NAME holds 100 and then 10,000 versions. The first 100 are real
  pushes; the other versions are rows written the way a push writes them, in one transaction, all pointing at the
  files of version 1 (resolving reads metadata only).

Run: ``python benchmarks/registry.py [--runs 5] [--megabytes 20] [--registry URL --registry-files URL]``; the
default registry is a temporary directory (SQLite). Prints one table of medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def synthetic_run(directory: Path, megabytes: float, seed: int) -> Path:
    """A complete run directory with an adapter of about ``megabytes`` MB."""
    import torch
    from safetensors.torch import save_file

    from polyadapt.data import sha256_file
    from polyadapt.manifest import AdapterRecord, BaseRecord, DataRecord, Manifest, now_iso, write_json_atomic

    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    width, rank = 576, 16
    per_layer = 4 * 2 * width * rank  # four LoRA pairs (A and B) per layer
    layers = max(1, round(megabytes * 2**20 / 4 / per_layer))
    tensors = {}
    for layer in range(layers):
        for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, width, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(width, rank, generator=generator)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 32}))
    (directory / "report.json").write_text(json.dumps({"metrics": [], "general_metrics": []}))
    files = {name: sha256_file(directory / name) for name in ("adapter_config.json", "adapter_model.safetensors")}
    manifest = Manifest(
        status="complete", polyadapt_version="bench", modality="text", config={"seed": seed}, seed=seed,
        base=BaseRecord(reference="bench-base", weights_sha256={"model.safetensors": "0" * 64}),
        data=DataRecord(path="bench-data", fingerprint={"sha256": "1" * 64}, counts={"train": 1, "validation": 1}),
        started=now_iso(), finished=now_iso(),
        adapter=AdapterRecord(method="lora", parameters={"trainable": sum(t.numel() for t in tensors.values())}, files=files),
    )  # fmt: skip
    write_json_atomic(directory / "polyadapt.json", manifest.to_json())
    return directory


def timed(work, repeat: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        work()
    return (time.perf_counter() - started) / repeat


def add_rows(reg, name: str, count: int) -> None:
    """``count`` more versions of ``name`` written as a push writes them, pointing at version 1's files."""
    import sqlalchemy as sa

    from polyadapt.registry.store import files, names, versions

    with reg.meta.transaction() as conn:
        row = conn.execute(sa.select(versions).where(versions.c.name == name, versions.c.version == 1)).mappings().one()
        stored = conn.execute(sa.select(files).where(files.c.name == name, files.c.version == 1)).mappings().all()
        start = conn.execute(sa.select(names.c.next_version).where(names.c.name == name)).scalar()
        rows, file_rows = [], []
        for number in range(start, start + count):
            rows.append({**row, "version": number, "content_sha256": f"{number:064x}"})
            file_rows.extend({**f, "version": number} for f in stored)
        conn.execute(versions.insert(), rows)
        conn.execute(files.insert(), file_rows)
        conn.execute(names.update().where(names.c.name == name).values(next_version=start + count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--megabytes", type=float, default=20.0)
    parser.add_argument("--registry", default=None)
    parser.add_argument("--registry-files", default=None)
    parser.add_argument("--lookups", type=int, default=300)
    args = parser.parse_args()

    from polyadapt import registry

    work = Path(tempfile.mkdtemp(prefix="polyadapt-registry-bench-"))
    try:
        reg = registry.open(args.registry or work / "registry", files=args.registry_files)
        runs = [synthetic_run(work / f"run-{i}", args.megabytes, seed=i) for i in range(args.runs)]
        size = sum(p.stat().st_size for p in runs[0].iterdir()) / 2**20
        name = f"bench-{int(time.time())}"
        push, copy, pull, copytree = [], [], [], []
        for i, run in enumerate(runs):
            target = work / f"copy-{i}"
            target.mkdir()
            copy.append(timed(lambda run=run, target=target: [shutil.copy2(p, target / p.name) for p in run.iterdir()]))
            push.append(timed(lambda run=run: reg.push(run, name)))
        for i, run in enumerate(runs):
            copytree.append(timed(lambda run=run, i=i: shutil.copytree(run, work / f"tree-{i}")))
            pull.append(timed(lambda i=i: reg.pull(f"{name}@v{i + 1}", work / f"pulled-{i}")))

        # resolving an alias: 100 versions, then 10,000
        for i in range(len(runs), 100):
            tiny = synthetic_run(work / f"tiny-{i}", 0.01, seed=1000 + i)
            reg.push(tiny, name)
        reg.alias(f"{name}@v50", "production")
        reg.get(f"{name}@production")
        at_100 = timed(lambda: reg.get(f"{name}@production"), args.lookups)
        add_rows(reg, name, 10_000 - 100)
        assert len(reg.versions(name)) == 10_000
        reg.get(f"{name}@production")
        at_10k = timed(lambda: reg.get(f"{name}@production"), args.lookups)
        reg.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    median = statistics.median
    print(f"registry: {reg.location} ({args.runs} runs of {size:.1f} MiB each)")
    print(f"{'measure':<34} {'registry':>12} {'reference':>12} {'ratio':>8}")
    print(f"{'push vs copy (s)':<34} {median(push):>12.4f} {median(copy):>12.4f} {median(push) / median(copy):>8.2f}")
    print(
        f"{'pull vs copytree (s)':<34} {median(pull):>12.4f} {median(copytree):>12.4f} {median(pull) / median(copytree):>8.2f}"
    )
    print(
        f"{'resolve @alias, 10,000 vs 100 (ms)':<34} {at_10k * 1e3:>12.3f} {at_100 * 1e3:>12.3f} {at_10k / at_100:>8.2f}"
    )


if __name__ == "__main__":
    main()
