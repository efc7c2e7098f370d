"""The log-mel front end as a torch module, for exports that take raw audio.

`LogMelFrontEnd(params, num_samples)` computes what `compute_log_mel` computes, from a batch
of waveforms `(batch, num_samples)` to `(batch, 1, frames, n_mels)`, with operations every
exporter knows and no complex tensors (`torch.stft` has none of them):

- framing is a gather with constant indices, after the centring pad where the preset centres
  (constant or reflect, as librosa and PANNs pad); TensorFlow's framing has no pad;
- the windowed DFT is a matrix product with the window times the cosine and sine of each
  frequency bin; TensorFlow's window sits at the start of the FFT buffer, so its frames need
  only `frame_length` taps of the same DFT;
- the mel filterbank is the matrix `compute_log_mel` uses, then the log (dB with its floor and
  per-example `top_db`, log with an offset, or none).

Precision: `compute_log_mel` works in float64. A float32 DFT is exact to about 1e-7 of a
frame's energy, so a bin 90 dB below its frame's peak is off by tenths of a dB; presets without
a floor relative to the peak (`top_db`) show it on quiet or band-limited clips. The default
`dtype=torch.float64` computes the spectrum in float64 (ONNX runs it) and returns float32
features; TFLite has no float64 kernels, so its front end is `torch.float32` (`tolerance`
gives the measured deviation per preset).
"""

from __future__ import annotations

import math

import librosa
import numpy as np
import torch
from torch import nn

from audioclf.features import LogMelParams, mel_matrix, num_frames


class LogMelFrontEnd(nn.Module):
    """Waveforms `(batch, num_samples)` float32 -> log-mel `(batch, 1, frames, n_mels)` float32,
    as `compute_log_mel` computes them with `params`.

    Args:
        num_samples: the clip length the module is built for (the gather indices are
            constants, so exporters fold them).
        dtype: the precision of the spectrum and the log (float64, or float32 for runtimes
            without float64 kernels, such as TFLite).
    """

    def __init__(
        self, params: LogMelParams, num_samples: int, *, dtype: torch.dtype = torch.float64
    ) -> None:
        super().__init__()
        self.params = params
        self.num_samples = int(num_samples)
        self.num_frames = num_frames(self.num_samples, params)
        self.dtype = dtype
        bins = params.n_fft // 2 + 1
        if params.center:
            # librosa centres a Hann window of frame_length in the n_fft buffer.
            window = librosa.util.pad_center(
                librosa.filters.get_window("hann", params.frame_length, fftbins=True),
                size=params.n_fft,
            )
        else:
            # TensorFlow puts the window at the start of the buffer; the zeros after it add
            # nothing, so frame_length taps of the same DFT do.
            window = librosa.filters.get_window("hann", params.frame_length, fftbins=True)
        taps = len(window)
        angle = 2 * math.pi * np.outer(np.arange(taps), np.arange(bins)) / params.n_fft
        dft = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1) * window[:, np.newaxis]
        self.register_buffer("dft", torch.tensor(dft, dtype=dtype))  # (taps, 2 * bins)
        mel = mel_matrix(params).T  # (bins, n_mels)
        self.register_buffer("mel", torch.tensor(mel, dtype=dtype))
        starts = np.arange(self.num_frames) * params.hop_length
        index = starts[:, np.newaxis] + np.arange(taps)  # (frames, taps)
        self.register_buffer("index", torch.tensor(index.reshape(-1), dtype=torch.long))
        self.bins = bins
        self.taps = taps

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        params = self.params
        if waveform.dim() != 2 or waveform.shape[1] != self.num_samples:
            raise ValueError(
                f"the front end takes waveforms of shape (batch, {self.num_samples}), "
                f"not {tuple(waveform.shape)}"
            )
        signal = waveform
        if params.center:
            pad = params.n_fft // 2
            mode = "reflect" if params.pad_mode == "reflect" else "constant"
            signal = nn.functional.pad(signal.unsqueeze(1), (pad, pad), mode=mode).squeeze(1)
        frames = signal.index_select(1, self.index).to(self.dtype)
        # Batch and frames as one dimension: a 2-D matrix product every converter takes.
        frames = frames.reshape(-1, self.taps)
        spectrum = torch.matmul(frames, self.dft)
        real, imaginary = spectrum[:, : self.bins], spectrum[:, self.bins :]
        power = real * real + imaginary * imaginary
        if params.power == 1.0:
            power = torch.sqrt(power)
        elif params.power != 2.0:
            power = torch.pow(power, params.power / 2)
        mel = torch.matmul(power, self.mel).reshape(-1, self.num_frames, params.n_mels)
        if params.log == "db":
            log_mel = 10.0 * torch.log10(torch.clamp(mel, min=params.amin))
            if params.top_db is not None:
                peak = log_mel.amax(dim=(1, 2), keepdim=True)
                log_mel = torch.maximum(log_mel, peak - params.top_db)
        elif params.log == "log_offset":
            log_mel = torch.log(mel + params.log_offset)
        else:
            log_mel = mel
        return log_mel.to(torch.float32).unsqueeze(1)
