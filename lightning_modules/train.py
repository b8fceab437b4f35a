"""Training entry points, one per family, each reading top to bottom:
data -> model -> callbacks -> logger -> trainer -> fit -> test.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger

from core.errors import ParameterError
from core.settings import (
    LatentFactorSettings,
    MelSettings,
    MLPSettings,
    RegressorSettings,
    TaggerSettings,
    TrainSettings,
)
from lightning_modules.audio_datamodule import AudioDataModule
from lightning_modules.callbacks import (
    FINISHED,
    CompileNetwork,
    Snapshot,
    ThroughputLog,
)
from lightning_modules.datamodule import FeatureDataModule, VectorDataModule
from lightning_modules.latent_factors import LatentFactorModule
from lightning_modules.mlp import FactorRegressorModule, MLPTaggerModule
from lightning_modules.tagger import RawAudioTaggerModule, TaggerModule
from tasks.datasets import multi_hot

log = logging.getLogger("mirflow")


@dataclass
class TrainResult:
    module: L.LightningModule  # the best checkpoint, reloaded
    checkpoint: Path
    metrics: dict[str, float]
    epochs: int


def frames(seconds: float, mel: MelSettings) -> int:
    """Number of spectrogram frames spanning ``seconds``."""
    return max(1, round(seconds * mel.sample_rate / mel.hop_length))


LAST_CHECKPOINT = "last.ckpt"


def build_trainer(
    train: TrainSettings,
    *,
    name: str,
    monitor: str,
    mode: str,
    checkpoint_dir: Path,
    logger: Logger | bool,
    quiet: bool = False,
    log_every_n_steps: int = 5,
    callbacks: Sequence[L.Callback] = (),
) -> tuple[L.Trainer, ModelCheckpoint]:
    """The trainer of every family: best checkpoint on ``monitor``, early stopping, a resumable ``last.ckpt``.

    With ``train.devices > 1`` it trains under DDP in spawned processes (``ddp_spawn``:
    a flow cannot be re-executed per rank as the script launcher of ``ddp`` would);
    the gloo backend on CPUs, NCCL on GPUs. Lightning logs from rank 0 only. ``callbacks``
    are the resources' own (``infra.threads.ThreadPolicy``), handed down by the flow.
    """
    best = ModelCheckpoint(dirpath=checkpoint_dir, filename=f"{name}-best", monitor=monitor, mode=mode, save_top_k=1)
    trainer = L.Trainer(
        max_epochs=train.max_epochs,
        accelerator=train.accelerator,
        devices=train.devices,
        strategy="ddp_spawn" if train.devices > 1 else "auto",
        precision=train.precision,
        logger=logger,
        callbacks=[
            best,
            EarlyStopping(monitor=monitor, mode=mode, patience=train.patience),
            ThroughputLog(name, quiet=quiet),
            *callbacks,
            Snapshot(Path(checkpoint_dir) / LAST_CHECKPOINT, every_n_steps=train.checkpoint_every_n_steps),
            *([CompileNetwork()] if train.compile else []),
        ],
        enable_progress_bar=sys.stderr.isatty() and not quiet,
        enable_model_summary=False,
        log_every_n_steps=log_every_n_steps,
        num_sanity_val_steps=0,
    )
    return trainer, best


def fit_and_test(
    trainer: L.Trainer,
    best: ModelCheckpoint,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    train: TrainSettings,
    checkpoint_dir: Path,
) -> TrainResult:
    """Fit, reload the best checkpoint, test it.

    A killed run left ``checkpoint_dir/last.ckpt``: fitting resumes from it, or, when that
    snapshot says training had finished, is skipped (the best checkpoint it names is
    tested). The test runs in this process on one device whatever ``train.devices``: its
    per-clip scores and per-tag tables stay on the returned module (spawned ranks cannot
    hand them back).
    """
    last = Path(checkpoint_dir) / LAST_CHECKPOINT
    snapshot = torch.load(last, weights_only=True, map_location="cpu") if last.exists() else None
    if snapshot is not None and snapshot.get(FINISHED):
        log.info("training had finished (%s): testing its best checkpoint", last)
        best_path = Path(
            next(
                state["best_model_path"]
                for key, state in snapshot["callbacks"].items()
                if key.startswith("ModelCheckpoint")
            )
        )
    else:
        if snapshot is not None:
            log.info("resuming from %s (epoch %d, step %d)", last, snapshot["epoch"], snapshot["global_step"])
        trainer.fit(module, datamodule=datamodule, ckpt_path=last if snapshot is not None else None, weights_only=True)
        best_path = Path(best.best_model_path)
    reloaded = type(module).load_from_checkpoint(best_path, weights_only=True, map_location="cpu")
    tester = trainer
    if train.devices > 1:
        tester = L.Trainer(
            accelerator=train.accelerator,
            devices=1,
            precision=train.precision,
            logger=trainer.logger,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    metrics = tester.test(reloaded, datamodule=datamodule, verbose=False)[0]
    epochs = int(torch.load(last, weights_only=True, map_location="cpu")["epoch"])  # as far as any rank went
    return TrainResult(reloaded, best_path, metrics, epochs)


def resident_device(train: TrainSettings) -> str | None:
    """Where the training split lives for ``resident_data`` (None: in a DataLoader, as usual)."""
    if train.resident_data == "off":
        return None
    if train.resident_data == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return train.resident_data


def _datamodule(
    feature_dir: Path,
    mel: MelSettings,
    train: TrainSettings,
    track_ids: dict[str, list[str]],
    targets: dict[str, np.ndarray],
) -> FeatureDataModule:
    datamodule = FeatureDataModule(
        feature_dir=feature_dir,
        column=mel.column,
        track_ids=track_ids,
        targets=targets,
        crop_frames=frames(train.crop_seconds, mel),
        eval_hop_frames=frames(train.eval_hop_seconds, mel),
        batch_size=train.batch_size,
        crops_per_clip=train.crops_per_clip,
        num_workers=train.num_workers,
        resident=resident_device(train),
        seed=train.seed,
    )
    datamodule.setup()
    return datamodule


def train_tagger(
    *,
    feature_dir: Path,
    tracks: pd.DataFrame,
    tags: list[str],
    settings: TaggerSettings,
    mel: MelSettings,
    checkpoint_dir: Path,
    logger: Logger | bool = False,
    quiet: bool = False,
    callbacks: Sequence[L.Callback] = (),
) -> TrainResult:
    """Train the spectrogram tagger (``settings.model``) on the tracks' train split; test on their test split."""
    L.seed_everything(settings.train.seed, workers=True)
    track_ids = {split: list(group["track_id"]) for split, group in tracks.groupby("split")}
    datamodule = _datamodule(feature_dir, mel, settings.train, track_ids, multi_hot(tracks, tags))
    model = TaggerModule(
        n_mels=mel.n_mels,
        crop_frames=datamodule.crop,
        tags=list(tags),
        channels=settings.conv_channels,
        conv_length=settings.conv_length,
        pool=settings.pool,
        hidden=settings.hidden,
        pool_ceil=settings.pool_ceil,
        architecture=settings.model,
        resnet_channels=settings.resnet_channels,
        learning_rate=settings.train.learning_rate,
        weight_decay=settings.train.weight_decay,
        feature_mean=datamodule.mean.tolist(),
        feature_std=datamodule.std.tolist(),
    )
    trainer, checkpoint = build_trainer(
        settings.train,
        callbacks=callbacks,
        name="tagger",
        monitor="val/roc_auc",
        mode="max",
        checkpoint_dir=checkpoint_dir,
        logger=logger,
        quiet=quiet,
    )
    return fit_and_test(trainer, checkpoint, model, datamodule, train=settings.train, checkpoint_dir=checkpoint_dir)


