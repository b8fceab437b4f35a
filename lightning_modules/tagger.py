"""The auto-tagger: multi-label tag prediction from log-mel crops."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn

from core.errors import ParameterError
from lightning_modules.architectures import (
    RawAudioConvNet2014,
    ShortChunkResNet,
    SpectrogramConvNet2014,
)
from lightning_modules.audio_datamodule import PCM_SCALE
from lightning_modules.datamodule import clip_means, standardize, stat_buffer
from tasks.metrics import tag_metrics


class TagPredictionModule(L.LightningModule):
    """What every tagger shares: per-clip scores collected in evaluation, and their metrics.

    Subclasses pass ``(clip probabilities, clip labels, clip positions)`` to :meth:`_collect`
    in their evaluation steps; each epoch end logs ``<split>/roc_auc``, ``<split>/pr_auc``
    (macro over tags) and ``<split>/pr_auc_chance``, and the test epoch keeps the
    per-tag table. Training is binary cross-entropy on logits (``self.loss``) over
    ``(inputs, targets)`` batches. The hyperparameters must hold ``tags``,
    ``learning_rate`` and ``weight_decay``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._scores: list[torch.Tensor] = []
        self._truth: list[torch.Tensor] = []
        self._positions: list[torch.Tensor] = []
        self.test_scores: np.ndarray | None = None
        self.test_truth: np.ndarray | None = None
        self.test_table = None

    def _collect(self, scores: torch.Tensor, truth: torch.Tensor, positions: torch.Tensor) -> None:
        self._scores.append(scores.detach().float())
        self._truth.append(truth.detach().float())
        self._positions.append(positions.detach().long())

    def _gathered(self) -> tuple[np.ndarray, np.ndarray]:
        """Every clip's scores and labels once, in split order, whatever the number of ranks.

        Under DDP each rank saw a share of the clips (padded with repeats to equal
        shares); they are gathered, de-duplicated by clip position and sorted, so the
        metrics equal those of one device.
        """
        scores, truth, positions = torch.cat(self._scores), torch.cat(self._truth), torch.cat(self._positions)
        self._scores.clear()
        self._truth.clear()
        self._positions.clear()
        if self.trainer is not None and self.trainer.world_size > 1:
            scores, truth, positions = (self.all_gather(t).flatten(0, 1) for t in (scores, truth, positions))
        positions = positions.cpu().numpy()
        _, first = np.unique(positions, return_index=True)  # sorted positions, each once
        return scores.cpu().numpy()[first], truth.cpu().numpy()[first]

    def _epoch_metrics(self, split: str) -> None:
        scores, truth = self._gathered()
        summary, table = tag_metrics(truth, scores, tags=self.hparams.tags)
        # Every rank computed the same numbers from the same gathered clips: no reduction needed.
        self.log(f"{split}/roc_auc", summary["roc_auc_macro"], prog_bar=True, rank_zero_only=False)
        self.log(f"{split}/pr_auc", summary["pr_auc_macro"], prog_bar=split == "val")
        self.log(f"{split}/pr_auc_chance", summary["pr_auc_chance"])
        if split == "test":
            self.test_scores, self.test_truth, self.test_table = scores, truth, table

    def on_validation_epoch_end(self) -> None:
        self._epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_metrics("test")

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]  # crops may come with their clips' positions: not needed here
        loss = self.loss(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x), sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )


class WindowedTagger(TagPredictionModule):
    """Trains on crops; evaluates every window of a clip and averages their sigmoid outputs per clip.

    Subclasses set ``self.net``-based :meth:`forward` and ``self.loss``.
    """

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], split: str) -> None:
        windows, clip_index, y, positions = batch
        logits = self(windows)
        loss = self.loss(logits, y[clip_index])
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        self._collect(clip_means(torch.sigmoid(logits.float()), clip_index, len(y)), y, positions)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")


class TaggerModule(WindowedTagger):
    """Trains a spectrogram tagger with binary cross-entropy on logits.

    ``architecture``: ``convnet2014`` (:class:`SpectrogramConvNet2014`, the default) or
    ``short-chunk-resnet`` (:class:`ShortChunkResNet`, the modern baseline).

    Validation and test average the sigmoid outputs of all windows of a clip and
    report per-tag ROC-AUC and PR-AUC, macro-averaged (``val/roc_auc``, ``test/pr_auc``).
    """

    def __init__(
        self,
        *,
        n_mels: int,
        crop_frames: int,
        tags: list[str],
        channels: int = 32,
        conv_length: int = 8,
        pool: int = 4,
        hidden: int = 100,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        feature_mean: list[float] | None = None,
        feature_std: list[float] | None = None,
        architecture: str = "convnet2014",
        resnet_channels: int = 128,
        pool_ceil: bool = False,
    ) -> None:
        super().__init__()
        # The normalization statistics are buffers and hparams: a checkpoint needs nothing else at inference.
        self.save_hyperparameters(logger=False)
        if architecture == "convnet2014":
            self.net = SpectrogramConvNet2014(
                n_mels=n_mels,
                n_frames=crop_frames,
                n_outputs=len(tags),
                channels=channels,
                conv_length=conv_length,
                pool=pool,
                hidden=hidden,
                pool_ceil=pool_ceil,
            )
        elif architecture == "short-chunk-resnet":
            self.net = ShortChunkResNet(
                n_mels=n_mels, n_frames=crop_frames, n_outputs=len(tags), channels=resnet_channels
            )
        else:
            raise ParameterError(f"architecture {architecture!r}: choose 'convnet2014' or 'short-chunk-resnet'")
        self.register_buffer("feature_mean", stat_buffer(feature_mean, n_mels, 0.0))
        self.register_buffer("feature_std", stat_buffer(feature_std, n_mels, 1.0))
        self.loss = nn.BCEWithLogitsLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw log-mel crops ``[shape=(batch, n_mels, n_frames)]`` -> logits ``[shape=(batch, n_tags)]``."""
        return self.net(standardize(x, self.feature_mean, self.feature_std))


class RawAudioTaggerModule(WindowedTagger):
    """Trains a :class:`RawAudioConvNet2014` on int16-valued waveform crops (scaled to [-1, 1) here)."""

    def __init__(
        self,
        *,
        crop_samples: int,
        tags: list[str],
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
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = RawAudioConvNet2014(
            n_samples=crop_samples,
            n_outputs=len(tags),
            filter_length=filter_length,
            stride=stride,
            n_filters=n_filters,
            nonlinearity=nonlinearity,
            log_c=log_c,
            feature_pooling=feature_pooling,
            pool_size=pool_size,
            batch_norm=batch_norm,
            channels=channels,
            conv_length=conv_length,
            pool=pool,
            hidden=hidden,
            pool_ceil=pool_ceil,
        )
        self.loss = nn.BCEWithLogitsLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Crops of int16 PCM values ``[shape=(batch, 1, n_samples)]`` -> logits ``[shape=(batch, n_tags)]``."""
        return self.net(x.float() * PCM_SCALE)
