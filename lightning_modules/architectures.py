"""Plain ``nn.Module`` architectures; losses, metrics and optimizers live in the LightningModules.

Inputs are log-mel crops shaped ``(batch, n_mels, n_frames)``: mel bands are the
channels of 1-D convolutions over time, as in both papers.
"""

from __future__ import annotations

import torch
from torch import nn


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
    """

    def __init__(self, *, n_mels: int, n_frames: int, n_outputs: int, channels: int = 32,
                 conv_length: int = 8, pool: int = 4, hidden: int = 100) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(n_mels, channels, conv_length), nn.ReLU(), nn.MaxPool1d(pool),
            nn.Conv1d(channels, channels, conv_length), nn.ReLU(), nn.MaxPool1d(pool),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, n_mels, n_frames)).shape[1]
        if flat == 0:
            raise ValueError(f"a crop of {n_frames} frames is too short for two conv({conv_length})+pool({pool}) stages")
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

    def __init__(self, *, n_mels: int, n_factors: int, channels: tuple[int, int, int] = (64, 64, 128),
                 conv_length: int = 4, hidden: int = 256, dropout: float = 0.3) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv1d(n_mels, c1, conv_length), nn.ReLU(), nn.MaxPool1d(4),
            nn.Conv1d(c1, c2, conv_length), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(c2, c3, conv_length), nn.ReLU(),
            GlobalTemporalPooling(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(3 * c3, hidden), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, n_factors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [shape=(batch, n_mels, n_frames)]`` -> factors ``[shape=(batch, n_factors)]``."""
        return self.head(self.features(x))