@dataclass
class LatentFactorResult(TrainResult):
    test_track_ids: list[str] | None = None
    predicted_factors: np.ndarray | None = None  # (n_test, n_factors), aligned with test_track_ids


def train_latent_factor_cnn(
    *,
    feature_dir: Path,
    track_ids: dict[str, list[str]],
    item_factors: dict[str, np.ndarray],
    settings: LatentFactorSettings,
    mel: MelSettings,
    checkpoint_dir: Path,
    logger: Logger | bool = False,
    init_checkpoint: Path | None = None,
    train: TrainSettings | None = None,
    user_factors: np.ndarray | None = None,
    train_confidence=None,
    callbacks: Sequence[L.Callback] = (),
) -> LatentFactorResult:
    """Regress item factors from audio; predict the factors of the test tracks (the cold-start items).

    ``item_factors`` must cover every track of every split; for held-out tracks these
    are the fold-in factors, used only to report ``test/mse``. With ``init_checkpoint``
    the network is fine-tuned from those weights (its architecture, input statistics
    and target scale kept) under ``train`` (default ``settings.train``). The ``wpe``
    objective needs ``user_factors (n_users, f)`` and ``train_confidence``, the WMF
    confidence of every play of the train tracks, ``sp.csr_matrix (n_users, n_train)``
    with columns in ``track_ids["train"]`` order.
    """
    if settings.objective == "wpe" and (user_factors is None or train_confidence is None):
        raise ParameterError("the wpe objective needs the user factors and the training tracks' plays")
    train = train or settings.train
    L.seed_everything(train.seed, workers=True)
    datamodule = _datamodule(feature_dir, mel, train, track_ids, item_factors)
    train_targets = np.stack([item_factors[t] for t in track_ids["train"]])
    if init_checkpoint is not None:
        model = LatentFactorModule.load_from_checkpoint(
            init_checkpoint,
            weights_only=True,
            map_location="cpu",
            learning_rate=train.learning_rate,
            weight_decay=train.weight_decay,
            objective=settings.objective,
        )
        if model.hparams.n_factors != train_targets.shape[1] or model.hparams.n_mels != mel.n_mels:
            raise ParameterError(
                f"{init_checkpoint} predicts {model.hparams.n_factors} factors from {model.hparams.n_mels} mel bands; "
                f"the new targets have {train_targets.shape[1]} factors and the features {mel.n_mels} bands: "
                "train a new model with the pipeline instead of fine-tuning"
            )
    else:
        model = LatentFactorModule(
            n_mels=mel.n_mels,
            n_factors=train_targets.shape[1],
            channels=settings.channels,
            conv_length=settings.conv_length,
            hidden=settings.hidden,
            dropout=settings.dropout,
            learning_rate=train.learning_rate,
            weight_decay=train.weight_decay,
            target_scale=float(train_targets.std()),
            feature_mean=datamodule.mean.tolist(),
            feature_std=datamodule.std.tolist(),
            objective=settings.objective,
        )
    if settings.objective == "wpe":
        model.use_plays(user_factors, train_confidence)
    trainer, checkpoint = build_trainer(
        train,
        callbacks=callbacks,
        name="latent_factors",
        monitor="val/mse",
        mode="min",
        checkpoint_dir=checkpoint_dir,
        logger=logger,
    )
    fitted = fit_and_test(trainer, checkpoint, model, datamodule, train=train, checkpoint_dir=checkpoint_dir)
    predictor = L.Trainer(
        accelerator=train.accelerator,
        devices=1,
        precision=train.precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    predicted = np.concatenate([p.numpy() for p in predictor.predict(fitted.module, datamodule=datamodule)])
    return LatentFactorResult(
        fitted.module,
        fitted.checkpoint,
        fitted.metrics,
        fitted.epochs,
        test_track_ids=list(track_ids["test"]),
        predicted_factors=predicted,
    )


def train_mlp_tagger(
    *,
    features: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    tags: list[str],
    settings: MLPSettings,
    checkpoint_dir: Path,
    logger: Logger | bool = False,
    quiet: bool = False,
    callbacks: Sequence[L.Callback] = (),
) -> TrainResult:
    """Train the MLP tagger on one feature vector per clip; early stopping on validation ROC-AUC; test.

    ``features`` and ``targets`` map each split (``train``, ``valid``, ``test``) to aligned
    ``(n_clips, n_inputs)`` and ``(n_clips, n_tags)`` arrays.
    """
    L.seed_everything(settings.train.seed, workers=True)
    datamodule = VectorDataModule(
        features=features, targets=targets, batch_size=settings.train.batch_size, num_workers=settings.train.num_workers
    )
    model = MLPTaggerModule(
        n_inputs=features["train"].shape[1],
        tags=list(tags),
        hidden=settings.hidden,
        layers=settings.layers,
        dropout=settings.dropout,
        learning_rate=settings.train.learning_rate,
        weight_decay=settings.train.weight_decay,
        feature_mean=datamodule.mean.tolist(),
        feature_std=datamodule.std.tolist(),
    )
    trainer, checkpoint = build_trainer(
        settings.train,
        callbacks=callbacks,
        name="mlp_tagger",
        monitor="val/roc_auc",
        mode="max",
        checkpoint_dir=checkpoint_dir,
        logger=logger,
        quiet=quiet,
        log_every_n_steps=1,
    )
    return fit_and_test(trainer, checkpoint, model, datamodule, train=settings.train, checkpoint_dir=checkpoint_dir)


@dataclass
class RegressorResult(TrainResult):
    predicted: np.ndarray | None = None  # (n_test, n_outputs): the test split's predictions


def train_factor_regressor(
    *,
    features: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    layers: int,
    settings: RegressorSettings,
    checkpoint_dir: Path,
    logger: Logger | bool = False,
    quiet: bool = False,
    callbacks: Sequence[L.Callback] = (),
) -> RegressorResult:
    """Linear regression (``layers=0``) or an MLP from one feature vector per clip to its target vector.

    ``features`` and ``targets`` map ``train``, ``valid`` and ``test`` to aligned arrays.
    Early stopping on the validation MSE; returns the best model with its test predictions.
    """
    L.seed_everything(settings.train.seed, workers=True)
    datamodule = VectorDataModule(
        features=features, targets=targets, batch_size=settings.train.batch_size, num_workers=settings.train.num_workers
    )
    scale = float(np.asarray(targets["train"]).std()) or 1.0
    model = FactorRegressorModule(
        n_inputs=features["train"].shape[1],
        n_outputs=targets["train"].shape[1],
        layers=layers,
        hidden=settings.hidden,
        dropout=settings.dropout,
        learning_rate=settings.train.learning_rate,
        weight_decay=settings.train.weight_decay,
        target_scale=scale,
        feature_mean=datamodule.mean.tolist(),
        feature_std=datamodule.std.tolist(),
    )
    trainer, checkpoint = build_trainer(
        settings.train,
        callbacks=callbacks,
        name=f"regressor{layers}",
        monitor="val/mse",
        mode="min",
        checkpoint_dir=checkpoint_dir,
        logger=logger,
        quiet=quiet,
        log_every_n_steps=1,
    )
    fitted = fit_and_test(trainer, checkpoint, model, datamodule, train=settings.train, checkpoint_dir=checkpoint_dir)
    predictor = L.Trainer(
        accelerator=settings.train.accelerator,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    predicted = np.concatenate([p.numpy() for p in predictor.predict(fitted.module, datamodule=datamodule)])
    return RegressorResult(fitted.module, fitted.checkpoint, fitted.metrics, fitted.epochs, predicted=predicted)


def train_raw_tagger(
    *,
    audio_dir: Path,
    tracks: pd.DataFrame,
    tags: list[str],
    train: TrainSettings,
    sample_rate: int,
    model: dict,
    checkpoint_dir: Path,
    logger: Logger | bool = False,
    quiet: bool = False,
    callbacks: Sequence[L.Callback] = (),
) -> TrainResult:
    """Train the raw-audio convnet on the PCM shards' train split; test on the test split.

    ``model`` holds :class:`~lightning_modules.tagger.RawAudioTaggerModule`'s architecture
    arguments (``filter_length``, ``stride``, ``nonlinearity``, ``feature_pooling``, ...).
    """
    L.seed_everything(train.seed, workers=True)
    track_ids = {split: list(group["track_id"]) for split, group in tracks.groupby("split")}
    crop = max(1, round(train.crop_seconds * sample_rate))
    datamodule = AudioDataModule(
        audio_dir=audio_dir,
        track_ids=track_ids,
        targets=multi_hot(tracks, tags),
        crop_samples=crop,
        eval_hop_samples=max(1, round(train.eval_hop_seconds * sample_rate)),
        batch_size=train.batch_size,
        crops_per_clip=train.crops_per_clip,
        num_workers=train.num_workers,
        resident=resident_device(train),
        seed=train.seed,
        sample_rate=sample_rate,
    )
    datamodule.setup()
    module = RawAudioTaggerModule(
        crop_samples=crop, tags=list(tags), learning_rate=train.learning_rate, weight_decay=train.weight_decay, **model
    )
    trainer, checkpoint = build_trainer(
        train,
        callbacks=callbacks,
        name="raw_tagger",
        monitor="val/roc_auc",
        mode="max",
        checkpoint_dir=checkpoint_dir,
        logger=logger,
        quiet=quiet,
    )
    return fit_and_test(trainer, checkpoint, module, datamodule, train=train, checkpoint_dir=checkpoint_dir)
