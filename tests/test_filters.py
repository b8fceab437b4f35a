"""tasks.filters on filters with known answers: tones peak at their frequency; mel-spaced banks look mel-like."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ParameterError
from tasks.filters import (
    dominant_frequencies,
    filter_spectra,
    mel_likeness,
    mel_reference,
)

SR = 16000


def _tones(frequencies, length: int = 512) -> np.ndarray:
    t = np.arange(length) / SR
    return np.stack([np.sin(2 * np.pi * f * t) for f in frequencies])


def test_a_tone_filter_peaks_at_its_frequency() -> None:
    frequencies = [250.0, 1000.0, 3100.0, 7000.0]
    found = dominant_frequencies(_tones(frequencies), sample_rate=SR, n_fft=4096)
    np.testing.assert_allclose(found, frequencies, atol=SR / 4096)
    freqs, magnitudes = filter_spectra(_tones(frequencies), sample_rate=SR)
    assert magnitudes.shape == (4, len(freqs)) and freqs[-1] == SR / 2


def test_mel_spaced_filters_are_told_from_linear_ones() -> None:
    mel_bank = _tones(mel_reference(64, fmin=60.0, fmax=7500.0))
    linear_bank = _tones(np.linspace(60.0, 7500.0, 64))
    mel_score = mel_likeness(dominant_frequencies(mel_bank, sample_rate=SR), fmax=8000.0)
    linear_score = mel_likeness(dominant_frequencies(linear_bank, sample_rate=SR), fmax=8000.0)
    assert mel_score["mel"] < mel_score["linear"]
    assert linear_score["linear"] < linear_score["mel"]


def test_bad_arguments() -> None:
    with pytest.raises(ParameterError, match="n_filters"):
        filter_spectra(np.zeros(10), sample_rate=SR)
    with pytest.raises(ParameterError, match="shorter than the filters"):
        filter_spectra(np.zeros((2, 512)), sample_rate=SR, n_fft=256)
    with pytest.raises(ParameterError, match="fmax > fmin"):
        mel_reference(4, fmin=100.0, fmax=50.0)


def test_filter_plots_are_written(tmp_path) -> None:
    from tasks.report import (
        plot_dominant_frequencies,
        plot_filter_spectra,
        plot_pooled_filters,
    )

    bank = _tones(mel_reference(16, fmin=80.0, fmax=7000.0), length=256)
    for plot in (
        plot_filter_spectra(bank, sample_rate=SR, path=tmp_path / "s.png", title="t"),
        plot_dominant_frequencies(bank, sample_rate=SR, path=tmp_path / "d.png", title="t"),
        plot_pooled_filters(bank, pool_size=2, path=tmp_path / "p.png", title="t"),
    ):
        assert plot.stat().st_size > 5000


def test_group_similarity_tells_shifted_copies_from_other_filters() -> None:
    from tasks.filters import group_similarity

    t = np.arange(256)
    filters = np.stack(
        [
            np.sin(2 * np.pi * f * t / 16000 + phase) * np.hanning(256)
            for f in (500, 1500, 3000, 6000)
            for phase in (0.0, 1.0)
        ]
    )  # groups of 2: one tone, two phases
    alike = group_similarity(filters, pool_size=2, sample_rate=16000)
    assert alike["within"] > 0.99 and alike["across"] < 0.2
    with pytest.raises(ParameterError):
        group_similarity(filters, pool_size=3, sample_rate=16000)
