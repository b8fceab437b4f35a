"""Plain ``nn.Module`` architectures; losses, metrics and optimizers live in the LightningModules.

Inputs are log-mel crops shaped ``(batch, n_mels, n_frames)``: mel bands are the
channels of 1-D convolutions over time, as in both papers.
"""

from __future__ import annotations

import torch
from torch import nn

from core.errors import ParameterError


class SpectrogramConvNet2014(nn.Module):
    """The spectrogram convnet of Dieleman & Schrauwen (ICASSP 2014).

    Two convolutional layers of ``channels`` filters of length ``conv_length``, each
    followed by max pooling over ``pool`` frames, a dense layer of ``hidden`` rectified
    units and one logit per tag.

    Parameters
    ----------
    n_mels : int > 0
        Input channels (mel bands).
    n_frames : int > 0
        Frames per input crop; fixes the size of the flattened feature map.
    n_outputs : int > 0
        Tags to predict.
    pool_ceil : bool
        Keep a partial last pooling window (``ceil_mode``), as Theano's ``ignore_border=False``
        did: 3 s at a hop of 1024 samples (46 frames) then still leaves one step.
    """

    def __init__(
        self,
        *,
        n_mels: int,
        n_frames: int,
        n_outputs: int,
        channels: int = 32,
        conv_length: int = 8,
        pool: int = 4,
        hidden: int = 100,
        pool_ceil: bool = False,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(n_mels, channels, conv_length),
            nn.ReLU(),
            nn.MaxPool1d(pool, ceil_mode=pool_ceil),
            nn.Conv1d(channels, channels, conv_length),
            nn.ReLU(),
            nn.MaxPool1d(pool, ceil_mode=pool_ceil),
            nn.Flatten(),
        )
        try:
            with torch.no_grad():
                flat = self.features(torch.zeros(1, n_mels, n_frames)).shape[1]
        except RuntimeError:  # torch refuses a stage whose output would be empty
            flat = 0
        if flat == 0:
            raise ParameterError(
                f"a crop of {n_frames} frames is too short for two conv({conv_length})+pool({pool}) stages: "
                "train on longer crops (crop_seconds), or with a shorter conv_length or pool"
            )
        self.head = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [shape=(batch, n_mels, n_frames)]`` -> logits ``[shape=(batch, n_outputs)]``."""
        return self.head(self.features(x))


class GlobalTemporalPooling(nn.Module):
    """Mean, max and L2 norm over time, concatenated: ``(B, C, T) -> (B, 3C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=2), x.amax(dim=2), x.pow(2).mean(dim=2).clamp_min(1e-8).sqrt()], dim=1)


