"""Log-mel spectrograms: one torch implementation for CPU and CUDA.

The same function builds the Parquet feature shards and featurizes a new file at
inference time, so the two can never drift apart. It reproduces
``librosa.feature.melspectrogram(center=True, pad_mode="constant", window="hann",
power=2.0)`` followed by either ``log(1 + C*S)`` (Dieleman & Schrauwen 2014) or
``librosa.power_to_db(S, ref=1.0, amin=1e-10, top_db=80.0)``; tests hold it to
librosa. librosa itself is not imported here.

Output is TIME-MAJOR, ``(..., n_frames, n_mels)``, the layout stored in the shards.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.errors import ParameterError
from core.settings import FeatureSettings, MelSettings
from tasks.pyramids import gaussian_pyramid, laplacian_from_gaussian

#: ``power_to_db`` constants, as librosa's defaults with ``ref=1.0``.
DB_AMIN = 1e-10
DB_TOP = 80.0

# Slaney's auditory-toolbox mel scale: linear below 1 kHz, logarithmic above.
_SLANEY_F_SP = 200.0 / 3.0
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP
_SLANEY_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel(frequencies: np.ndarray | float, *, htk: bool = False) -> np.ndarray:
    """Hz to mels (float64), HTK formula or Slaney's (librosa's default)."""
    f = np.asanyarray(frequencies, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    mels = f / _SLANEY_F_SP
    above = f >= _SLANEY_MIN_LOG_HZ
    # np.maximum keeps log() quiet for the entries np.where discards.
    log_part = _SLANEY_MIN_LOG_MEL + np.log(np.maximum(f, _SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP
    return np.where(above, log_part, mels)


def mel_to_hz(mels: np.ndarray | float, *, htk: bool = False) -> np.ndarray:
    """Mels to Hz (float64), the inverse of :func:`hz_to_mel`."""
    m = np.asanyarray(mels, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    freqs = _SLANEY_F_SP * m
    above = m >= _SLANEY_MIN_LOG_MEL
    log_part = _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOGSTEP * (m - _SLANEY_MIN_LOG_MEL))
    return np.where(above, log_part, freqs)


def mel_band_centres(*, n_mels: int, fmin: float = 0.0, fmax: float, htk: bool = False) -> np.ndarray:
    """Centre frequency in Hz of each of ``n_mels`` triangular bands [shape=(n_mels,)]."""
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin, htk=htk), hz_to_mel(fmax, htk=htk), n_mels + 2), htk=htk)
    return edges[1:-1]


def mel_filterbank(
    *,
    sample_rate: int,
    n_fft: int,
    n_mels: int,
    fmin: float = 0.0,
    fmax: float | None = None,
    htk: bool = False,
) -> torch.Tensor:
    """Slaney-normalised triangular mel filters.

    Equal to ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels,
    fmin=fmin, fmax=fmax, htk=htk, norm="slaney")``.

    Parameters
    ----------
    sample_rate : int > 0
        Hz.
    n_fft : int > 0
        FFT length in samples.
    n_mels : int > 0
        Number of bands.
    fmin, fmax : float, Hz
        Band edges; ``fmax`` defaults to ``sample_rate / 2``.
    htk : bool
        HTK mel formula instead of Slaney's.

    Returns
    -------
    weights : torch.Tensor [shape=(n_mels, n_fft // 2 + 1), dtype=float32], CPU
    """
    if sample_rate <= 0 or n_fft <= 0 or n_mels <= 0:
        raise ParameterError(f"sample_rate, n_fft and n_mels must be positive, got {sample_rate}, {n_fft}, {n_mels}")
    if fmax is None:
        fmax = sample_rate / 2.0
    if not 0.0 <= fmin < fmax:
        raise ParameterError(f"need 0 <= fmin < fmax, got fmin={fmin}, fmax={fmax}")

    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin, htk=htk), hz_to_mel(fmax, htk=htk), n_mels + 2), htk=htk)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    # librosa stores the triangles as float32 before scaling; round at the same step
    # so the two agree to the last bit.
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    weights = (weights * enorm[:, None]).astype(np.float32)
    return torch.from_numpy(weights)


def n_frames(n_samples: int, *, hop_length: int) -> int:
    """Frames produced by a centred STFT of ``n_samples`` samples."""
    if hop_length <= 0:
        raise ParameterError(f"hop_length must be positive, got {hop_length}")
    return 1 + n_samples // hop_length


def log_mel(
    y: np.ndarray | torch.Tensor,
    *,
    settings: MelSettings,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Compressed mel power spectrogram of one clip or a batch of equal-length clips.

    Parameters
    ----------
    y : np.ndarray or torch.Tensor [shape=(n,) or (batch, n)]
        Waveform at ``settings.sample_rate``; cast to float32.
    settings : MelSettings
        FFT size, hop, bands, mel scale and compression (``log1p``: ``log(1 + C*S)``
        with ``C = settings.log_c``; ``db``: ``10 log10(max(S, 1e-10))`` floored at
        80 dB below each clip's maximum).
    device : str or torch.device, optional
        Where to compute; defaults to ``y``'s device (CPU for numpy input).

    Returns
    -------
    S : torch.Tensor [shape=(n_frames, n_mels) or (batch, n_frames, n_mels), dtype=float32]
        Time-major, on ``device``; ``n_frames = 1 + n // hop_length``.

    Raises
    ------
    ParameterError
        ``y`` is empty, not 1-D or 2-D, or not real-valued.
    """
    x = _as_waveform(y, device)
    kernels = _kernels(
        settings.sample_rate,
        settings.n_fft,
        settings.n_mels,
        settings.fmin,
        settings.fmax,
        settings.mel_scale == "htk",
        x.device,
    )
    mel = _mel_power(x, kernels, n_fft=settings.n_fft, hop_length=settings.hop_length)

    if settings.compression == "log1p":
        return mel.mul_(settings.log_c).log1p_()  # mel is ours: compress in place
    if settings.compression == "db":
        db = 10.0 * torch.log10(torch.clamp(mel, min=DB_AMIN))  # ref=1.0: no offset
        peak = db.amax(dim=(-2, -1), keepdim=True)  # per clip, as power_to_db on each
        return torch.maximum(db, peak - DB_TOP)
    raise ParameterError(f"unknown compression {settings.compression!r}; expected 'log1p' or 'db'")


def feature_columns(
    y: np.ndarray | torch.Tensor,
    *,
    settings: FeatureSettings,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Every feature column of ``settings.columns``, in that order (DESIGN.md §3 I).

    One :func:`log_mel` per resolution (``mel_<n_fft>``), then, per
    ``settings.pyramid``, the Gaussian levels ``mel_<n_fft>_g1 .. g<levels-1>``
    and/or the Laplacian levels ``mel_<n_fft>_l0 .. l<levels-1>`` of the first
    resolution (:mod:`tasks.pyramids`; ``g0`` would be ``mel_<n_fft>`` itself).

    Parameters
    ----------
    y : np.ndarray or torch.Tensor [shape=(n,) or (batch, n)]
        Waveform at ``settings.mel.sample_rate``; cast to float32.
    settings : FeatureSettings
        Windows, hop policy, bands, compression and pyramid.
    device : str or torch.device, optional
        Where to compute; defaults to ``y``'s device (CPU for numpy input).

    Returns
    -------
    columns : dict[str, torch.Tensor]
        Keys exactly ``settings.columns``; each value float32, time-major
        ``(n_frames, n_mels)`` or ``(batch, n_frames, n_mels)``, on ``device``.
        ``mel_<w>`` has ``1 + n // hop`` frames (hop per ``settings.hop_policy``);
        pyramid level ``k`` has ``ceil(n_{k-1} / 2)``.

    Raises
    ------
    ParameterError
        Bad waveform (as :func:`log_mel`), or a clip too short for
        ``settings.pyramid_levels`` (the top level needs >= 2 frames).
    """
    x = _as_waveform(y, device)  # once, not once per resolution
    out = {resolution.column: log_mel(x, settings=resolution) for resolution in settings.resolutions()}
    return _with_pyramids(out, settings)


def feature_columns_batch(
    waveforms: Sequence[np.ndarray],
    *,
    settings: FeatureSettings,
    device: str | torch.device | None = None,
) -> list[dict[str, torch.Tensor]]:
    """:func:`feature_columns` of clips of different lengths, one batched transform per resolution.

    The clips are zero-padded to the longest and transformed together (what keeps
    a GPU busy), then each clip keeps its own ``1 + n // hop`` frames. The result is
    the same as one call per clip: centre padding is zeros too, so every kept frame
    sees the same samples. Pyramids are then built per clip.

    Parameters
    ----------
    waveforms : sequence of np.ndarray [shape=(n_i,)]
        Mono waveforms at ``settings.mel.sample_rate``.

    Returns
    -------
    columns : list of dict[str, torch.Tensor]
        One dict per clip, as :func:`feature_columns` returns for it alone.
    """
    if not waveforms:
        return []
    lengths = [int(np.asarray(w).shape[0]) for w in waveforms]
    padded = np.zeros((len(waveforms), max(lengths)), dtype=np.float32)
    for i, w in enumerate(waveforms):
        padded[i, : lengths[i]] = w
    x = _as_waveform(padded, device)
    batched = [(r.column, r.hop_length, log_mel(x, settings=r)) for r in settings.resolutions()]
    return [
        _with_pyramids({column: mel[i, : 1 + n // hop] for column, hop, mel in batched}, settings)
        for i, n in enumerate(lengths)
    ]


def _with_pyramids(out: dict[str, torch.Tensor], settings: FeatureSettings) -> dict[str, torch.Tensor]:
    """Add the pyramid columns of the first resolution; return every column in ``settings.columns`` order."""
    base = settings.mel.column
    if settings.pyramid == "none":
        pass
    elif settings.pyramid in ("gaussian", "laplacian", "both"):
        gaussian = gaussian_pyramid(out[base], levels=settings.pyramid_levels)
        if settings.pyramid in ("gaussian", "both"):
            out.update({f"{base}_g{k}": level for k, level in enumerate(gaussian) if k > 0})
        if settings.pyramid in ("laplacian", "both"):
            out.update({f"{base}_l{k}": level for k, level in enumerate(laplacian_from_gaussian(gaussian))})
    else:
        raise ParameterError(
            f"unknown pyramid {settings.pyramid!r}; expected 'none', 'gaussian', 'laplacian' or 'both'"
        )
    # settings.columns is the contract shards are written and read by; follow its order.
    return {column: out[column] for column in settings.columns}


def _as_waveform(y: np.ndarray | torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        x = y
    elif isinstance(y, np.ndarray):
        if not np.isrealobj(y):
            raise ParameterError(f"waveform must be real-valued, got dtype {y.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    else:
        raise ParameterError(f"waveform must be a numpy array or torch tensor, got {type(y).__name__}")
    if x.is_complex():
        raise ParameterError(f"waveform must be real-valued, got dtype {x.dtype}")
    if x.ndim not in (1, 2):
        raise ParameterError(f"waveform must have shape (n,) or (batch, n), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ParameterError(f"waveform is empty, shape {tuple(x.shape)}")
    target = torch.device(device) if device is not None else x.device
    return x.to(device=target, dtype=torch.float32)


# CPU tuning. The FFT, power and mel product run on blocks of frames of about this many
# bytes of windowed signal, so each block's spectrum stays in cache between the three
# steps (librosa blocks its STFT for the same reason); and the mel product is split into
# groups of adjacent bands, each multiplying only the frequency bins its triangles
# cover, which skips most of the filterbank's zeros (4-6x fewer flops at 128 mels).
# On a GPU one block and one dense product are fastest; the arithmetic is the same.
_CPU_BLOCK_BYTES = 1 << 20
_CPU_BAND_GROUPS = 8


@dataclass(frozen=True)
class _Kernels:
    """Per (settings, device) constants of :func:`log_mel`."""

    window: torch.Tensor  # [shape=(n_fft,)] periodic Hann
    band_groups: tuple[tuple[int, int, torch.Tensor], ...]  # (bin_lo, bin_hi, weights [shape=(bins, bands)])
    block_bytes: int | None  # None: all frames at once


@functools.lru_cache(maxsize=32)
def _kernels(
    sample_rate: int,
    n_fft: int,
    n_mels: int,
    fmin: float,
    fmax: float | None,
    htk: bool,
    device: torch.device,
) -> _Kernels:
    """Window and banded mel filterbank for one setting on one device, built once."""
    on_cpu = device.type == "cpu"
    # Build the window in float64 (as scipy does for librosa), then round once.
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64).to(torch.float32)
    filterbank = mel_filterbank(sample_rate=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk)
    groups = []
    for bands in np.array_split(np.arange(n_mels), min(n_mels, _CPU_BAND_GROUPS if on_cpu else 1)):
        block = filterbank[bands[0] : bands[-1] + 1]
        bins = torch.nonzero(block.any(dim=0)).flatten()
        lo, hi = (int(bins[0]), int(bins[-1]) + 1) if bins.numel() else (0, 1)  # all-empty bands stay zero
        groups.append((lo, hi, block[:, lo:hi].T.contiguous().to(device)))
    return _Kernels(window.to(device), tuple(groups), _CPU_BLOCK_BYTES if on_cpu else None)


def _mel_power(x: torch.Tensor, kernels: _Kernels, *, n_fft: int, hop_length: int) -> torch.Tensor:
    """Mel power spectrogram, time-major.

    ``x`` [shape=(..., n)] float32 -> [shape=(..., 1 + n // hop_length, n_mels)] float32.
    """
    # Centre padding once for the whole clip, then each block is an uncentred STFT of
    # its slice: identical frames to torch.stft(center=True, pad_mode="constant").
    padded = torch.nn.functional.pad(x, (n_fft // 2, n_fft // 2))
    total = 1 + (padded.shape[-1] - n_fft) // hop_length
    batch = x.shape[0] if x.ndim == 2 else 1
    step = total if kernels.block_bytes is None else max(1, kernels.block_bytes // (4 * n_fft * batch))
    blocks = []
    for first in range(0, total, step):
        count = min(step, total - first)
        start = first * hop_length
        segment = padded[..., start : start + (count - 1) * hop_length + n_fft]
        spec = torch.stft(
            segment,
            n_fft=n_fft,
            hop_length=hop_length,
            win_length=n_fft,
            window=kernels.window,
            center=False,
            onesided=True,
            return_complex=True,
        ).transpose(-1, -2)  # (..., frames, n_fft//2+1), contiguous in frequency
        # re² + im² as two element-wise squares: 5x faster on the CPU than squaring
        # view_as_real and reducing its last axis of length 2.
        power = spec.real.square().add_(spec.imag.square())
        parts = [torch.matmul(power[..., lo:hi], weights) for lo, hi, weights in kernels.band_groups]
        blocks.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-2)
