"""Training that scales: DDP with one MLflow run, resume after a kill mid-epoch, resumable MLflow runs."""

from __future__ import annotations

import socket

import lightning as L
import numpy as np
import pytest
import torch

from core.settings import MLPSettings, TrackingSettings, TrainSettings

N_INPUTS, TAGS = 40, ["a", "b", "c"]


def _splits(seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((N_INPUTS, len(TAGS)))
    features, targets = {}, {}
    for split, n in (("train", 300), ("valid", 51), ("test", 50)):  # odd sizes: DDP samplers pad
        x = rng.standard_normal((n, N_INPUTS)).astype(np.float32)
        features[split], targets[split] = x, (x @ weights > 0).astype(np.float32)
    return features, targets


def _tracking(tmp_path) -> TrackingSettings:
    return TrackingSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "artifacts"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_training_logs_to_exactly_one_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.training import mlflow_logger
    from infra.tracking import tracked_run
    from lightning_modules.train import train_mlp_tagger

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    tracking = _tracking(tmp_path)
    features, targets = _splits()
    settings = MLPSettings(
        hidden=32,
        dropout=0.0,
        train=TrainSettings(max_epochs=3, patience=3, batch_size=32, accelerator="cpu", devices=2),
    )
    with tracked_run(tracking, "tagger", run_name="ddp", params={}) as run:
        result = train_mlp_tagger(
            features=features,
            targets=targets,
            tags=TAGS,
            settings=settings,
            checkpoint_dir=tmp_path / "checkpoints",
            quiet=True,
            logger=mlflow_logger(tracking, "tagger", run.info.run_id),
        )
    client = MlflowClient(tracking.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run.info.run_id]  # rank 1 logged nowhere else
    history = client.get_metric_history(run.info.run_id, "val/roc_auc")
    assert len(history) == 3  # one value per epoch: only rank 0 wrote it
    assert runs[0].data.metrics["test/roc_auc"] == pytest.approx(result.metrics["test/roc_auc"])
    assert result.epochs == 3 and result.checkpoint.exists()
    assert len(result.module.test_table) == len(TAGS)  # tested in this process: the tables came back


class _Kill(L.Callback):
    """Stands in for a kill: the process dies right after optimizer step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            raise _Killed(f"killed after step {self.at}")


class _Killed(Exception):
    pass


def _fit(checkpoint_dir, kill_at: int | None = None):
    from lightning_modules.datamodule import VectorDataModule
    from lightning_modules.mlp import MLPTaggerModule
    from lightning_modules.train import build_trainer, fit_and_test

    train = TrainSettings(max_epochs=3, patience=3, batch_size=32, accelerator="cpu", checkpoint_every_n_steps=4)
    L.seed_everything(0)
    features, targets = _splits()
    datamodule = VectorDataModule(features=features, targets=targets, batch_size=train.batch_size)
    module = MLPTaggerModule(n_inputs=N_INPUTS, tags=TAGS, hidden=16, dropout=0.0)
    trainer, best = build_trainer(
        train, name="mlp", monitor="val/roc_auc", mode="max", checkpoint_dir=checkpoint_dir, logger=False, quiet=True
    )
    if kill_at is not None:
        trainer.callbacks.append(_Kill(kill_at))
    result = fit_and_test(trainer, best, module, datamodule, train=train, checkpoint_dir=checkpoint_dir)
    return trainer, result


def test_a_run_killed_mid_epoch_resumes_from_its_last_snapshot_to_the_same_steps(tmp_path):
    whole, _ = _fit(tmp_path / "whole")
    steps_per_epoch = 300 // 32  # drop_last
    assert whole.global_step == 3 * steps_per_epoch

    with pytest.raises(_Killed):
        _fit(tmp_path / "killed", kill_at=steps_per_epoch + 6)  # step 15, in the middle of epoch 2
    snapshot = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)
    assert snapshot["global_step"] == 12  # the newest snapshot (every 4 steps), mid-epoch
    assert snapshot["epoch"] == 1
    restarted, result = _fit(tmp_path / "killed")
    assert restarted.global_step == whole.global_step
    assert result.epochs == 3 and 0.0 <= result.metrics["test/roc_auc"] <= 1.0


def test_a_run_that_finished_training_is_tested_again_not_trained_further(tmp_path):
    """Killed after training (early stopping included) but before its run completed: the re-run only tests."""
    first, result = _fit(tmp_path / "run")
    again, repeated = _fit(tmp_path / "run")
    assert again.global_step == 0  # fit was skipped
    assert repeated.checkpoint == result.checkpoint and repeated.epochs == result.epochs
    assert repeated.metrics["test/roc_auc"] == pytest.approx(result.metrics["test/roc_auc"])


def test_tracked_run_with_a_key_continues_the_run_that_did_not_complete(tmp_path):
    from infra.tracking import tracked_run

    tracking = _tracking(tmp_path)
    with (
        pytest.raises(RuntimeError),
        tracked_run(tracking, "tagger", run_name="t", params={"a": 1}, resume_key="k1") as first,
    ):
        raise RuntimeError("killed")
    with tracked_run(tracking, "tagger", run_name="t", params={"a": 1}, resume_key="k1") as second:
        pass
    assert second.info.run_id == first.info.run_id
    with tracked_run(tracking, "tagger", run_name="t", params={"a": 1}, resume_key="k1") as third:
        pass
    assert third.info.run_id != first.info.run_id  # the key's run completed: a new run
    with tracked_run(tracking, "tagger", run_name="t", params={"a": 2}, resume_key="k2") as other:
        pass
    assert other.info.run_id not in (first.info.run_id, third.info.run_id)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "options",
    [{"resident_data": "cuda"}, {"resident_data": "off", "compile": True}],
    ids=["resident-cuda", "loader-compiled"],
)
def test_raw_tagger_trains_on_a_gpu_in_bf16(tmp_path, options):
    import pandas as pd

    from lightning_modules.train import train_raw_tagger
    from tasks.shards import audio_to_table, write_feature_shard

    rng = np.random.default_rng(0)
    ids = [f"t{i}" for i in range(48)]
    tone = [i % 2 == 0 for i in range(48)]
    t = np.arange(16000) / 16000.0
    rows = [
        (track, (0.5 * np.sin(2 * np.pi * 440 * t) if on else 0.3 * rng.standard_normal(16000)).astype(np.float32))
        for track, on in zip(ids, tone)
    ]
    write_feature_shard(audio_to_table(rows, sample_rate=16000), tmp_path / "audio" / "part-0.parquet")
    tracks = pd.DataFrame(
        {
            "track_id": ids,
            "split": ["train"] * 32 + ["valid"] * 8 + ["test"] * 8,
            "tags": [["tone"] if on else ["noise"] for on in tone],
        }
    )
    train = TrainSettings(
        crop_seconds=0.5,
        eval_hop_seconds=0.25,
        batch_size=16,
        crops_per_clip=4,
        max_epochs=4,
        patience=4,
        accelerator="gpu",
        precision="bf16-mixed",
        seed=0,
        **options,
    )
    result = train_raw_tagger(
        audio_dir=tmp_path / "audio",
        tracks=tracks,
        tags=["noise", "tone"],
        train=train,
        sample_rate=16000,
        model={"filter_length": 256, "stride": 128, "n_filters": 32},
        checkpoint_dir=tmp_path / "ckpt",
        quiet=True,
    )
    assert result.metrics["test/roc_auc"] > 0.9
    state = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)
