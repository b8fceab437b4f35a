"""Analysis of learned first-layer filters of raw-audio models (Dieleman & Schrauwen, ICASSP 2014).

The paper's finding: the filters of the strided first layer become frequency-selective,
and their dominant frequencies, sorted, follow a curve much like the mel scale (many
filters at low frequencies, few at high ones). These functions compute what the plots
in :mod:`tasks.report` draw.
"""

from __future__ import annotations

import numpy as np

from core.errors import ParameterError


def filter_spectra(filters: np.ndarray, *, sample_rate: int, n_fft: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude spectrum of each filter.

    Parameters
    ----------
    filters : np.ndarray [shape=(n_filters, filter_length)]
    sample_rate : int > 0, Hz, the rate of the waveform the filters were learned on
    n_fft : int >= filter_length, zero-padded FFT size (default: the next power of two, at least 1024)

    Returns
    -------
    frequencies : np.ndarray [shape=(n_fft // 2 + 1,)], Hz
    magnitudes : np.ndarray [shape=(n_filters, n_fft // 2 + 1)]
    """
    filters = np.asarray(filters, dtype=np.float64)
    if filters.ndim != 2:
        raise ParameterError(f"filters must be (n_filters, filter_length), got shape {filters.shape}")
    if sample_rate <= 0:
        raise ParameterError(f"sample_rate={sample_rate} must be a positive number of Hz")
    length = filters.shape[1]
    n_fft = n_fft or max(1024, 1 << (length - 1).bit_length())
    if n_fft < length:
        raise ParameterError(f"n_fft={n_fft} is shorter than the filters ({length} taps)")
    window = np.hanning(length)  # the filters start and end abruptly: taper before the FFT
    magnitudes = np.abs(np.fft.rfft(filters * window, n=n_fft, axis=1))
    return np.fft.rfftfreq(n_fft, d=1.0 / sample_rate), magnitudes


def dominant_frequencies(filters: np.ndarray, *, sample_rate: int, n_fft: int | None = None) -> np.ndarray:
    """The frequency (Hz) where each filter's magnitude spectrum peaks ``[shape=(n_filters,)]``."""
    frequencies, magnitudes = filter_spectra(filters, sample_rate=sample_rate, n_fft=n_fft)
    return frequencies[np.argmax(magnitudes, axis=1)]


def mel_reference(n: int, *, fmin: float = 0.0, fmax: float) -> np.ndarray:
    """``n`` frequencies (Hz) equally spaced on the mel scale (HTK formula), for comparison with sorted filters."""
    if n < 1 or fmax <= fmin:
        raise ParameterError(f"need n >= 1 and fmax > fmin, got n={n}, fmin={fmin}, fmax={fmax}")
    mel = np.linspace(2595.0 * np.log10(1.0 + fmin / 700.0), 2595.0 * np.log10(1.0 + fmax / 700.0), n)
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_likeness(dominant: np.ndarray, *, fmax: float) -> dict[str, float]:
    """How closely the sorted dominant frequencies follow the mel scale rather than a linear one.

    Returns the RMS distance (in mels) of the sorted frequencies to an equally spaced mel
    scale and to an equally spaced linear scale over the same range; a smaller ``mel``
    than ``linear`` means the filters are laid out like mel bands.
    """
    ordered = np.sort(np.asarray(dominant, dtype=np.float64))

    def to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    mel_scale = mel_reference(len(ordered), fmin=0.0, fmax=fmax)
    linear = np.linspace(0.0, fmax, len(ordered))
    return {
        "mel": float(np.sqrt(np.mean((to_mel(ordered) - to_mel(mel_scale)) ** 2))),
        "linear": float(np.sqrt(np.mean((to_mel(ordered) - to_mel(linear)) ** 2))),
    }


def group_similarity(filters: np.ndarray, *, pool_size: int, sample_rate: int) -> dict[str, float]:
    """How alike the filters of a feature-pooling group are, against filters of different groups.

    The cosine of two filters' magnitude spectra ignores their phase: filters that are
    shifted copies of one another (what the paper finds in a group) score near 1.
    Returns the mean cosine over pairs in the same group (``within``) and over pairs
    in different groups (``across``).
    """
    if pool_size < 2 or len(filters) % pool_size:
        raise ParameterError(f"pool_size={pool_size} must be >= 2 and divide the {len(filters)} filters")
    _, magnitudes = filter_spectra(filters, sample_rate=sample_rate)
    unit = magnitudes / np.maximum(np.linalg.norm(magnitudes, axis=1, keepdims=True), 1e-12)
    cosine = unit @ unit.T
    group = np.arange(len(filters)) // pool_size
    same = group[:, None] == group[None, :]
    off_diagonal = ~np.eye(len(filters), dtype=bool)
    return {"within": float(cosine[same & off_diagonal].mean()), "across": float(cosine[~same].mean())}
