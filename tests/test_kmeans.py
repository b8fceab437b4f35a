"""tasks.kmeans on data with known answers: planted clusters, whitening, encoding as explicit dot products."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.optimize import linear_sum_assignment

from core.errors import DatasetError, ParameterError
from core.settings import KMeansSettings
from tasks.kmeans import (
    Codebook,
    encode_clip,
    encode_windows,
    fit_codebook,
    fit_whitening,
    frame_windows,
    pool,
    random_codebook,
    sample_windows,
    spherical_kmeans,
)


def _planted(k: int = 12, d: int = 32, n: int = 6000, noise: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, k, n)] + noise * rng.standard_normal((n, d))
    return centres, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _worst_angle_deg(means: np.ndarray, centres: np.ndarray) -> float:
    cosine = means @ centres.T
    rows, cols = linear_sum_assignment(-cosine)
    return float(np.degrees(np.arccos(np.clip(cosine[rows, cols], -1.0, 1.0))).max())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_spherical_kmeans_recovers_planted_clusters(seed: int) -> None:
    centres, x = _planted(seed=10 + seed)
    fit = spherical_kmeans(x, k=len(centres), iterations=5, batch_size=256, seed=seed)
    # Noise 0.05 per axis in 32 dimensions puts points ~16 degrees from their centre; means average it out.
    assert _worst_angle_deg(fit.means, centres) < 2.0
    np.testing.assert_allclose(np.linalg.norm(fit.means, axis=1), 1.0, atol=1e-5)
    assert fit.mean_cosine > 0.95 and len(fit.history) == 5


def test_spherical_kmeans_is_seeded() -> None:
    _, x = _planted()
    a = spherical_kmeans(x, k=12, iterations=3, batch_size=500, seed=7)
    b = spherical_kmeans(x, k=12, iterations=3, batch_size=500, seed=7)
    c = spherical_kmeans(x, k=12, iterations=3, batch_size=500, seed=8)
    np.testing.assert_array_equal(a.means, b.means)
    assert not np.array_equal(a.means, c.means)


def test_empty_clusters_are_reseeded() -> None:
    # Three directions only, six means: at least three clusters stay empty and are re-seeded each pass.
    rng = np.random.default_rng(0)
    directions = np.eye(8, dtype=np.float32)[:3]
    x = directions[rng.integers(0, 3, 900)]
    fit = spherical_kmeans(x, k=6, iterations=4, batch_size=100, seed=0)
    assert fit.reseeded >= 3
    np.testing.assert_allclose(np.linalg.norm(fit.means, axis=1), 1.0, atol=1e-5)
    # The three real directions are still found.
    assert _worst_angle_deg(fit.means[np.argsort(-(fit.means @ directions.T).max(axis=1))[:3]], directions) < 1e-3


def test_bad_kmeans_arguments() -> None:
    _, x = _planted(n=50)
    with pytest.raises(ParameterError, match="at least 2 means"):
        spherical_kmeans(x, k=1)
    with pytest.raises(ParameterError, match="fewer than k"):
        spherical_kmeans(x, k=51)
    with pytest.raises(ValidationError, match="at least 2 means"):
        KMeansSettings(k=1)
    with pytest.raises(ValidationError, match="at least 1 frame"):
        KMeansSettings(context=0)


def test_whitening_gives_identity_covariance_on_its_sample() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4000, 20)) @ rng.standard_normal((20, 20)) * 3.0 + 5.0
    white = fit_whitening(x, epsilon=0.0).apply(x).double().numpy()
    np.testing.assert_allclose(np.cov(white.T), np.eye(20), atol=1e-5)  # float32 output
    np.testing.assert_allclose(white.mean(axis=0), 0.0, atol=1e-5)
    # epsilon keeps near-silent axes from being blown up: every variance ends below 1.
    shrunk = fit_whitening(x, epsilon=0.1).apply(x).double().numpy()
    assert np.linalg.eigvalsh(np.cov(shrunk.T)).max() < 1.0


def test_whitening_refuses_degenerate_data_without_epsilon() -> None:
    x = np.zeros((100, 4))
    x[:, 0] = np.arange(100)
    with pytest.raises(DatasetError, match="epsilon"):
        fit_whitening(x, epsilon=0.0)
    fit_whitening(x, epsilon=0.01)  # regularized: fine


def test_frame_windows_lay_frames_end_to_end() -> None:
    spec = np.arange(30, dtype=np.float32).reshape(10, 3)  # 10 frames, 3 bands
    windows = frame_windows(spec, context=4)
    assert windows.shape == (7, 12)
    np.testing.assert_array_equal(windows[2].numpy(), spec[2:6].reshape(-1))
    with pytest.raises(ParameterError, match="shorter than context"):
        frame_windows(spec, context=11)


def _codebook(seed: int = 0, *, k: int = 5, context: int = 3, n_mels: int = 6) -> tuple[np.ndarray, Codebook]:
    rng = np.random.default_rng(seed)
    spec = rng.standard_normal((80, n_mels)).astype(np.float32)
    windows = sample_windows([spec, spec[::-1].copy()], context=context, n_windows=120, seed=seed)
    return spec, fit_codebook(
        windows, k=k, context=context, n_mels=n_mels, epsilon=0.05, iterations=3, batch_size=32, seed=seed
    )


def test_encoding_equals_the_explicit_dot_products() -> None:
    spec, codebook = _codebook()
    explicit = codebook.whitening.apply(frame_windows(spec, context=3)) @ torch.from_numpy(codebook.means).T
    encoded = encode_windows(spec, codebook)
    assert encoded.shape == (78, 5)
    torch.testing.assert_close(encoded, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encode_windows(spec, codebook, activation="relu"), explicit.clamp_min(0))
    torch.testing.assert_close(
        encode_windows(spec, codebook, activation="threshold", threshold=0.5), (explicit - 0.5).clamp_min(0)
    )
    with pytest.raises(ParameterError, match="activation"):
        encode_windows(spec, codebook, activation="tanh")


def test_pooling_over_time() -> None:
    encoded = torch.tensor([[1.0, -2.0], [3.0, 0.0], [-1.0, 5.0]])
    torch.testing.assert_close(pool(encoded, pooling="max"), torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(pool(encoded, pooling="mean"), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(pool(encoded, pooling="max+mean"), torch.tensor([3.0, 5.0, 1.0, 1.0]))
    spec, codebook = _codebook()
    assert encode_clip(spec, codebook, activation="linear", threshold=0.0, pooling="max+mean").shape == (10,)


def test_codebook_round_trips_without_pickle(tmp_path) -> None:
    _, codebook = _codebook()
    path = codebook.save(tmp_path / "codebooks" / "mel_1024.npz")
    with np.load(path, allow_pickle=False) as npz:  # would raise on an object array
        assert {"means", "whitening_mean", "whitening_matrix", "header"} <= set(npz.files)
    loaded = Codebook.load(path)
    np.testing.assert_array_equal(loaded.means, codebook.means)
    np.testing.assert_array_equal(loaded.whitening.matrix, codebook.whitening.matrix)
    assert (loaded.context, loaded.n_mels, loaded.kind, loaded.info) == (3, 6, "kmeans", codebook.info)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for bad in ("junk.npz", "cut.npz"):
        with pytest.raises(DatasetError, match="not a mirflow codebook"):
            Codebook.load(tmp_path / bad)


def test_random_codebook_is_the_same_shape_and_unit_norm() -> None:
    _, learned = _codebook()
    control = random_codebook(learned.whitening, k=learned.k, context=3, n_mels=6, seed=0)
    assert control.means.shape == learned.means.shape and control.kind == "random"
    np.testing.assert_allclose(np.linalg.norm(control.means, axis=1), 1.0, atol=1e-5)


@pytest.mark.gpu
def test_spherical_kmeans_on_cuda_matches_cpu() -> None:
    centres, x = _planted()
    gpu = spherical_kmeans(x, k=12, iterations=5, batch_size=256, seed=0, device="cuda")
    cpu = spherical_kmeans(x, k=12, iterations=5, batch_size=256, seed=0)
    assert _worst_angle_deg(gpu.means, centres) < 2.0
    np.testing.assert_allclose(gpu.means, cpu.means, atol=1e-3)


def test_planted_clusters_are_found_whatever_the_norm_of_the_data() -> None:
    # Whitened windows have norms of about sqrt(d), and unequal ones: the update must not care.
    centres, x = _planted(seed=5)
    scales = np.random.default_rng(5).uniform(5.0, 40.0, size=(len(x), 1)).astype(np.float32)
    fit = spherical_kmeans(x * scales, k=len(centres), iterations=5, batch_size=256, seed=0)
    assert _worst_angle_deg(fit.means, centres) < 2.0
    np.testing.assert_allclose(np.linalg.norm(fit.means, axis=1), 1.0, atol=1e-5)
