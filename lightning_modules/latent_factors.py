"""Content-based recommendation: regress WMF item factors from audio."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn

from core.errors import ParameterError
from lightning_modules.architectures import LatentFactorCNN
from lightning_modules.datamodule import clip_means, standardize, stat_buffer
from lightning_modules.objectives import PlayColumns, wpe_loss


class LatentFactorModule(L.LightningModule):
    """Trains a :class:`LatentFactorCNN` to predict the WMF item factors of a track from its audio.

    ``objective``: ``mse`` on the factors, or ``wpe``, the weighted prediction error
    (:func:`~lightning_modules.objectives.wpe_loss`): the WMF objective of the track's
    play column with its factors replaced by the prediction, the user factors fixed.
    WPE needs :meth:`use_plays` before training. Validation and test report the MSE on
    the factors either way.

    Targets are divided by one global ``target_scale`` (the factors' standard
    deviation) so that the loss is O(1) whatever the factorization's scale; the
    geometry of the factor space, and so every ranking, is unchanged. Predictions
    are returned in the original scale, one per clip (the mean over its windows).
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
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        target_scale: float = 1.0,
        feature_mean: list[float] | None = None,
        feature_std: list[float] | None = None,
        objective: str = "mse",
    ) -> None:
        super().__init__()
        if objective not in ("mse", "wpe"):
            raise ParameterError(f"objective {objective!r}: choose 'mse' or 'wpe'")
        self.save_hyperparameters(logger=False)
        self.net = LatentFactorCNN(
            n_mels=n_mels,
            n_factors=n_factors,
            channels=tuple(channels),
            conv_length=conv_length,
            hidden=hidden,
            dropout=dropout,
        )
        self.register_buffer("feature_mean", stat_buffer(feature_mean, n_mels, 0.0))
        self.register_buffer("feature_std", stat_buffer(feature_std, n_mels, 1.0))
        self.loss = nn.MSELoss()
        self._errors: list[torch.Tensor] = []  # per-clip squared errors of an evaluation epoch
        self._positions: list[torch.Tensor] = []
        # WPE only, set by use_plays; not in checkpoints (they can be as large as the user base).
        self._plays: PlayColumns | None = None
        self._user_factors: torch.Tensor | None = None
        self._gram: torch.Tensor | None = None

    def use_plays(self, user_factors: np.ndarray, confidence) -> None:
        """What WPE training needs: the fixed user factors ``(n_users, f)`` and the confidence of every play of
        the training tracks, ``sp.csr_matrix (n_users, n_train)`` with columns in train-split order."""
        if confidence.shape != (user_factors.shape[0], confidence.shape[1]):
            raise ParameterError(
                f"a confidence matrix of shape {confidence.shape} for {user_factors.shape[0]} users' factors: "
                "give one row per user of the factorization (the same users, in the same order)"
            )
        self._plays = PlayColumns(confidence)
        self._user_factors = torch.from_numpy(
            np.array(user_factors, dtype=np.float32)
        )  # a copy: parquet arrays are read-only
        self._gram = self._user_factors.T @ self._user_factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw log-mel crops ``[shape=(batch, n_mels, n_frames)]`` -> scaled factors ``[shape=(batch, n_factors)]``."""
        return self.net(standardize(x, self.feature_mean, self.feature_std))

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        predicted = self(x)
        if self.hparams.objective == "mse":
            loss = self.loss(predicted, y / self.hparams.target_scale)
            self.log("train/mse", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x), sync_dist=True)
            return loss
        if self._plays is None:
            raise ParameterError(
                "objective 'wpe' trains on plays: call use_plays(user_factors, confidence) before training"
            )
        if self._user_factors.device != predicted.device:
            self._user_factors, self._gram = self._user_factors.to(predicted.device), self._gram.to(predicted.device)
        position, users, confidence = (t.to(predicted.device) for t in self._plays.batch(batch[2]))
        per_track = wpe_loss(
            predicted.float() * self.hparams.target_scale, self._user_factors, self._gram, position, users, confidence
        )
        loss = per_track.mean() / self._plays.n_users  # per user and track: O(1) whatever the user base
        self.log("train/wpe", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x), sync_dist=True)
        return loss

    def _clip_predictions(self, windows: torch.Tensor, clip_index: torch.Tensor, n_clips: int) -> torch.Tensor:
        return clip_means(self(windows).float(), clip_index, n_clips)

    def _eval_step(self, batch, split: str) -> None:
        windows, clip_index, y, positions = batch
        predictions = self._clip_predictions(windows, clip_index, len(y))
        self._errors.append((predictions - y / self.hparams.target_scale).pow(2).mean(dim=1).detach())
        self._positions.append(positions.detach().long())

    def _epoch_mse(self, split: str) -> None:
        """Mean over clips of each clip's squared error, every clip once whatever the number of ranks."""
        errors, positions = torch.cat(self._errors), torch.cat(self._positions)
        self._errors.clear()
        self._positions.clear()
        if self.trainer is not None and self.trainer.world_size > 1:
            errors, positions = (self.all_gather(t).flatten(0, 1) for t in (errors, positions))
        _, first = np.unique(positions.cpu().numpy(), return_index=True)
        # Every rank computed the same value from the same gathered clips: no reduction needed.
        self.log(
            f"{split}/mse", float(errors.cpu().numpy()[first].mean()), prog_bar=split == "val", rank_zero_only=False
        )

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._epoch_mse("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_mse("test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        windows, clip_index, y, _ = batch
        return self._clip_predictions(windows, clip_index, len(y)) * self.hparams.target_scale

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
