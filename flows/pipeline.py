"""The whole pipeline: (synthetic world) -> tracks -> features -> WMF -> tagger, latent-factor CNN -> report.

world ──► tracks/<dataset>.parquet ──► features (Dask) ──┬──► tagger ──────────────┐
  └──► listening triplets ──► events ──► WMF ────────────┴──► latent-factor CNN ───┴──► report + MLflow
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.errors import ParameterError
from core.layout import Layout
from core.settings import PipelineSettings
from core.storage import write_text
from flows.features import extract_features
from flows.listening import factorize
from flows.registry import register_pipeline_models
from flows.training import train_recommender_flow, train_tagger_flow
from flows.world import synthetic_world
from infra.cluster import dask_client, shared_settings
from infra.retries import TRANSIENT_IO_RETRIES
from infra.tracking import features_input, listening_input, tracked_run, tracks_input
from tasks.catalogue import write_tracks
from tasks.datasets import heldout_track_ids, mtat_tracks, read_mtat_annotations
from tasks.recommend import rows_as_metrics
from tasks.report import PipelineSummary, summary_text, write_report


@task(cache_policy=NO_CACHE, **TRANSIENT_IO_RETRIES)
def ingest_mtat(annotations: Path, audio_root: Path, n_tags: int, tracks_path: Path) -> Path:
    tracks = mtat_tracks(read_mtat_annotations(annotations), audio_root=audio_root, n_tags=n_tags)
    return write_tracks(tracks_path, tracks)


def _sources(settings: PipelineSettings) -> tuple[Path, Path, tuple[Path, ...]]:
    """Annotations, audio root and triplet files of the run's dataset."""
    if settings.dataset == "synthetic":
        root = Layout(settings.data_dir).world()
        triplets = tuple(sorted((root / "taste_profile").glob("train_triplets.batch-*.txt")))
        if settings.initial_batches is not None:
            triplets = triplets[: settings.initial_batches]
        return root / "mtat" / "annotations_final.csv", root / "mtat" / "audio", triplets
    if settings.annotations is None or settings.audio_root is None:
        raise ParameterError(
            f"dataset {settings.dataset!r} needs annotations and an audio root (MTAT layout) in the pipeline settings"
        )
    return settings.annotations, settings.audio_root, settings.triplets


@flow(name="pipeline")
def pipeline(settings: PipelineSettings) -> PipelineSummary:
    """Run every step; each lands in MLflow, and a summary run holds the report."""
    layout = Layout(settings.data_dir)
    dataset = settings.dataset
    with dask_client(settings.cluster) as client:
        # One cluster for all fan-out steps: the sub-flows connect to it by address.
        shared = shared_settings(client, settings.cluster)
        if dataset == "synthetic":
            synthetic_world(layout.world(), settings.world, shared)
        annotations, audio_root, triplets = _sources(settings)
        if not triplets:
            raise ParameterError(
                "no listening data: the pipeline settings name no triplets (Taste Profile files) to train the "
                "recommender on"
            )
        tracks_path = ingest_mtat(annotations, audio_root, settings.tagger.n_tags, layout.tracks(dataset))
        features = extract_features(settings.data_dir, dataset, settings.features, shared, settings.tracking)
    feature_set = settings.features.feature_set
    tagger = train_tagger_flow(
        settings.data_dir, dataset, feature_set, settings.features.mel, settings.tagger, settings.tracking
    )
    wmf = factorize(
        settings.data_dir,
        list(triplets),
        heldout_track_ids(tracks_path),
        settings.wmf,
        settings.tracking,
        k=settings.evaluation.k,
        cluster=settings.cluster,
    )
    recommender = train_recommender_flow(
        settings.data_dir,
        dataset,
        feature_set,
        settings.features.mel,
        wmf,
        settings.recommender,
        settings.evaluation,
        settings.tracking,
        confidence=settings.wmf,
    )
    versions = {}
    if settings.register_models:
        versions = register_pipeline_models(
            settings.tracking, tagger=tagger, wmf=wmf, recommender=recommender, dataset=dataset
        )
    inputs = [
        tracks_input(tracks_path, dataset),
        features_input(layout.features(dataset, feature_set), dataset),
        listening_input(layout.listening(), wmf.batches),
    ]
    with tracked_run(
        settings.tracking,
        "pipeline",
        run_name=f"pipeline-{dataset}",
        params=settings.flat(),
        tags={
            "tagger_run_id": tagger.run_id,
            "wmf_run_id": wmf.run_id,
            "recommender_run_id": recommender.run_id,
            **{f"registry.{name}": v for name, v in versions.items()},
        },
        inputs=inputs,
    ) as run:
        report_path = layout.reports() / f"pipeline-{run.info.run_id}.md"
        summary = PipelineSummary(
            tagger_roc_auc=tagger.roc_auc,
            tagger_pr_auc=tagger.pr_auc,
            tagger_pr_auc_chance=tagger.pr_auc_chance,
            k=recommender.k,
            ranking=recommender.rows,
            n_tracks=features.n_tracks,
            n_quarantined=features.n_quarantined,
            n_users=wmf.n_users,
            n_heldout_items=wmf.n_heldout,
            tracking_uri=settings.tracking.tracking_uri,
            report_path=report_path,
            registered=versions,
        )
        write_report(report_path, summary, per_tag=tagger.per_tag, settings=settings.flat())
        mlflow.log_artifact(str(report_path))
        mlflow.log_metrics(
            {
                "tagger/test_roc_auc": tagger.roc_auc,
                "tagger/test_pr_auc": tagger.pr_auc,
                **rows_as_metrics(recommender.rows, prefix="recommender/"),
            }
        )
        # To the flow run's log (the Prefect UI); the CLI prints the table itself.
        get_run_logger().info("pipeline summary\n%s", summary_text(summary))
    save_pipeline_settings(settings, layout.pipeline_settings())
    return summary


@task(cache_policy=NO_CACHE, **TRANSIENT_IO_RETRIES)
def save_pipeline_settings(settings: PipelineSettings, path: Path) -> Path:
    """What ``retrain-on-new-listening`` starts from: the settings the registered models were trained with."""
    return write_text(path, settings.model_dump_json(indent=1))