class LatentFactorCNN(nn.Module):
    """The latent-factor regression CNN of van den Oord, Dieleman & Schrauwen (NIPS 2013).

    Three 1-D convolutions over time (max pooling 4 and 2 after the first two),
    global temporal pooling (mean, max, L2), a dense layer and a linear output of
    ``n_factors`` values: the predicted WMF item factors of the crop.
    """

    def __init__(
        self,
        *,
        n_mels: int,
        n_factors: int,
        channels: tuple[int, int, int] = (64, 64, 128),
        conv_length: int = 4,
        hidden: int = 256,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv1d(n_mels, c1, conv_length),
            nn.ReLU(),
            nn.MaxPool1d(4),
            nn.Conv1d(c1, c2, conv_length),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(c2, c3, conv_length),
            nn.ReLU(),
            GlobalTemporalPooling(),
        )
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(3 * c3, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_factors)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [shape=(batch, n_mels, n_frames)]`` -> factors ``[shape=(batch, n_factors)]``."""
        return self.head(self.features(x))


FIRST_LAYER_NONLINEARITIES = ("relu", "log1p_square", "log1p_abs")
FEATURE_POOLINGS = ("none", "l2", "max")


class FirstLayerNonlinearity(nn.Module):
    """What follows the strided first convolution of a raw-audio model (Dieleman & Schrauwen 2014).

    ``relu``: ``max(0, x)``; ``log1p_square``: ``log(1 + C x²)`` (a log energy, like a
    log-spectrogram's); ``log1p_abs``: ``log(1 + C |x|)``.
    """

    def __init__(self, kind: str = "relu", *, c: float = 10.0) -> None:
        super().__init__()
        if kind not in FIRST_LAYER_NONLINEARITIES:
            raise ParameterError(f"first-layer nonlinearity {kind!r}: expected one of {FIRST_LAYER_NONLINEARITIES}")
        self.kind, self.c = kind, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return torch.relu(x)
        if self.kind == "log1p_square":
            return torch.log1p(self.c * x.square())
        return torch.log1p(self.c * x.abs())


class FeaturePooling(nn.Module):
    """Pooling across groups of ``size`` consecutive filters (channels), at every time step.

    ``(B, C, T) -> (B, C // size, T)``: ``l2`` is the root of the group's sum of squares,
    ``max`` its largest value. A group of filters that are shifted copies of one another
    then gives a response that does not depend on the phase of the input.
    """

    def __init__(self, kind: str, *, size: int) -> None:
        super().__init__()
        if kind not in ("l2", "max"):
            raise ParameterError(f"feature pooling {kind!r}: choose 'l2' or 'max'")
        if size < 2:
            raise ParameterError(f"feature pooling size {size}: pool groups of 2 or more filters")
        self.kind, self.size = kind, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, steps = x.shape
        if channels % self.size:
            raise ParameterError(
                f"{channels} filters do not split into feature-pooling groups of {self.size}: "
                "choose a pooling size that divides the number of filters"
            )
        groups = x.reshape(batch, channels // self.size, self.size, steps)
        if self.kind == "max":
            return groups.amax(dim=2)
        return groups.square().sum(dim=2).clamp_min(1e-12).sqrt()


class RawAudioConvNet2014(nn.Module):
    """The raw-audio convnet of Dieleman & Schrauwen (ICASSP 2014).

    A strided 1-D convolution over the waveform (``n_filters`` filters of
    ``filter_length`` samples, stride ``stride``) takes the place of the spectrogram;
    a nonlinearity and optional feature pooling follow; then the same stack as
    :class:`SpectrogramConvNet2014`, with the (pooled) filters as its channels.

    Parameters
    ----------
    n_samples : int > 0
        Samples per input crop (3 s at 16 kHz: 48,000).
    n_outputs : int > 0
        Tags to predict.
    filter_length, stride : int > 0
        L and S of the first layer (the paper: 1024/1024 ... 256/256).
    n_filters : int > 0
        First-layer filters (128 in the paper, as many as the spectrogram model's mel bands).
    batch_norm : bool
        Normalize the first layer's output per filter (not in the paper; off by default).
    """

    def __init__(
        self,
        *,
        n_samples: int,
        n_outputs: int,
        filter_length: int = 256,
        stride: int = 256,
        n_filters: int = 128,
        nonlinearity: str = "relu",
        log_c: float = 10.0,
        feature_pooling: str = "none",
        pool_size: int = 2,
        batch_norm: bool = False,
        channels: int = 32,
        conv_length: int = 8,
        pool: int = 4,
        hidden: int = 100,
        pool_ceil: bool = False,
    ) -> None:
        super().__init__()
        if feature_pooling not in FEATURE_POOLINGS:
            raise ParameterError(f"feature pooling {feature_pooling!r}: expected one of {FEATURE_POOLINGS}")
        if n_samples < filter_length:
            raise ParameterError(
                f"a crop of {n_samples} samples is shorter than one filter ({filter_length}): "
                "train on longer crops (crop_seconds) or with a shorter filter"
            )
        self.first = nn.Conv1d(1, n_filters, filter_length, stride=stride, bias=False)
        layers: list[nn.Module] = [FirstLayerNonlinearity(nonlinearity, c=log_c)]
        bands = n_filters
        if feature_pooling != "none":
            layers.append(FeaturePooling(feature_pooling, size=pool_size))
            bands = n_filters // pool_size
        self.front = nn.Sequential(*layers)
        # Optional batch normalization over the learned "bands" (the paper predates it; off by
        # default). On the demo world both learned alike at L = S = 256, 30 epochs: test
        # ROC-AUC 0.887 with it, 0.883 without.
        self.norm = nn.BatchNorm1d(bands) if batch_norm else nn.Identity()
        n_steps = 1 + (n_samples - filter_length) // stride
        self.stack = SpectrogramConvNet2014(
            n_mels=bands,
            n_frames=n_steps,
            n_outputs=n_outputs,
            channels=channels,
            conv_length=conv_length,
            pool=pool,
            hidden=hidden,
            pool_ceil=pool_ceil,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[shape=(batch, n_samples)]`` (or ``(batch, 1, n_samples)``) -> logits ``(batch, n_outputs)``."""
        if x.ndim == 2:
            x = x.unsqueeze(1)
        return self.stack(self.norm(self.front(self.first(x))))

    def first_layer_filters(self) -> torch.Tensor:
        """The learned first-layer filters ``[shape=(n_filters, filter_length)]``."""
        return self.first.weight.detach()[:, 0, :]


class _ResidualBlock2d(nn.Module):
    """3x3 conv, BN, ReLU, 3x3 conv, BN, plus a (projected) shortcut, then ReLU; both convs' first strides ``stride``."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1), nn.BatchNorm2d(out_channels)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ShortChunkResNet(nn.Module):
    """The short-chunk CNN with residual blocks (Won, Ferraro, Bogdanov & Serra, 2020), a modern baseline.

    The published settings: 128 mel bands of a 512-point STFT at hop 256 (16 kHz), crops of
    59,049 samples (about 3.7 s, 231 frames); a batch-normalized input; seven residual
    blocks of 2-D 3x3 convolutions, each halving both axes, with 128, 128, 256, 256, 256,
    256 and 512 channels (``channels`` = 128 scales them); a global max over what is left of
    time and frequency; a dense layer of as many units with batch normalization, ReLU and
    dropout 0.5; one logit per tag.

    Input ``[shape=(batch, n_mels, n_frames)]`` -> logits ``[shape=(batch, n_outputs)]``.
    """

    def __init__(
        self, *, n_mels: int, n_frames: int, n_outputs: int, channels: int = 128, dropout: float = 0.5
    ) -> None:
        super().__init__()
        widths = [channels, channels, 2 * channels, 2 * channels, 2 * channels, 2 * channels, 4 * channels]
        if min(n_mels, n_frames) < 2 ** len(widths) // 2:
            raise ParameterError(
                f"a crop of {n_mels} bands x {n_frames} frames is too small for {len(widths)} "
                f"stride-2 blocks (needs at least {2 ** len(widths) // 2} of each): "
                "use more mel bands (n_mels) or longer crops (crop_seconds)"
            )
        blocks: list[nn.Module] = [nn.BatchNorm2d(1)]
        width = 1
        for out in widths:
            blocks.append(_ResidualBlock2d(width, out, stride=2))
            width = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, n_outputs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature_map = self.features(x.unsqueeze(1))  # (batch, width, bands', frames')
        return self.head(feature_map.amax(dim=(2, 3)))
