"""Feature learning by spherical K-means on spectrogram windows (Dieleman & Schrauwen, ISMIR 2013).

On one timescale (a spectrogram column such as ``mel_4096`` or ``mel_1024_l2``):

1. windows of ``context`` consecutive frames are flattened to vectors of
   ``context * n_mels`` values (frame-major: frame 0's bands, then frame 1's, ...);
2. a PCA whitening is fitted on a sample of them (:func:`fit_whitening`);
3. spherical K-means (:func:`spherical_kmeans`) learns ``k`` unit-norm means of the
   whitened windows;
4. a clip is encoded by the dot products of every whitened window with every mean
   (:func:`encode_windows`). Whitening and dot products are one linear map, so the
   encoding is a 1-D convolution over time with ``k`` filters of ``context`` frames;
5. the encodings are pooled over time (:func:`pool`) into one vector per clip.

A :class:`Codebook` carries the means, the whitening and the settings, and is stored
as ``.npz`` without pickle. The control of the study, a codebook of random unit
vectors under the same whitening (:func:`random_codebook`), has the same shape and
cost and learns nothing.
"""

from __future__ import annotations

import functools
import json
import math
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core import storage
from core.errors import DatasetError, ParameterError

ACTIVATIONS = ("linear", "relu", "threshold")
POOLINGS = ("max", "mean", "max+mean")


# ---------------------------------------------------------------------------- windows


def frame_windows(spectrogram: torch.Tensor | np.ndarray, *, context: int) -> torch.Tensor:
    """Every window of ``context`` consecutive frames, flattened.

    Parameters
    ----------
    spectrogram : array [shape=(n_frames, n_mels)]
    context : int >= 1, frames per window

    Returns
    -------
    torch.Tensor [shape=(n_frames - context + 1, context * n_mels), dtype=float32]
        Row ``t`` is frames ``t .. t+context-1`` laid end to end.
    """
    x = torch.as_tensor(spectrogram).float()
    if x.ndim != 2:
        raise ParameterError(f"spectrogram must be (n_frames, n_mels), got shape {tuple(x.shape)}")
    if context < 1:
        raise ParameterError(f"context={context} must be >= 1 frame")
    if x.shape[0] < context:
        raise ParameterError(f"a clip of {x.shape[0]} frames is shorter than context={context} frames")
    return x.unfold(0, context, 1).transpose(1, 2).reshape(x.shape[0] - context + 1, -1)


