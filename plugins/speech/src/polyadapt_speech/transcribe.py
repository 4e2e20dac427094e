"""Batched transcription with an explicit decoder prefix, and long-form audio cut into 30 s windows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .features import N_SAMPLES, SAMPLE_RATE, log_mel

#: a long clip is cut at the quietest 100 ms inside the last this-many seconds of each 30 s window
SEARCH_SECONDS = 5.0


def split_long(audio: np.ndarray) -> list[np.ndarray]:
    """Cut ``audio`` into pieces of at most 30 s, each cut at the quietest 100 ms near the window end (so words are
    rarely split); a clip of 30 s or less is returned whole."""
    pieces: list[np.ndarray] = []
    start = 0
    frame = SAMPLE_RATE // 10
    while len(audio) - start > N_SAMPLES:
        window = audio[start : start + N_SAMPLES]
        tail_start = N_SAMPLES - int(SEARCH_SECONDS * SAMPLE_RATE)
        tail = window[tail_start:]
        frames = len(tail) // frame
        energy = (tail[: frames * frame].reshape(frames, frame) ** 2).mean(axis=1)
        cut = tail_start + int(np.argmin(energy)) * frame + frame // 2
        pieces.append(audio[start : start + cut])
        start += cut
    pieces.append(audio[start:])
    return pieces


def _generation_model(model: Any) -> Any:
    # a PeftModel injects its layers into the base model, so the base model's generate() uses the adapter
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def generate_ids(
    bundle: Any,
    audios: Sequence[np.ndarray],
    *,
    device: Any,
    prefix: list[int],
    prompt: list[int],
    num_beams: int,
    max_new_tokens: int,
) -> Any:
    """Generated token ids (after ``prompt + prefix``, end token included) of clips of at most 30 s, in one batch."""
    import copy

    import torch
    from transformers import GenerationMixin
    from transformers.modeling_outputs import BaseModelOutput

    from .model import clip_key, encoder_is_frozen

    model = _generation_model(bundle.model)
    width = max(len(a) for a in audios)
    batch = torch.zeros(len(audios), width)
    for row, clip in enumerate(audios):
        batch[row, : len(clip)] = torch.from_numpy(np.asarray(clip, dtype=np.float32))
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    batch = batch.to(device)
    was_training = model.training
    model.eval()
    cache = bundle.components.get("encoder_cache")
    if cache is not None and cache.budget and encoder_is_frozen(model):
        hidden = cache.encode(model, batch, [clip_key(a) for a in audios], model.config.num_mel_bins)
        inputs: dict[str, Any] = {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden)}
    else:
        inputs = {"input_features": log_mel(batch, model.config.num_mel_bins).to(dtype)}
    config = copy.deepcopy(model.generation_config)
    config.num_beams = num_beams
    config.max_new_tokens = None
    config.return_timestamps = False
    config.forced_decoder_ids = None
    config.begin_suppress_tokens = list(config.begin_suppress_tokens or [])
    start = torch.tensor([[*prompt, *prefix]] * len(audios), dtype=torch.long, device=batch.device)
    config.max_length = start.shape[1] + max_new_tokens
    try:
        with torch.no_grad():
            # the generic encoder-decoder generate(), not Whisper's long-form wrapper: the decoder starts from exactly
            # the prompt + prefix that training used, and begin-suppression applies right after it
            output = GenerationMixin.generate(
                model,
                **inputs,
                decoder_input_ids=start,
                decoder_attention_mask=torch.ones_like(start),
                generation_config=config,
            )
    finally:
        model.train(was_training)
    sequences = output.sequences if hasattr(output, "sequences") else output
    return sequences[:, start.shape[1] :].cpu()


def decode_batch(bundle: Any, audios: Sequence[np.ndarray], **options: Any) -> list[str]:
    """Transcripts of clips of at most 30 s, decoded in one batch (``options`` as for :func:`generate_ids`)."""
    texts = bundle.processor.tokenizer.batch_decode(generate_ids(bundle, audios, **options), skip_special_tokens=True)
    return [t.strip() for t in texts]


def transcribe(
    bundle: Any,
    audios: Sequence[np.ndarray],
    *,
    device: Any,
    prefix: list[int],
    prompt: list[int],
    num_beams: int,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Transcripts of 16 kHz mono clips of any length: long clips are split, pieces decoded in batches, then joined."""
    pieces: list[np.ndarray] = []
    owner: list[int] = []
    for index, audio in enumerate(audios):
        for piece in split_long(np.asarray(audio, dtype=np.float32)):
            pieces.append(piece)
            owner.append(index)
    # similar lengths together: less padding work in the decoder
    order = sorted(range(len(pieces)), key=lambda i: len(pieces[i]))
    texts = [""] * len(pieces)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        decoded = decode_batch(
            bundle,
            [pieces[i] for i in chunk],
            device=device,
            prefix=prefix,
            prompt=prompt,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
        )
        for i, text in zip(chunk, decoded, strict=True):
            texts[i] = text
    joined: list[list[str]] = [[] for _ in audios]
    for i, text in enumerate(texts):
        if text:
            joined[owner[i]].append(text)
    return [" ".join(parts) for parts in joined]
