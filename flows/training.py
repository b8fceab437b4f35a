"""Flows: train the tagger and the latent-factor CNN, evaluate, log everything to MLflow."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from lightning.pytorch.loggers import MLFlowLogger
from prefect import flow

from core.layout import Layout
from core.settings import (
    EvalSettings,
    LatentFactorSettings,
    MelSettings,
    TaggerSettings,
    TrackingSettings,
    TrainSettings,
    WMFSettings,
)
from flows.listening import WMFOutput
from infra.registry import (
    factors_schema,
    log_served_model,
    tag_scores_schema,
    waveform_signature,
)
from infra.threads import ThreadPolicy
from infra.tracking import (
    experiment_id,
    features_input,
    file_sha1,
    listening_input,
    run_key,
    tracked_run,
    tracks_input,
    wmf_factors_input,
)
from lightning_modules.train import train_latent_factor_cnn, train_tagger
from tasks.catalogue import tracks_with_features
from tasks.datasets import tag_vocabulary
from tasks.heldout import factors_of, heldout_relevance, play_confidence
from tasks.listening import load_factors
from tasks.recommend import cold_start_rows, cold_start_track_splits, rows_as_metrics
from tasks.report import (
    RankingRow,
    dominant_labels,
    plot_factor_scatter,
    plot_first_layer_filters,
    plot_roc_curves,
    plot_tsne,
)
from tasks.shards import MANIFEST


@dataclass(frozen=True)
class TaggerOutput:
    roc_auc: float
    pr_auc: float
    pr_auc_chance: float
    per_tag: str  # the per-tag table as text
    run_id: str
    model_uri: str  # the tagger as an MLflow pyfunc model (waveforms -> tag probabilities)


@dataclass(frozen=True)
class RecommenderOutput:
    rows: list[RankingRow]
    k: int
    run_id: str
    model_uri: str  # the CNN as an MLflow pyfunc model (waveforms -> item factors)
    checkpoint: str


def mlflow_logger(tracking: TrackingSettings, family: str, run_id: str) -> MLFlowLogger:
    experiment = mlflow.get_experiment(experiment_id(tracking, family))
    return MLFlowLogger(experiment_name=experiment.name, tracking_uri=tracking.tracking_uri, run_id=run_id)


def _tracks_with_features(data_dir: Path, dataset: str, feature_set: str):
    """The dataset's tracks (``track_id, split, tags, source_path``) that have features of ``feature_set``."""
    layout = Layout(Path(data_dir))
    return tracks_with_features(layout.tracks(dataset), layout.features(dataset, feature_set))


@flow(name="train-tagger")
def train_tagger_flow(
    data_dir: Path, dataset: str, feature_set: str, mel: MelSettings, tagger: TaggerSettings, tracking: TrackingSettings
) -> TaggerOutput:
    """Train and test the 2014 spectrogram convnet on the dataset's split; log checkpoint, tables, ROC curves."""
    layout = Layout(Path(data_dir))
    tracks = _tracks_with_features(data_dir, dataset, feature_set)
    tags = tag_vocabulary(tracks, n=tagger.n_tags)
    params = {
        **tagger.flat("tagger."),
        **mel.flat("mel."),
        "dataset": dataset,
        "feature_set": feature_set,
        "tags": ",".join(tags),
        "n_tracks": len(tracks),
    }
    feature_dir = layout.features(dataset, feature_set)
    provenance = {"mirflow.features_manifest_sha1": file_sha1(feature_dir / MANIFEST) or "none"}
    # A killed training run is continued on the next call with the same inputs (same run, its last.ckpt).
    inputs = [features_input(feature_dir, dataset), tracks_input(layout.tracks(dataset), dataset)]
    with tracked_run(
        tracking,
        "tagger",
        run_name=f"tagger-{dataset}",
        params=params,
        tags=provenance,
        resume_key=run_key("tagger", params, provenance),
        inputs=inputs,
    ) as run:
        result = train_tagger(
            callbacks=[ThreadPolicy()],
            feature_dir=feature_dir,
            tracks=tracks,
            tags=tags,
            settings=tagger,
            mel=mel,
            checkpoint_dir=layout.checkpoints("tagger") / run.info.run_id,
            logger=mlflow_logger(tracking, "tagger", run.info.run_id),
        )
        module = result.module
        mlflow.log_metric("epochs", result.epochs)
        mlflow.log_artifact(str(result.checkpoint), artifact_path="checkpoints")
        with tempfile.TemporaryDirectory() as tmp:
            table_path = Path(tmp) / "per_tag_test_metrics.csv"
            module.test_table.to_csv(table_path, index=False)
            mlflow.log_artifact(str(table_path))
            plots = [
                plot_roc_curves(module.test_truth, module.test_scores, tags=tags, path=Path(tmp) / "roc_curves.png")
            ]
            if tagger.model == "convnet2014":  # its first layer's filters span mel bands x time
                plots.append(
                    plot_first_layer_filters(
                        module.net.features[0].weight.detach().cpu().numpy(), path=Path(tmp) / "first_layer_filters.png"
                    )
                )
            for plot in plots:
                mlflow.log_artifact(str(plot), artifact_path="plots")
        model_uri = log_audio_model(
            "tagger",
            result.checkpoint,
            tracks=tracks,
            mel=mel,
            train=tagger.train,
            outputs=tag_scores_schema(list(tags)),
        )
    return TaggerOutput(
        roc_auc=float(result.metrics["test/roc_auc"]),
        pr_auc=float(result.metrics["test/pr_auc"]),
        pr_auc_chance=float(result.metrics["test/pr_auc_chance"]),
        per_tag=module.test_table.to_string(index=False, float_format="%.3f"),
        run_id=run.info.run_id,
        model_uri=model_uri,
    )


