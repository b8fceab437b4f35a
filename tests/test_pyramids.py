"""tasks.pyramids on signals with analytic answers, and tasks.spectrogram.feature_columns."""

from __future__ import annotations

import math

import librosa
import numpy as np
import pytest
import torch

from core.errors import ParameterError
from core.settings import FeatureSettings, MelSettings
from tasks.pyramids import (
    KERNEL,
    gaussian_expand,
    gaussian_pyramid,
    gaussian_reduce,
    laplacian_pyramid,
    min_frames,
    reconstruct_from_laplacian,
)
from tasks.spectrogram import feature_columns, log_mel, n_frames


def _random_mel(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _noise_and_chirp(sr: int, *, seconds: float = 3.0, f1: float = 7000.0) -> np.ndarray:
    """White noise plus a linear chirp from 100 Hz to ``f1``, float32."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    chirp = np.sin(2 * np.pi * (100.0 * t + (f1 - 100.0) / (2 * seconds) * t**2))
    return (0.1 * rng.standard_normal(t.size) + 0.5 * chirp).astype(np.float32)


@pytest.fixture(scope="module")
def clip_16k() -> np.ndarray:
    return _noise_and_chirp(16000)


# --- pyramids -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 6, 33, 64])
def test_constant_stays_constant(n):
    mel = torch.full((2, n, 8), 3.25)
    for level in gaussian_pyramid(mel, levels=4 if n >= 9 else 3):
        torch.testing.assert_close(level, torch.full_like(level, 3.25), rtol=0, atol=1e-6)
    laplacian = laplacian_pyramid(mel, levels=3)
    for band in laplacian[:-1]:  # a constant has no detail at any scale
        torch.testing.assert_close(band, torch.zeros_like(band), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [5, 9, 10, 31, 32, 33, 100])
def test_lengths_halve_rounding_up(n):
    levels = 4 if n >= min_frames(levels=4) else 3
    gaussian = gaussian_pyramid(_random_mel(n, 4), levels=levels)
    laplacian = laplacian_pyramid(_random_mel(n, 4), levels=levels)
    expected = [n]
    for _ in range(levels - 1):
        expected.append(math.ceil(expected[-1] / 2))
    assert [g.shape[-2] for g in gaussian] == [level.shape[-2] for level in laplacian] == expected
    assert all(g.shape[-1] == 4 and g.dtype == torch.float32 for g in gaussian)
    assert expected[-1] >= 2


@pytest.mark.parametrize("n", [5, 17, 64, 101])
def test_laplacian_reconstructs_exactly(n):
    mel = _random_mel(3, n, 16, seed=n)
    levels = max(k for k in range(1, 7) if n >= min_frames(levels=k))
    laplacian = laplacian_pyramid(mel, levels=levels)
    assert len(laplacian) == levels
    torch.testing.assert_close(laplacian[-1], gaussian_pyramid(mel, levels=levels)[-1])
    torch.testing.assert_close(reconstruct_from_laplacian(laplacian), mel, rtol=0, atol=1e-5)
    # float64 shows the identity is exact, not approximate
    mel64 = mel.double()
    err = (reconstruct_from_laplacian(laplacian_pyramid(mel64, levels=levels)) - mel64).abs().max()
    assert err < 1e-12


def test_tone_keeps_its_band_at_every_level():
    s = MelSettings(sample_rate=16000, n_fft=2048, hop_length=256, n_mels=64)
    t = np.arange(2 * s.sample_rate) / s.sample_rate
    tone = (0.5 * np.sin(2 * np.pi * 1250.0 * t)).astype(np.float32)
    levels = gaussian_pyramid(log_mel(tone, settings=s), levels=4)
    steady = levels[0][40:-40].mean(dim=0)  # away from the clip's zero-padded ends
    band = int(steady.argmax())
    for level in levels:
        interior = level[4:-4]  # frames the edges do not reach at this level
        assert (interior.argmax(dim=-1) == band).all()
        # smoothing in time leaves a stationary tone's spectrum as it was
        torch.testing.assert_close(interior, steady.expand_as(interior), rtol=0, atol=1e-4)


def test_click_spreads_by_the_kernel():
    n, t0 = 32, 16
    mel = torch.zeros(n, 2)
    mel[t0, 0] = 1.0
    g1 = gaussian_reduce(mel)
    # frame j of level 1 is the blur centred on frame 2j: an even click lands on 3 frames
    expected = torch.zeros(n // 2, 2)
    expected[t0 // 2 - 1 : t0 // 2 + 2, 0] = torch.tensor([KERNEL[0], KERNEL[2], KERNEL[4]])
    torch.testing.assert_close(g1, expected, rtol=0, atol=0)
    # an odd click lands on the two frames either side, with the kernel's odd taps
    mel_odd = torch.roll(mel, 1, dims=0)
    expected_odd = torch.zeros(n // 2, 2)
    expected_odd[t0 // 2 : t0 // 2 + 2, 0] = torch.tensor([KERNEL[3], KERNEL[1]])
    torch.testing.assert_close(gaussian_reduce(mel_odd), expected_odd, rtol=0, atol=0)
    # expanding a single coarse frame gives the kernel times 2 on the fine grid
    coarse = torch.zeros(8, 1)
    coarse[4] = 1.0
    fine = gaussian_expand(coarse, n_frames=16)[:, 0]
    assert torch.equal(torch.nonzero(fine).flatten(), torch.arange(6, 11))
    torch.testing.assert_close(fine[6:11], 2 * torch.tensor(KERNEL), rtol=0, atol=0)
    # the click spreads further at each level but stays in column 0, centred on it
    for k, level in enumerate(gaussian_pyramid(mel, levels=4)[1:], start=1):
        assert level[:, 1].abs().max() == 0
        assert int(level[:, 0].argmax()) == t0 // 2**k


def test_edges_use_reflect_padding():
    mel = torch.arange(6, dtype=torch.float64)[:, None]  # a ramp: frames 0..5
    g1 = gaussian_reduce(mel)[:, 0]
    # frame 0 sees 2, 1 (reflected), 0, 1, 2; the last sees 2, 3, 4, 5, 4 (reflected)
    assert g1[0] == (2 + 4 * 1 + 0 + 4 * 1 + 2) / 16
    assert g1[2] == (2 + 4 * 3 + 6 * 4 + 4 * 5 + 4) / 16
    assert g1[1] == 2.0  # the interior of a ramp is left alone


def test_batch_equals_per_item():
    batch = _random_mel(2, 3, 37, 8)
    gaussian, laplacian = gaussian_pyramid(batch, levels=4), laplacian_pyramid(batch, levels=4)
    for i in range(2):
        for j in range(3):
            for got, want in zip(gaussian, gaussian_pyramid(batch[i, j], levels=4)):
                torch.testing.assert_close(got[i, j], want, rtol=0, atol=1e-6)
            for got, want in zip(laplacian, laplacian_pyramid(batch[i, j], levels=4)):
                torch.testing.assert_close(got[i, j], want, rtol=0, atol=1e-6)


def test_levels_one_is_the_input():
    mel = _random_mel(1, 4)
    assert gaussian_pyramid(mel, levels=1)[0] is mel
    assert laplacian_pyramid(mel, levels=1)[0] is mel


@pytest.mark.parametrize(
    ("mel", "levels", "match"),
    [
        (torch.zeros(10, 4), 0, "levels must be an int >= 1, got 0"),
        (torch.zeros(10, 4), 2.0, "levels must be an int >= 1, got 2.0"),
        (torch.zeros(16, 4), 5, "16 frames is too short for levels=5.*>= 17 frames"),
        (torch.zeros(2, 4), 2, "2 frames is too short for levels=2"),
        (torch.zeros(10), 2, r"shape \(10,\)"),
        (torch.zeros(10, 4, dtype=torch.int64), 2, "floating"),
        (np.zeros((10, 4), dtype=np.float32), 2, "ndarray"),
    ],
)
def test_bad_input_raises_parameter_error(mel, levels, match):
    with pytest.raises(ParameterError, match=match):
        gaussian_pyramid(mel, levels=levels)
    with pytest.raises(ParameterError, match=match):
        laplacian_pyramid(mel, levels=levels)


def test_expand_checks_lengths():
    with pytest.raises(ParameterError, match="cannot expand 4 frames to n_frames=10"):
        gaussian_expand(torch.zeros(4, 2), n_frames=10)


# --- feature_columns ------------------------------------------------------------------


@pytest.mark.parametrize("pyramid", ["none", "gaussian", "laplacian", "both"])
def test_feature_columns_are_the_settings_columns(clip_16k, pyramid):
    settings = FeatureSettings(pyramid=pyramid)
    got = feature_columns(clip_16k, settings=settings)
    assert list(got) == settings.columns
    for resolution in settings.resolutions():
        assert torch.equal(got[resolution.column], log_mel(clip_16k, settings=resolution))
        assert got[resolution.column].shape == (n_frames(clip_16k.size, hop_length=512), 128)
    base = got["mel_1024"]
    if pyramid in ("gaussian", "both"):
        for k, level in enumerate(gaussian_pyramid(base, levels=4)[1:], start=1):
            assert torch.equal(got[f"mel_1024_g{k}"], level)
    if pyramid in ("laplacian", "both"):
        laplacian = [got[f"mel_1024_l{k}"] for k in range(4)]
        for got_band, want in zip(laplacian, laplacian_pyramid(base, levels=4)):
            assert torch.equal(got_band, want)
        torch.testing.assert_close(reconstruct_from_laplacian(laplacian), base, rtol=0, atol=1e-5)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in got.values())


def test_feature_columns_half_hop_frames(clip_16k):
    settings = FeatureSettings(hop_policy="half", pyramid="both", pyramid_levels=3)
    got = feature_columns(clip_16k, settings=settings)
    n = clip_16k.size
    for w in (1024, 2048, 4096, 8192):
        assert got[f"mel_{w}"].shape == (1 + n // (w // 2), 128)
    assert got["mel_1024_g2"].shape[0] == math.ceil(math.ceil((1 + n // 512) / 2) / 2)


def test_feature_columns_batch(clip_16k):
    settings = FeatureSettings(pyramid="both", pyramid_levels=3, extra_windows=(4096,))
    batch = np.stack([clip_16k[:16000], clip_16k[16000:32000]])
    got = feature_columns(torch.from_numpy(batch), settings=settings)
    assert list(got) == settings.columns
    for i in range(2):
        single = feature_columns(batch[i], settings=settings)
        for column in settings.columns:
            assert got[column].shape[0] == 2
            torch.testing.assert_close(got[column][i], single[column], rtol=1e-5, atol=1e-4)


def test_feature_columns_short_clip_names_the_fix():
    settings = FeatureSettings(pyramid="gaussian", pyramid_levels=8)  # needs >= 129 frames
    with pytest.raises(ParameterError, match="too short for levels=8"):
        feature_columns(np.zeros(512 * 40, dtype=np.float32), settings=settings)
    with pytest.raises(ParameterError, match="empty"):
        feature_columns(np.zeros(0, dtype=np.float32), settings=settings)


@pytest.mark.parametrize("window", [1024, 2048, 4096, 8192])
def test_feature_columns_match_librosa(window):
    sr = 22050
    y = _noise_and_chirp(sr, f1=8000.0)
    settings = FeatureSettings(mel=MelSettings(sample_rate=sr, n_mels=128), hop_policy="half")
    got = feature_columns(y, settings=settings)[f"mel_{window}"].numpy()
    S = librosa.feature.melspectrogram(
        y=y,
        sr=sr,
        n_fft=window,
        hop_length=window // 2,
        win_length=window,
        window="hann",
        center=True,
        pad_mode="constant",
        power=2.0,
        n_mels=128,
    )
    expected = np.log1p(settings.mel.log_c * S.T)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3


@pytest.mark.gpu
def test_feature_columns_cuda_matches_cpu(clip_16k):
    settings = FeatureSettings(pyramid="both")
    cpu = feature_columns(clip_16k, settings=settings)
    on_gpu = feature_columns(clip_16k, settings=settings, device="cuda")
    assert list(on_gpu) == list(cpu)
    for column, value in on_gpu.items():
        assert value.device.type == "cuda"
        torch.testing.assert_close(value.cpu(), cpu[column], rtol=1e-4, atol=1e-3)
    mel = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 50, 16)).astype(np.float32))
    laplacian = laplacian_pyramid(mel.cuda(), levels=4)
    for got, want in zip(laplacian, laplacian_pyramid(mel, levels=4)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reconstruct_from_laplacian(laplacian).cpu(), mel, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pyramid", ["none", "both"])
@pytest.mark.parametrize("compression", ["log1p", "db"])
def test_batch_of_unequal_clips_equals_one_call_per_clip(pyramid, compression):
    from core.settings import FeatureSettings, MelSettings
    from tasks.spectrogram import feature_columns, feature_columns_batch

    rng = np.random.default_rng(5)
    settings = FeatureSettings(
        mel=MelSettings(n_mels=40, compression=compression), extra_windows=(4096,), pyramid=pyramid, pyramid_levels=3
    )
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 23457, 9000)]
    batched = feature_columns_batch(clips, settings=settings)
    for clip, columns in zip(clips, batched):
        alone = feature_columns(clip, settings=settings)
        assert list(columns) == list(alone) == settings.columns
        for name in alone:
            torch.testing.assert_close(columns[name], alone[name], atol=2e-4, rtol=1e-5)
    assert feature_columns_batch([], settings=settings) == []
