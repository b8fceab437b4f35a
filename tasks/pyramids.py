"""Gaussian and Laplacian pyramids in time of a spectrogram (Burt & Adelson 1983).

DESIGN.md §3 I (Dieleman & Schrauwen, ISMIR 2013): the finest log-mel spectrogram
is repeatedly smoothed and subsampled 2x in time (the Gaussian pyramid); the
differences of consecutive Gaussian levels form the Laplacian pyramid, which sums
back to the original exactly.

Both operations act on the time axis only and use Burt & Adelson's 5-tap binomial
kernel ``[1, 4, 6, 4, 1] / 16``:

* REDUCE (:func:`gaussian_reduce`): reflect-pad 2 frames at each end, blur, keep
  frames 0, 2, 4, ... so ``n`` frames become ``ceil(n / 2)``.
* EXPAND (:func:`gaussian_expand`): zero insertion (coarse frame ``j`` goes to fine
  frame ``2j``) to the target length, reflect-pad, blur with the kernel times 2
  (the zeros halve the mass). Interior fine frames are ``(g[j-1] + 6 g[j] + g[j+1]) / 8``
  (even) and ``(g[j] + g[j+1]) / 2`` (odd).

Reflect padding (``x[2], x[1] | x[0], x[1], ...``, as ``torch.nn.functional.pad``
``mode="reflect"``) keeps a constant signal constant through both, at the edges
too, and needs at least 3 frames; hence the rule that the top level of a pyramid
has at least 2 frames.

Pure torch: the input may live on any device and have any leading (batch) dims;
the layout is TIME-MAJOR, ``(..., n_frames, n_mels)``, as :func:`tasks.spectrogram.log_mel`
returns it. Outputs keep the input's dtype and device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from core.errors import ParameterError

#: Burt & Adelson's binomial generating kernel (their ``a = 0.375``).
KERNEL = (1.0 / 16, 4.0 / 16, 6.0 / 16, 4.0 / 16, 1.0 / 16)
_PAD = len(KERNEL) // 2


def pyramid_frames(n_frames: int, *, levels: int) -> list[int]:
    """Frames of each Gaussian level: ``n_0 = n_frames``, ``n_k = ceil(n_{k-1} / 2)``."""
    frames = [n_frames]
    for _ in range(levels - 1):
        frames.append(math.ceil(frames[-1] / 2))
    return frames


def min_frames(*, levels: int) -> int:
    """Fewest input frames a pyramid of ``levels`` levels accepts.

    One level is the input itself (>= 1 frame). Above that every level but the top
    is smoothed, and reflect padding needs >= 3 frames, i.e. the top level has >= 2:
    ``ceil(n / 2**(levels-1)) >= 2``, so ``n >= 2**(levels-1) + 1``.
    """
    return 1 if levels == 1 else 2 ** (levels - 1) + 1


def gaussian_reduce(mel: torch.Tensor) -> torch.Tensor:
    """One REDUCE step: binomial blur in time, then every second frame.

    Parameters
    ----------
    mel : torch.Tensor [shape=(..., n_frames, n_mels), floating, n_frames >= 3]

    Returns
    -------
    torch.Tensor [shape=(..., ceil(n_frames / 2), n_mels)], same dtype and device
    """
    _check_spectrogram(mel)
    _check_reflectable(mel.shape[-2])
    padded = _reflect_pad(mel)
    n_out = math.ceil(mel.shape[-2] / 2)
    # Output frame j is the blur centred on input frame 2j: padded frames 2j .. 2j+4.
    return _blur(padded, n_out, stride=2, gain=1.0)


def gaussian_expand(coarse: torch.Tensor, *, n_frames: int) -> torch.Tensor:
    """One EXPAND step: zero insertion to ``n_frames``, then the kernel times 2.

    Parameters
    ----------
    coarse : torch.Tensor [shape=(..., m, n_mels), floating]
        A Gaussian level of ``m = ceil(n_frames / 2)`` frames.
    n_frames : int >= 3
        Length of the finer level to expand to (``2m - 1`` or ``2m``).

    Returns
    -------
    torch.Tensor [shape=(..., n_frames, n_mels)], same dtype and device
    """
    _check_spectrogram(coarse)
    if coarse.shape[-2] != math.ceil(n_frames / 2):
        raise ParameterError(
            f"cannot expand {coarse.shape[-2]} frames to n_frames={n_frames}; "
            f"need ceil(n_frames / 2) = {math.ceil(n_frames / 2)} coarse frames"
        )
    _check_reflectable(n_frames)
    upsampled = coarse.new_zeros((*coarse.shape[:-2], n_frames, coarse.shape[-1]))
    upsampled[..., 0::2, :] = coarse
    return _blur(_reflect_pad(upsampled), n_frames, stride=1, gain=2.0)


def gaussian_pyramid(mel: torch.Tensor, *, levels: int) -> list[torch.Tensor]:
    """Gaussian pyramid in time (Burt & Adelson 1983).

    Parameters
    ----------
    mel : torch.Tensor [shape=(..., n_frames, n_mels), floating]
        Time-major spectrogram; leading dims are a batch.
    levels : int >= 1
        Levels, the input included.

    Returns
    -------
    list of torch.Tensor, ``levels`` long
        ``[0]`` is ``mel`` itself (not a copy); level ``k`` has shape
        ``(..., ceil(n_{k-1} / 2), n_mels)`` and is :func:`gaussian_reduce` of level ``k-1``.

    Raises
    ------
    ParameterError
        ``levels < 1``, ``mel`` is not a floating tensor of at least 2 dims, or it
        has fewer than :func:`min_frames` frames (the top level needs >= 2 frames).
    """
    _check_levels(mel, levels)
    pyramid = [mel]
    for _ in range(levels - 1):
        pyramid.append(gaussian_reduce(pyramid[-1]))
    return pyramid


def laplacian_from_gaussian(gaussian: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Band-pass levels ``L_k = G_k - expand(G_{k+1})``, and ``L_top = G_top``."""
    if len(gaussian) < 1:
        raise ParameterError("need at least one Gaussian level, got an empty pyramid")
    laplacian = [
        fine - gaussian_expand(coarse, n_frames=fine.shape[-2]) for fine, coarse in zip(gaussian[:-1], gaussian[1:])
    ]
    laplacian.append(gaussian[-1])
    return laplacian