@flow(name="train-recommender")
def train_recommender_flow(
    data_dir: Path,
    dataset: str,
    feature_set: str,
    mel: MelSettings,
    wmf: WMFOutput,
    recommender: LatentFactorSettings,
    evaluation: EvalSettings,
    tracking: TrackingSettings,
    init_checkpoint: Path | None = None,
    finetune: TrainSettings | None = None,
    confidence: WMFSettings | None = None,
) -> RecommenderOutput:
    """Regress WMF item factors from audio, then rank held-out tracks for every user by the predictions.

    With ``init_checkpoint`` (a champion's weights) the CNN is fine-tuned under ``finetune``.
    The ``wpe`` objective weighs the training tracks' plays (those the factorization saw) by
    the confidence function of ``confidence`` (the WMF settings; their defaults when None).
    """
    layout = Layout(Path(data_dir))
    tracks = _tracks_with_features(data_dir, dataset, feature_set)
    users, user_factors = load_factors(wmf.user_factors)
    items, item_factors = load_factors(wmf.item_factors)
    heldout, heldout_factors = load_factors(wmf.heldout_item_factors)
    factors = {**dict(zip(items, item_factors)), **dict(zip(heldout, heldout_factors))}
    track_ids = cold_start_track_splits(tracks, factorized=set(items), heldout=set(heldout))
    params = {
        **recommender.flat("recommender."),
        **evaluation.flat("evaluation."),
        "dataset": dataset,
        "feature_set": feature_set,
        "wmf_run_id": wmf.run_id,
        "init_checkpoint": str(init_checkpoint or ""),
        **(finetune.flat("finetune.") if finetune is not None else {}),
        **{f"n_{split}": len(ids) for split, ids in track_ids.items()},
    }
    feature_dir = layout.features(dataset, feature_set)
    provenance = {
        "mirflow.features_manifest_sha1": file_sha1(feature_dir / MANIFEST) or "none",
        "mirflow.item_factors_sha1": file_sha1(Path(wmf.item_factors)) or "none",
    }
    inputs = [
        features_input(feature_dir, dataset),
        wmf_factors_input(wmf),
        tracks_input(layout.tracks(dataset), dataset),
        listening_input(layout.listening(), wmf.batches) if recommender.objective == "wpe" else None,
    ]
    with tracked_run(
        tracking,
        "latent-factors",
        run_name=f"latent-factor-cnn-{dataset}",
        params=params,
        tags=provenance,
        resume_key=run_key("latent-factors", params, provenance),
        inputs=inputs,
    ) as run:
        plays = {}
        if recommender.objective == "wpe":
            plays = {
                "user_factors": user_factors,
                "train_confidence": training_confidence(
                    layout, wmf, users=users, tracks=track_ids["train"], settings=confidence or WMFSettings()
                ),
            }
        result = train_latent_factor_cnn(
            callbacks=[ThreadPolicy()],
            feature_dir=feature_dir,
            track_ids=track_ids,
            **plays,
            item_factors=factors,
            settings=recommender,
            mel=mel,
            checkpoint_dir=layout.checkpoints("latent_factors") / run.info.run_id,
            logger=mlflow_logger(tracking, "latent-factors", run.info.run_id),
            init_checkpoint=init_checkpoint,
            train=finetune,
        )
        test_ids = list(result.test_track_ids)
        relevant = heldout_relevance(Path(wmf.heldout_plays), users=users, track_ids=test_ids)
        true_factors = factors_of(heldout, heldout_factors, test_ids)
        rows = cold_start_rows(
            heldout_plays=relevant,
            k=evaluation.k,
            seed=evaluation.seed,
            models={
                "CNN-predicted factors": (user_factors, result.predicted_factors),
                "WMF factors (upper bound)": (user_factors, true_factors),
            },
        )
        mlflow.log_metrics({"epochs": result.epochs, **rows_as_metrics(rows, prefix="test/", k=evaluation.k)})
        mlflow.log_artifact(str(result.checkpoint), artifact_path="checkpoints")
        tags_of = dict(zip(tracks["track_id"], tracks["tags"]))
        labels = dominant_labels(
            [tags_of[t] for t in test_ids], candidates=evaluation.map_tags or tag_vocabulary(tracks, n=8)
        )
        with tempfile.TemporaryDirectory() as tmp:
            plots = [
                plot_factor_scatter(
                    true_factors, result.predicted_factors, path=Path(tmp) / "predicted_vs_wmf_factors.png"
                ),
                plot_tsne(
                    result.predicted_factors,
                    labels,
                    path=Path(tmp) / "tsne_predicted_factors.png",
                    title="held-out tracks: t-SNE of CNN-predicted factors",
                    seed=evaluation.seed,
                ),
                plot_tsne(
                    true_factors,
                    labels,
                    path=Path(tmp) / "tsne_wmf_factors.png",
                    title="held-out tracks: t-SNE of WMF factors (from plays)",
                    seed=evaluation.seed,
                ),
            ]
            for plot in plots:
                mlflow.log_artifact(str(plot), artifact_path="plots")
        model_uri = log_audio_model(
            "latent_factor_cnn",
            result.checkpoint,
            tracks=tracks,
            mel=mel,
            train=finetune or recommender.train,
            outputs=factors_schema(result.predicted_factors.shape[1]),
        )
    return RecommenderOutput(
        rows=rows, k=evaluation.k, run_id=run.info.run_id, model_uri=model_uri, checkpoint=str(result.checkpoint)
    )


