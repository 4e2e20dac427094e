"""Whisper log-mel features computed with torch on any device, and the training-time augmentations.

``log_mel`` reproduces ``WhisperFeatureExtractor`` (pad/trim to 30 s, 400-point periodic Hann STFT with hop 160 and
reflect padding, power spectrum without the last frame, Slaney mel filters, log10 clamped at 1e-10, dynamic range
limited to 8 decades below the per-clip maximum, then ``(x + 4) / 4``), but on a batch tensor on the training device,
so the CPU does not become the bottleneck of a GPU run.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .data import SAMPLE_RATE

N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS
N_FRAMES = N_SAMPLES // HOP_LENGTH


@lru_cache(maxsize=8)
def _mel_filters(n_mels: int, device: str) -> torch.Tensor:
    import torchaudio

    filters = torchaudio.functional.melscale_fbanks(
        n_freqs=N_FFT // 2 + 1,
        f_min=0.0,
        f_max=SAMPLE_RATE / 2,
        n_mels=n_mels,
        sample_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return filters.to(device)  # (freqs, mels)


@lru_cache(maxsize=8)
def _window(device: str) -> torch.Tensor:
    return torch.hann_window(N_FFT, device=device)


def pad_or_trim(audio: torch.Tensor, length: int = N_SAMPLES) -> torch.Tensor:
    """Zero-pad or cut the last dimension to ``length`` samples (Whisper's fixed 30 s window)."""
    size = audio.shape[-1]
    if size > length:
        return audio[..., :length]
    if size < length:
        return torch.nn.functional.pad(audio, (0, length - size))
    return audio


def log_mel(audio: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Log-mel features of a ``(batch, samples)`` 16 kHz waveform tensor: ``(batch, n_mels, 3000)`` on its device."""
    if audio.dim() == 1:
        audio = audio.unsqueeze(0)
    audio = pad_or_trim(audio.float())
    device = str(audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=_window(device), return_complex=True)
    power = stft[..., :-1].abs().pow(2)
    mel = torch.matmul(_mel_filters(n_mels, device).T, power)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def spec_augment(features: torch.Tensor, freq_mask: int, time_mask: int, masks: int) -> torch.Tensor:
    """SpecAugment with torchaudio's frequency and time masking, every clip masked independently.

    Masked bins take the batch's mean level rather than zero: after Whisper's scaling, zero is a loud level.
    """
    import torchaudio

    freq = torchaudio.transforms.FrequencyMasking(freq_mask, iid_masks=True)
    time = torchaudio.transforms.TimeMasking(time_mask, iid_masks=True)
    fill = float(features.mean())
    out = features.unsqueeze(1)
    for _ in range(masks):
        out = time(freq(out, mask_value=fill), mask_value=fill)
    return out.squeeze(1)


def speed_perturb(audio: torch.Tensor, factor: float) -> torch.Tensor:
    """Play ``audio`` ``factor`` times faster (pitch moves with it, as in Kaldi-style speed perturbation)."""
    import torchaudio

    if factor == 1.0:
        return audio
    # resampling from rate*factor to rate shortens the clip by `factor`
    return torchaudio.functional.resample(audio, orig_freq=int(round(SAMPLE_RATE * factor)), new_freq=SAMPLE_RATE)
