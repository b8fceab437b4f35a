"""tasks.spectrogram against librosa, and against analytic answers on tones."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from core.errors import ParameterError
from core.settings import MelSettings
from tasks.spectrogram import log_mel, mel_band_centres, mel_filterbank, n_frames

SR = 22050


@pytest.fixture(scope="module")
def noise_and_chirp() -> np.ndarray:
    """3 s of white noise plus a linear chirp from 100 Hz to 8 kHz, float32."""
    rng = np.random.default_rng(0)
    t = np.arange(3 * SR) / SR
    f0, f1, dur = 100.0, 8000.0, 3.0
    chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * dur) * t**2))
    return (0.1 * rng.standard_normal(t.size) + 0.5 * chirp).astype(np.float32)


def _librosa_mel(y: np.ndarray, s: MelSettings) -> np.ndarray:
    """Reference: librosa with the same settings, power spectrum, time-major."""
    S = librosa.feature.melspectrogram(
        y=y,
        sr=s.sample_rate,
        n_fft=s.n_fft,
        hop_length=s.hop_length,
        win_length=s.n_fft,
        window="hann",
        center=True,
        pad_mode="constant",
        power=2.0,
        n_mels=s.n_mels,
        fmin=s.fmin,
        fmax=s.fmax,
        htk=s.mel_scale == "htk",
    )
    return S.T


@pytest.mark.parametrize("htk", [False, True], ids=["slaney", "htk"])
@pytest.mark.parametrize(
    ("sr", "n_fft", "n_mels", "fmin", "fmax"),
    [(22050, 1024, 128, 0.0, None), (16000, 512, 40, 30.0, 7000.0), (44100, 8192, 96, 20.0, 16000.0)],
)
def test_mel_filterbank_equals_librosa(htk, sr, n_fft, n_mels, fmin, fmax):
    expected = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk, norm="slaney")
    got = mel_filterbank(sample_rate=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk)
    assert got.dtype == torch.float32
    assert tuple(got.shape) == (n_mels, n_fft // 2 + 1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("htk", [False, True], ids=["slaney", "htk"])
def test_band_centres_equal_librosa(htk):
    expected = librosa.mel_frequencies(n_mels=66, fmin=50.0, fmax=9000.0, htk=htk)[1:-1]
    np.testing.assert_allclose(mel_band_centres(n_mels=64, fmin=50.0, fmax=9000.0, htk=htk), expected, rtol=1e-12)


@pytest.mark.parametrize("n_fft", [1024, 2048, 4096, 8192])
def test_log1p_matches_librosa(noise_and_chirp, n_fft):
    s = MelSettings(sample_rate=SR, n_fft=n_fft, hop_length=n_fft // 2, n_mels=128, compression="log1p")
    expected = np.log1p(s.log_c * _librosa_mel(noise_and_chirp, s))
    got = log_mel(noise_and_chirp, settings=s)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert tuple(got.shape) == expected.shape == (n_frames(noise_and_chirp.size, hop_length=n_fft // 2), 128)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("n_fft", [1024, 8192])
@pytest.mark.parametrize("mel_scale", ["slaney", "htk"])
def test_db_matches_librosa(noise_and_chirp, n_fft, mel_scale):
    s = MelSettings(
        sample_rate=SR,
        n_fft=n_fft,
        hop_length=n_fft // 2,
        n_mels=128,
        fmin=20.0,
        fmax=10000.0,
        mel_scale=mel_scale,
        compression="db",
    )
    expected = librosa.power_to_db(_librosa_mel(noise_and_chirp, s), ref=1.0, amin=1e-10, top_db=80.0)
    got = log_mel(noise_and_chirp, settings=s).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)


def test_db_floor_is_per_clip():
    """A quiet clip batched with a loud one keeps its own 80 dB range."""
    s = MelSettings(sample_rate=SR, n_fft=1024, hop_length=512, n_mels=64, compression="db")
    rng = np.random.default_rng(1)
    loud = rng.standard_normal(SR).astype(np.float32)
    batch = np.stack([loud, 1e-4 * loud])
    got = log_mel(batch, settings=s)
    for i in range(2):
        torch.testing.assert_close(got[i], log_mel(batch[i], settings=s))
        assert got[i].max() - got[i].min() <= 80.0 + 1e-4


@pytest.mark.parametrize("mel_scale", ["slaney", "htk"])
@pytest.mark.parametrize("freq", [300.0, 1250.0, 4400.0])
def test_tone_peaks_in_nearest_band(freq, mel_scale):
    s = MelSettings(sample_rate=SR, n_fft=4096, hop_length=1024, n_mels=64, mel_scale=mel_scale)
    t = np.arange(SR) / SR
    tone = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    spectrum = log_mel(tone, settings=s).mean(dim=0).numpy()
    centres = librosa.mel_frequencies(n_mels=s.n_mels + 2, fmin=0.0, fmax=SR / 2, htk=mel_scale == "htk")[1:-1]
    assert int(np.argmax(spectrum)) == int(np.argmin(np.abs(centres - freq)))


def test_batch_equals_per_item(noise_and_chirp):
    s = MelSettings(sample_rate=SR, n_fft=2048, hop_length=512, n_mels=128)
    batch = np.stack([noise_and_chirp, noise_and_chirp[::-1].copy()])
    got = log_mel(torch.from_numpy(batch), settings=s)
    assert tuple(got.shape) == (2, n_frames(batch.shape[1], hop_length=512), 128)
    for i in range(2):
        torch.testing.assert_close(got[i], log_mel(batch[i], settings=s), rtol=1e-5, atol=1e-5)


def test_input_types_and_short_clip():
    s = MelSettings(sample_rate=SR, n_fft=1024, hop_length=256, n_mels=32)
    y64 = np.random.default_rng(2).standard_normal(300)  # shorter than n_fft: centre padding covers it
    got = log_mel(y64, settings=s)
    assert got.dtype == torch.float32
    assert tuple(got.shape) == (n_frames(300, hop_length=256), 32) == (2, 32)
    torch.testing.assert_close(got, log_mel(torch.from_numpy(y64.astype(np.float32)), settings=s))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize(
    ("y", "match"),
    [
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.zeros((2, 0), dtype=np.float32), "empty"),
        (np.zeros((1, 2, 100), dtype=np.float32), r"shape \(1, 2, 100\)"),
        (np.zeros(100, dtype=np.complex64), "real-valued"),
        ([0.0, 1.0], "list"),
    ],
)
def test_bad_input_raises_parameter_error(y, match):
    with pytest.raises(ParameterError, match=match):
        log_mel(y, settings=MelSettings())


def test_n_frames():
    assert n_frames(0, hop_length=512) == 1
    assert n_frames(22050 * 30, hop_length=512) == 1292
    with pytest.raises(ParameterError, match="hop_length"):
        n_frames(100, hop_length=0)


@pytest.mark.gpu
@pytest.mark.parametrize("compression", ["log1p", "db"])
def test_cuda_matches_cpu(noise_and_chirp, compression):
    s = MelSettings(sample_rate=SR, n_fft=2048, hop_length=1024, n_mels=128, compression=compression)
    cpu = log_mel(noise_and_chirp, settings=s)
    on_gpu = log_mel(torch.from_numpy(noise_and_chirp).cuda(), settings=s)
    assert on_gpu.device.type == "cuda"
    assert log_mel(noise_and_chirp, settings=s, device="cuda").device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), cpu, rtol=1e-4, atol=1e-3)


def test_gpu_plan_equals_cpu_plan(noise_and_chirp, monkeypatch):
    """One dense block (the plan used on GPUs) gives what banded CPU blocks give."""
    import tasks.spectrogram as spectrogram

    s = MelSettings(sample_rate=SR, n_fft=4096, hop_length=512, n_mels=128)
    batch = np.stack([noise_and_chirp, 0.5 * noise_and_chirp])
    banded = log_mel(batch, settings=s)
    spectrogram._kernels.cache_clear()
    monkeypatch.setattr(spectrogram, "_CPU_BAND_GROUPS", 1)
    monkeypatch.setattr(spectrogram, "_CPU_BLOCK_BYTES", 1 << 40)
    try:
        dense = log_mel(batch, settings=s)
    finally:
        spectrogram._kernels.cache_clear()
    torch.testing.assert_close(dense, banded, rtol=1e-5, atol=1e-4)