def training_confidence(layout: Layout, wmf: WMFOutput, *, users, tracks: list[str], settings: WMFSettings):
    """WMF confidence of every play of ``tracks`` by ``users`` (the factors' keys) in the factorized batches:
    ``(len(users), len(tracks))``, csr (:func:`tasks.heldout.play_confidence`)."""
    return play_confidence(layout.listening(), wmf.batches, users=users, tracks=tracks, settings=settings)


def log_audio_model(code: str, checkpoint: Path, *, tracks, mel: MelSettings, train: TrainSettings, outputs) -> str:
    """Log a trained audio model (tagger or CNN) as a pyfunc in the active run, a real clip as its input example
    (the first of ``tracks``, the tracks table: its ``source_path``)."""
    from lightning_modules.served import served_config
    from lightning_modules.train import frames
    from tasks.audio import excerpt

    config = served_config(
        mel=mel, crop_frames=frames(train.crop_seconds, mel), hop_frames=frames(train.eval_hop_seconds, mel)
    )
    example = excerpt(tracks["source_path"].iloc[0], sample_rate=mel.sample_rate, seconds=train.crop_seconds)
    return log_served_model(
        code=code,
        artifacts={"checkpoint": Path(checkpoint)},
        config=config,
        signature=waveform_signature(outputs),
        input_example=example[None, :],
    )
