"""The MLP tagger on pooled K-means features (Dieleman & Schrauwen, ISMIR 2013).

:class:`MLP` is the architecture (plain ``nn.Module``); :class:`MLPTaggerModule` owns
the input standardization, the loss (BCE on logits) and the tag metrics it shares
with the convnet tagger.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from lightning_modules.datamodule import stat_buffer
from lightning_modules.tagger import TagPredictionModule


class MLP(nn.Module):
    """``layers`` rectified-linear hidden layers of ``hidden`` units with dropout, then a linear output.

    Input ``[shape=(batch, n_inputs)]`` -> logits ``[shape=(batch, n_outputs)]``.
    """

    def __init__(
        self, *, n_inputs: int, n_outputs: int, hidden: int = 1000, layers: int = 1, dropout: float = 0.5
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = n_inputs
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.hidden = nn.Sequential(*blocks)
        self.output = nn.Linear(width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(x))


class MLPTaggerModule(TagPredictionModule):
    """Multi-label tagging from one feature vector per clip; reports per-tag and macro ROC-AUC / PR-AUC."""

    def __init__(
        self,
        *,
        n_inputs: int,
        tags: list[str],
        hidden: int = 1000,
        layers: int = 1,
        dropout: float = 0.5,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        feature_mean: list[float] | None = None,
        feature_std: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = MLP(n_inputs=n_inputs, n_outputs=len(tags), hidden=hidden, layers=layers, dropout=dropout)
        self.register_buffer("feature_mean", stat_buffer(feature_mean, n_inputs, 0.0))
        self.register_buffer("feature_std", stat_buffer(feature_std, n_inputs, 1.0))
        self.loss = nn.BCEWithLogitsLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pooled features ``[shape=(batch, n_inputs)]`` -> logits ``[shape=(batch, n_tags)]``."""
        return self.net((x.float() - self.feature_mean) / self.feature_std)

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], split: str) -> None:
        x, y, positions = batch
        logits = self(x)
        self.log(f"{split}/loss", self.loss(logits, y), on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        self._collect(torch.sigmoid(logits.float()), y, positions)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self(batch[0]))


class FactorRegressorModule(L.LightningModule):
    """Regress a vector per clip (WMF item factors, tag factors) from one feature vector: MSE.

    ``layers=0`` is linear regression; otherwise an :class:`MLP`. Inputs are standardized
    with the training statistics and targets divided by one ``target_scale`` (their
    standard deviation), so the loss is O(1); predictions come back in the targets' scale.
    :meth:`embed` gives the representation a transfer task starts from: the last hidden
    layer's activations (the prediction itself for linear regression).
    """

    def __init__(
        self,
        *,
        n_inputs: int,
        n_outputs: int,
        layers: int,
        hidden: int = 1000,
        dropout: float = 0.25,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        target_scale: float = 1.0,
        feature_mean: list[float] | None = None,
        feature_std: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = MLP(n_inputs=n_inputs, n_outputs=n_outputs, hidden=hidden, layers=layers, dropout=dropout)
        self.register_buffer("feature_mean", stat_buffer(feature_mean, n_inputs, 0.0))
        self.register_buffer("feature_std", stat_buffer(feature_std, n_inputs, 1.0))
        self.loss = nn.MSELoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features ``[shape=(batch, n_inputs)]`` -> scaled targets ``[shape=(batch, n_outputs)]``."""
        return self.net((x.float() - self.feature_mean) / self.feature_std)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features -> the last hidden layer's activations (``hidden`` units), or the prediction when linear."""
        hidden = self.net.hidden((x.float() - self.feature_mean) / self.feature_std)
        return self.net.output(hidden) * self.hparams.target_scale if self.hparams.layers == 0 else hidden

    @property
    def embedding_size(self) -> int:
        return self.hparams.n_outputs if self.hparams.layers == 0 else self.hparams.hidden

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        loss = self.loss(self(x), y / self.hparams.target_scale)
        self.log("train/mse", loss, on_step=False, on_epoch=True, batch_size=len(x), sync_dist=True)
        return loss

    def _eval_step(self, batch, split: str) -> None:
        x, y = batch[0], batch[1]
        error = ((self(x) * self.hparams.target_scale - y) ** 2).mean()
        self.log(f"{split}/mse", error, on_step=False, on_epoch=True, batch_size=len(x), sync_dist=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self(batch[0]) * self.hparams.target_scale

    def configure_optimizers(self):
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