def sample_windows(
    spectrograms: Iterable[torch.Tensor | np.ndarray], *, context: int, n_windows: int, seed: int
) -> np.ndarray:
    """A uniform sample of ``n_windows`` windows over a set of clips (all of them when there are fewer).

    Every clip contributes in proportion to its number of windows. Clips shorter
    than ``context`` frames contribute nothing.

    Returns
    -------
    np.ndarray [shape=(min(n_windows, total), context * n_mels), dtype=float32]
    """
    clips = [torch.as_tensor(s) for s in spectrograms]
    counts = np.array([max(0, c.shape[0] - context + 1) for c in clips], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise DatasetError(f"no clip has {context} frames: nothing to sample windows from")
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(total, size=min(n_windows, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    clip_of = np.searchsorted(starts, picked, side="right") - 1
    out = []
    for c in np.unique(clip_of):
        offsets = picked[clip_of == c] - starts[c]
        out.append(frame_windows(clips[c], context=context)[torch.from_numpy(offsets)].numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


# -------------------------------------------------------------------------- whitening


@dataclass(frozen=True)
class Whitening:
    """PCA whitening ``z = (x - mean) @ matrix.T``.

    ``matrix`` holds the principal axes as rows, each scaled by
    ``1 / sqrt(variance + epsilon * mean variance)``.
    """

    mean: np.ndarray  # [shape=(d,), float32]
    matrix: np.ndarray  # [shape=(d, d), float32]

    def apply(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Whiten rows ``[shape=(n, d)]``."""
        x = torch.as_tensor(x).float()
        mean = torch.as_tensor(self.mean, device=x.device)
        matrix = torch.as_tensor(self.matrix, device=x.device)
        return (x - mean) @ matrix.T


def fit_whitening(windows: torch.Tensor | np.ndarray, *, epsilon: float) -> Whitening:
    """PCA whitening fitted on a sample of windows.

    Parameters
    ----------
    windows : array [shape=(n, d)], n > d is advisable
    epsilon : float >= 0
        Regularizer, relative to the mean variance: each principal axis is divided
        by ``sqrt(variance + epsilon * mean(variance))``. With 0 the sample's
        covariance becomes the identity exactly (for full-rank data); larger values
        stop near-silent axes (noise) from being amplified.

    Returns
    -------
    Whitening
    """
    if epsilon < 0:
        raise ParameterError(f"epsilon={epsilon} must be >= 0")
    x = torch.as_tensor(windows).double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ParameterError(f"need at least 2 windows of shape (n, d) to fit a whitening, got {tuple(x.shape)}")
    mean = x.mean(dim=0)
    centred = x - mean
    covariance = centred.T @ centred / (x.shape[0] - 1)
    variance, axes = torch.linalg.eigh(covariance)
    variance = variance.clamp_min(0.0)
    scale = 1.0 / torch.sqrt(variance + epsilon * variance.mean())
    if not torch.isfinite(scale).all():
        raise DatasetError("the windows have zero variance along some axis and epsilon=0: use epsilon > 0")
    return Whitening(mean=mean.float().numpy(), matrix=(axes * scale).T.float().numpy())


# ---------------------------------------------------------------------------- K-means


@dataclass
class KMeansFit:
    means: np.ndarray  # [shape=(k, d), float32], unit norm
    mean_cosine: float  # mean over the data of the cosine to the nearest final mean
    reseeded: int  # empty clusters re-seeded from random samples, over all iterations
    history: list[float] = field(default_factory=list)  # per pass: mean cosine of its assignments as they were made


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def spherical_kmeans(
    data: torch.Tensor | np.ndarray,
    *,
    k: int,
    iterations: int = 10,
    batch_size: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> KMeansFit:
    """Spherical K-means with mini-batch updates.

    Means are unit vectors. A vector is assigned to the mean with the largest dot
    product (one-of-K). Each cluster keeps the running average ``c_j`` of every vector
    ever assigned to it, and its mean is that average renormalized: a mini-batch that
    assigns ``b_j`` vectors to cluster ``j`` (``n_j`` so far, these included) does
    ``c_j <- c_j + (sum of the b_j vectors - b_j * c_j) / n_j`` and ``m_j <- c_j / |c_j|``,
    a per-cluster learning rate of ``1 / n_j`` as in mini-batch K-means, whatever the
    norm of the data. A cluster that receives no vector during a whole pass is
    re-seeded with a random data vector and its count reset. The initial means are chosen k-means++ style
    (each next one far, in cosine, from those already picked) on a sample of the data.

    Parameters
    ----------
    data : array [shape=(n, d)]
        The (whitened) vectors; they are not normalized here.
    k : int >= 2, number of means
    iterations : int >= 1, passes over the data (in a fresh random order each)
    batch_size : int >= 1, vectors per update
    seed : int, decides the initial means and the order of the vectors
    device : the torch device that computes (``cuda`` on a GPU)

    Returns
    -------
    KMeansFit
    """
    x = torch.as_tensor(data).float().to(device)
    if x.ndim != 2:
        raise ParameterError(f"data must be (n, d), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if k < 2:
        raise ParameterError(f"k={k}: K-means needs at least 2 means")
    if n < k:
        raise ParameterError(f"{n} vectors are fewer than k={k} means: sample more windows or lower k")
    if iterations < 1 or batch_size < 1:
        raise ParameterError(f"iterations={iterations} and batch_size={batch_size} must be >= 1")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    means = _spherical_kmeans_plus_plus(x, k=k, generator=generator)
    centres = means.clone()  # running averages of the assigned vectors (replaced by the first batch's average)
    counts = torch.zeros(k, device=device)
    norms = x.norm(dim=1).clamp_min(1e-12)
    reseeded = 0
    history: list[float] = []
    for _ in range(iterations):
        used = torch.zeros(k, dtype=torch.bool, device=device)
        order = torch.randperm(n, generator=generator).to(device)
        cosine_sum = 0.0
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            batch = x[rows]
            best, assigned = (batch @ means.T).max(dim=1)
            cosine_sum += float((best / norms[rows]).sum())
            batch_counts = torch.bincount(assigned, minlength=k).float()
            sums = torch.zeros_like(means).index_add_(0, assigned, batch)
            counts += batch_counts
            hit = batch_counts > 0
            step = (sums[hit] - batch_counts[hit].unsqueeze(1) * centres[hit]) / counts[hit].unsqueeze(1)
            centres[hit] += step
            means[hit] = _unit(centres[hit])
            used |= hit
        empty = torch.nonzero(~used).flatten()
        if empty.numel():
            picks = torch.randint(0, n, (empty.numel(),), generator=generator).to(device)
            centres[empty] = x[picks]
            means[empty] = _unit(x[picks].clone())
            counts[empty] = 0.0
            reseeded += int(empty.numel())
        # The pass's own assignments (each against the means of its moment): free, and exact enough to follow.
        history.append(cosine_sum / n)
    final = _mean_cosine(x, means, batch_size=max(batch_size, 4096))
    return KMeansFit(means=means.cpu().numpy(), mean_cosine=final, reseeded=reseeded, history=history)


def _spherical_kmeans_plus_plus(x: torch.Tensor, *, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding with the cosine distance ``1 - cos``, on at most ``max(4096, 8k)`` vectors.

    Each next mean is the best (lowest total squared distance afterwards) of
    ``2 + ln k`` candidates drawn with probability proportional to the squared
    distance to the nearest mean so far. Seeding by distance avoids the local
    optimum where two means share a cluster while one straddles two, which random
    seeding falls into often and mini-batch updates never leave.
    """
    sample_size = min(x.shape[0], max(4096, 8 * k))
    sample = _unit(x[torch.randperm(x.shape[0], generator=generator)[:sample_size].to(x.device)])
    n_candidates = 2 + int(math.log(k))
    picks = [int(torch.randint(0, sample_size, (1,), generator=generator))]
    distance = (1.0 - sample @ sample[picks[0]]).clamp_min(0.0) ** 2
    for _ in range(1, k):
        weights = distance.double().cpu()
        if float(weights.sum()) <= 0.0:  # fewer distinct directions than k: any vector will do
            weights = torch.ones_like(weights)
        candidates = torch.multinomial(weights, n_candidates, replacement=True, generator=generator).to(x.device)
        after = torch.minimum(distance.unsqueeze(0), (1.0 - sample[candidates] @ sample.T).clamp_min(0.0) ** 2)
        best = int(after.sum(dim=1).argmin())
        picks.append(int(candidates[best]))
        distance = after[best]
    return sample[torch.tensor(picks, device=x.device)].clone()


def _mean_cosine(x: torch.Tensor, means: torch.Tensor, *, batch_size: int) -> float:
    """Mean over the vectors of the cosine to their nearest (largest dot product) mean."""
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        batch = x[start : start + batch_size]
        best = (batch @ means.T).max(dim=1).values
        total += float((best / batch.norm(dim=1).clamp_min(1e-12)).sum())
    return total / x.shape[0]


# --------------------------------------------------------------------------- codebook


@dataclass(frozen=True)
class Codebook:
    """What encodes one timescale: means, whitening and the settings they were made with.

    ``kind`` is ``kmeans`` (learned) or ``random`` (the control: random unit vectors).
    ``info`` holds provenance (column, sample size, fit quality) as JSON-able values.
    """

    means: np.ndarray  # [shape=(k, context * n_mels), float32], unit rows
    whitening: Whitening
    context: int
    n_mels: int
    kind: str
    info: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.means.shape[0])

    def linear_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight [shape=(d, k)], bias [shape=(k,)])`` with ``encoding = window @ weight - bias``."""
        return self._linear_map

    @functools.cached_property
    def _linear_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed once per codebook: the (d, d) x (d, k) product costs as much as encoding a whole clip.
        weight = torch.from_numpy(self.whitening.matrix.T @ self.means.T)
        return weight, torch.from_numpy(self.whitening.mean) @ weight

    def save(self, path: Path) -> Path:
        """Write ``path`` (``.npz``): arrays and a JSON header, readable with ``allow_pickle=False``."""
        header = json.dumps(
            {
                "context": self.context,
                "n_mels": self.n_mels,
                "kind": self.kind,
                "info": self.info,
                "format": "mirflow-codebook-1",
            }
        )
        return storage.write_npz(
            path,
            {
                "means": self.means,
                "whitening_mean": self.whitening.mean,
                "whitening_matrix": self.whitening.matrix,
                "header": np.array(header),
            },
        )

    @classmethod
    def load(cls, path: Path) -> Codebook:
        """Read a codebook written by :meth:`save` (never unpickles)."""
        try:
            npz = storage.read_npz(path)
            header = json.loads(str(npz["header"]))
            means, mean, matrix = npz["means"], npz["whitening_mean"], npz["whitening_matrix"]
            if not isinstance(header, dict) or header.get("format") != "mirflow-codebook-1":
                found = header.get("format") if isinstance(header, dict) else None
                raise DatasetError(
                    f"{path}: its header names the format {found!r}, not 'mirflow-codebook-1'; "
                    "give a codebook written by Codebook.save (the K-means feature flow writes them)"
                )
            return cls(
                means=means.astype(np.float32),
                whitening=Whitening(mean=mean, matrix=matrix),
                context=int(header["context"]),
                n_mels=int(header["n_mels"]),
                kind=str(header["kind"]),
                info=header.get("info", {}),
            )
        except DatasetError:
            raise
        except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as err:
            raise DatasetError(
                f"{path} is not a mirflow codebook ({type(err).__name__}: {err}); "
                "give a codebook written by Codebook.save (the K-means feature flow writes them)"
            ) from err

    def unwhitened_means(self) -> np.ndarray:
        """Each mean mapped back through the inverse whitening: the window shape it stands for.

        Returns
        -------
        np.ndarray [shape=(k, n_mels, context)], band by frame, for plotting.
        """
        windows = self.means @ np.linalg.pinv(self.whitening.matrix).T
        return windows.reshape(self.k, self.context, self.n_mels).transpose(0, 2, 1)


def random_codebook(
    whitening: Whitening, *, k: int, context: int, n_mels: int, seed: int, info: dict | None = None
) -> Codebook:
    """The control: ``k`` random unit vectors (isotropic Gaussian, normalized) under the same whitening."""
    d = context * n_mels
    if k < 2:
        raise ParameterError(f"k={k}: a codebook needs at least 2 means")
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d)).astype(np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    return Codebook(means=means, whitening=whitening, context=context, n_mels=n_mels, kind="random", info=info or {})


def fit_codebook(
    windows: np.ndarray,
    *,
    k: int,
    context: int,
    n_mels: int,
    epsilon: float,
    iterations: int,
    batch_size: int,
    seed: int,
    kind: str = "kmeans",
    device: str = "cpu",
    info: dict | None = None,
) -> Codebook:
    """Whitening and means from a sample of windows ``[shape=(n, context * n_mels)]``.

    ``kind="random"`` fits only the whitening and draws random unit means (the control).
    """
    if windows.shape[1] != context * n_mels:
        raise ParameterError(f"windows of {windows.shape[1]} values do not match context={context} x {n_mels} bands")
    whitening = fit_whitening(windows, epsilon=epsilon)
    info = {**(info or {}), "sample_windows": int(windows.shape[0])}
    if kind == "random":
        return random_codebook(whitening, k=k, context=context, n_mels=n_mels, seed=seed, info=info)
    if kind != "kmeans":
        raise ParameterError(f"codebook kind {kind!r}: expected 'kmeans' or 'random'")
    fit = spherical_kmeans(
        whitening.apply(windows), k=k, iterations=iterations, batch_size=batch_size, seed=seed, device=device
    )
    info.update({"mean_cosine": round(fit.mean_cosine, 6), "reseeded": fit.reseeded})
    return Codebook(means=fit.means, whitening=whitening, context=context, n_mels=n_mels, kind="kmeans", info=info)


# --------------------------------------------------------------------------- encoding


def encode_windows(
    spectrogram: torch.Tensor | np.ndarray,
    codebook: Codebook,
    *,
    activation: str = "linear",
    threshold: float = 0.0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The encoding of every window of a clip: a convolution over time with ``k`` filters.

    Parameters
    ----------
    spectrogram : array [shape=(n_frames, n_mels)]
    codebook : Codebook
    activation : ``linear`` (the dot products as they are), ``relu`` (``max(0, f)``) or
        ``threshold`` (``max(0, f - threshold)``, Coates & Ng's soft threshold)
    threshold : float, for ``threshold``
    device : where the convolution runs (``cuda`` on a GPU); the result stays there

    Returns
    -------
    torch.Tensor [shape=(n_frames - context + 1, k), dtype=float32]
        Row ``t``: the dot products of the whitened window starting at frame ``t`` with every mean.
    """
    x = torch.as_tensor(spectrogram).to(device).float()
    if x.ndim != 2 or x.shape[1] != codebook.n_mels:
        raise ParameterError(
            f"spectrogram of shape {tuple(x.shape)} does not match the codebook's {codebook.n_mels} bands"
        )
    if x.shape[0] < codebook.context:
        raise ParameterError(
            f"a clip of {x.shape[0]} frames is shorter than the codebook's context ({codebook.context} frames)"
        )
    weight, bias = (t.to(device) for t in codebook.linear_map())
    # (d, k) -> conv1d filters (k, n_mels, context): value [j, band, frame] = weight[frame * n_mels + band, j]
    filters = weight.T.reshape(codebook.k, codebook.context, codebook.n_mels).transpose(1, 2).contiguous()
    encoded = torch.nn.functional.conv1d(x.T.unsqueeze(0), filters)[0].T - bias
    if activation == "linear":
        return encoded
    if activation == "relu":
        return encoded.clamp_min(0.0)
    if activation == "threshold":
        return (encoded - threshold).clamp_min(0.0)
    raise ParameterError(f"activation {activation!r}: expected one of {ACTIVATIONS}")


def pool(encoded: torch.Tensor, *, pooling: str) -> torch.Tensor:
    """Pool ``[shape=(n_windows, k)]`` over time: ``(k,)`` for max or mean, ``(2k,)`` for max+mean (max first)."""
    if pooling == "max":
        return encoded.max(dim=0).values
    if pooling == "mean":
        return encoded.mean(dim=0)
    if pooling == "max+mean":
        return torch.cat([encoded.max(dim=0).values, encoded.mean(dim=0)])
    raise ParameterError(f"pooling {pooling!r}: expected one of {POOLINGS}")


def pooled_size(k: int, pooling: str) -> int:
    if pooling not in POOLINGS:
        raise ParameterError(f"pooling {pooling!r}: expected one of {POOLINGS}")
    return 2 * k if pooling == "max+mean" else k


def encode_clip(
    spectrogram: torch.Tensor | np.ndarray,
    codebook: Codebook,
    *,
    activation: str,
    threshold: float,
    pooling: str,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """One clip, one timescale -> its pooled feature vector ``[shape=(pooled_size,), float32]``."""
    encoded = encode_windows(spectrogram, codebook, activation=activation, threshold=threshold, device=device)
    return pool(encoded, pooling=pooling).cpu().numpy()
