"""Batched transcription with an explicit decoder prefix, and long-form audio cut into 30 s windows.

The encoder runs once per batch (or its outputs come from the frozen-encoder cache), then the generic encoder-decoder
``generate()`` decodes from them. Running the encoder apart also lets each phase see its own rows: in a batch whose
clips use different adapters, the decoder's rows under beam search are each clip's rows repeated once per beam.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import SAMPLE_RATE
from .features import N_SAMPLES, log_mel

if TYPE_CHECKING:
    import torch

    from .model import EncoderCache

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


def generation_model(model: Any) -> Any:
    """The Whisper model whose ``generate()`` runs: a PeftModel injects its layers into the base model, so the base
    model's own ``generate()`` uses the adapter."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encoder_states(
    model: Any, audios: Sequence[np.ndarray], device: Any, cache: EncoderCache | None = None
) -> torch.Tensor:
    """Encoder hidden states of clips of at most 30 s, padded into one batch; from ``cache`` while the encoder is
    frozen."""
    import torch

    from .model import clip_key, encoder_is_frozen

    width = max(len(a) for a in audios)
    batch = torch.zeros(len(audios), width)
    for row, clip in enumerate(audios):
        batch[row, : len(clip)] = torch.from_numpy(np.asarray(clip, dtype=np.float32))
    batch = batch.to(device)
    n_mels = model.config.num_mel_bins
    if cache is not None and cache.budget and encoder_is_frozen(model):
        return cache.encode(model, batch, [clip_key(a) for a in audios], n_mels)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    with torch.no_grad():
        return model.get_encoder()(log_mel(batch, n_mels).to(dtype)).last_hidden_state


def generate_ids(
    model: Any,
    audios: Sequence[np.ndarray],
    *,
    device: Any,
    prefix: list[int],
    prompt: list[int],
    num_beams: int,
    max_new_tokens: int,
    cache: EncoderCache | None = None,
    decoder_rows: Callable[[int], AbstractContextManager[Any]] | None = None,
) -> torch.Tensor:
    """Generated token ids (after ``prompt + prefix``, end token included) of clips of at most 30 s, in one batch.

    ``decoder_rows(num_beams)``, when given, is entered around the decoding loop (not the encoder pass): a run's
    mixed-adapter rows repeated once per beam.
    """
    import copy

    import torch
    from transformers import GenerationMixin
    from transformers.modeling_outputs import BaseModelOutput

    model = generation_model(model)
    hidden = encoder_states(model, audios, device, cache)
    config = copy.deepcopy(model.generation_config)
    config.num_beams = num_beams
    config.max_new_tokens = None
    config.return_timestamps = False
    config.forced_decoder_ids = None
    config.begin_suppress_tokens = list(config.begin_suppress_tokens or [])
    start = torch.tensor([[*prompt, *prefix]] * len(audios), dtype=torch.long, device=hidden.device)
    config.max_length = start.shape[1] + max_new_tokens
    with torch.no_grad(), decoder_rows(num_beams) if decoder_rows is not None else nullcontext():
        # the generic encoder-decoder generate(), not Whisper's long-form wrapper: the decoder starts from exactly
        # the prompt + prefix that training used, and begin-suppression applies right after it
        output = GenerationMixin.generate(
            model,
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            decoder_input_ids=start,
            decoder_attention_mask=torch.ones_like(start),
            generation_config=config,
        )
    sequences = output.sequences if hasattr(output, "sequences") else output
    return sequences[:, start.shape[1] :].cpu()


def transcribe(
    decode: Callable[[list[np.ndarray], list[int]], list[str]], audios: Sequence[np.ndarray], batch_size: int
) -> list[str]:
    """Transcripts of 16 kHz mono clips of any length: long clips are split, the pieces decoded in batches of similar
    length by ``decode(pieces, owners)`` (``owners``: the index in ``audios`` each piece comes from), then joined."""
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
        for i, text in zip(chunk, decode([pieces[i] for i in chunk], [owner[i] for i in chunk]), strict=True):
            texts[i] = text
    joined: list[list[str]] = [[] for _ in audios]
    for i, text in enumerate(texts):
        if text:
            joined[owner[i]].append(text)
    return [" ".join(parts) for parts in joined]