def laplacian_pyramid(mel: torch.Tensor, *, levels: int) -> list[torch.Tensor]:
    """Laplacian pyramid in time (Burt & Adelson 1983).

    Parameters
    ----------
    mel : torch.Tensor [shape=(..., n_frames, n_mels), floating]
    levels : int >= 1

    Returns
    -------
    list of torch.Tensor, ``levels`` long
        ``L_k = G_k - gaussian_expand(G_{k+1})`` with the shape of ``G_k`` for
        ``k < levels - 1``; the last level is the top Gaussian level itself.
        :func:`reconstruct_from_laplacian` inverts it.

    Raises
    ------
    ParameterError
        As :func:`gaussian_pyramid`.
    """
    return laplacian_from_gaussian(gaussian_pyramid(mel, levels=levels))


def reconstruct_from_laplacian(pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum a Laplacian pyramid back to its base: ``G_k = L_k + expand(G_{k+1})``.

    Parameters
    ----------
    pyramid : sequence of torch.Tensor
        As :func:`laplacian_pyramid` returns it, finest first.

    Returns
    -------
    torch.Tensor [shape of ``pyramid[0]``]
        The original spectrogram, up to float rounding.
    """
    if len(pyramid) < 1:
        raise ParameterError("need at least one Laplacian level, got an empty pyramid")
    level = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        level = band + gaussian_expand(level, n_frames=band.shape[-2])
    return level


def _blur(padded: torch.Tensor, n_out: int, *, stride: int, gain: float) -> torch.Tensor:
    """``out[j] = gain * sum_t KERNEL[t] * padded[stride*j + t]`` along dim -2.

    Shifted strided slices rather than conv1d: no reshaping of the batch dims, no
    channel transposes, any device, and only the kept frames are computed.
    """
    span = stride * (n_out - 1) + 1
    taps = [padded[..., t : t + span : stride, :] for t in range(len(KERNEL))]
    # Symmetric kernel: add mirrored taps first (fewer multiplies, same result).
    outer = (taps[0] + taps[4]) * (gain * KERNEL[0])
    inner = (taps[1] + taps[3]) * (gain * KERNEL[1])
    return outer.add_(inner).add_(taps[2], alpha=gain * KERNEL[2])


def _reflect_pad(x: torch.Tensor) -> torch.Tensor:
    """Reflect-pad 2 frames at each end of dim -2 (edge frame not repeated)."""
    n, device = x.shape[-2], x.device
    index = torch.cat(
        [
            torch.arange(_PAD, 0, -1, device=device),
            torch.arange(n, device=device),
            torch.arange(n - 2, n - 2 - _PAD, -1, device=device),
        ]
    )
    return x.index_select(-2, index)


def _check_spectrogram(mel: torch.Tensor) -> None:
    if not isinstance(mel, torch.Tensor):
        raise ParameterError(f"spectrogram must be a torch.Tensor, got {type(mel).__name__}")
    if mel.ndim < 2:
        raise ParameterError(f"spectrogram must have shape (..., n_frames, n_mels), got shape {tuple(mel.shape)}")
    if not mel.is_floating_point():
        raise ParameterError(f"spectrogram must be a floating tensor, got dtype {mel.dtype}")


def _check_reflectable(n_frames: int) -> None:
    if n_frames < _PAD + 1:
        raise ParameterError(
            f"a level of {n_frames} frames is too short to smooth; reflect padding needs >= {_PAD + 1}"
        )


def _check_levels(mel: torch.Tensor, levels: int) -> None:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ParameterError(f"levels must be an int >= 1, got {levels!r}")
    _check_spectrogram(mel)
    n = mel.shape[-2]
    if n < min_frames(levels=levels):
        raise ParameterError(
            f"a spectrogram of {n} frames is too short for levels={levels}: the top level "
            f"would have {pyramid_frames(n, levels=levels)[-1]} frame(s), needs >= 2; "
            f"use >= {min_frames(levels=levels)} frames (a longer clip) or fewer levels"
        )
