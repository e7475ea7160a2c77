"""Speech feature encoders: waveform of one turn [N, samples] -> features [N, F, Da].

Default (docs/DESIGN.md 2.4): log-mel spectrogram computed with a fixed Conv1d whose weights are the
Hann-windowed DFT (no STFT op, which TensorRT lacks), then a learned Conv1d stack that downsamples
100 mel frames to F = 25 frames per turn. Optional: a wav2vec2 model from a local directory.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_FFT = 400   # 25 ms at 16 kHz
HOP = 160     # 10 ms


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """Triangular HTK-mel filters, float32 [n_mels, n_fft // 2 + 1], unit peak."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lo) / (mid - lo)
    falling = (hi - bins[None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


class LogMel(nn.Module):
    """[N, S] waveform -> [N, n_mels, S / HOP] log-mel, zero-padded so one 1 s turn gives 100 frames."""

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000):
        super().__init__()
        n = torch.arange(N_FFT, dtype=torch.float64)
        k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64)
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / N_FFT)      # periodic Hann
        angle = 2 * math.pi * k[:, None] * n[None] / N_FFT
        dft = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # [2K, N_FFT]
        self.register_buffer("dft", dft.float()[:, None, :], persistent=False)
        self.register_buffer("mel", torch.from_numpy(mel_filterbank(n_mels, N_FFT, sample_rate)),
                             persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        pad = (N_FFT - HOP) // 2
        spec = F.conv1d(F.pad(wav[:, None, :], (pad, pad)), self.dft, stride=HOP)
        re, im = spec.chunk(2, dim=1)
        power = re * re + im * im                                      # [N, K, frames]
        return torch.log(torch.matmul(self.mel, power) + 1e-6)


class LogMelEncoder(nn.Module):
    """Log-mel + Conv1d stack: 100 frames/s -> 25 frames/s, width Da."""

    def __init__(self, out_dim: int, channels: int = 128, n_mels: int = 80, sample_rate: int = 16000):
        super().__init__()
        self.logmel = LogMel(n_mels, sample_rate)
        self.convs = nn.Sequential(
            nn.Conv1d(n_mels, channels, 3, padding=1), nn.GELU(),
            nn.Conv1d(channels, channels, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(channels, out_dim, 4, stride=2, padding=1),
        )

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        mel = (self.logmel(wav) + 5.0) / 5.0       # roughly centred for unit-variance speech
        return self.convs(mel).transpose(1, 2)     # [N, F, Da]


class Wav2Vec2Encoder(nn.Module):
    """A wav2vec2 model from a local Hugging Face directory, used per turn as the authors do:
    CNN features, linearly interpolated (align_corners) to F frames, feature projection, encoder."""

    def __init__(self, path: str | None, frames_per_turn: int):
        super().__init__()
        self.check_path(path)
        try:
            from transformers import Wav2Vec2Model
        except ImportError as e:
            raise ImportError("audio_encoder='wav2vec2' needs the transformers package: "
                              "pip install -e '.[wav2vec2]' in the timar-sdk checkout") from e
        self.model = Wav2Vec2Model.from_pretrained(path)
        self.frames = frames_per_turn
        self.out_dim = self.model.config.hidden_size

    @staticmethod
    def check_path(path: str | None) -> None:
        if not path or not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(
                f"wav2vec2: expected a local Hugging Face wav2vec2 directory with config.json "
                f"(the config's wav2vec2_path, or timar-export --wav2vec2 DIR; the authors' models use facebook/wav2vec2-large-960h-lv60-self, "
                f"which your Hugging Face cache keeps at "
                f"~/.cache/huggingface/hub/models--facebook--wav2vec2-large-960h-lv60-self/snapshots/<hash>), "
                f"got {path!r}")

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        feats = self.model.feature_extractor(wav)                       # [N, C, T']
        feats = F.interpolate(feats, size=self.frames, mode="linear", align_corners=True)
        hidden, _ = self.model.feature_projection(feats.transpose(1, 2))
        return self.model.encoder(hidden).last_hidden_state              # [N, F, Dw]
